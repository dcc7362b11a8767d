"""Offline soft labels: the teacher's top-K log-probabilities per token, stored beside the shards.

For when several students learn from one teacher: its forward runs once, in the scoring stage
(`data_pipeline/score.py soft_labels=K`, in the same pass as the scores), instead of in every
student's steps. Per packed sequence of the trainer's packing:

    {source}/soft_labels/{fingerprint}/block_{b:06d}.ids.npy    [sequences, seq_len, K]
    {source}/soft_labels/{fingerprint}/block_{b:06d}.logp.npy   [sequences, seq_len, K] fp16
    {source}/soft_labels/{fingerprint}/meta.json                written when all blocks are

Ids are uint16 for vocabularies up to 65,536 (int32 above), so K = 64 costs 256 bytes per
token. The student sees the teacher's distribution restricted to its top K and renormalised:
truncation drops the tail's mass (biased towards the head), the price of storing it.

The labels are keyed to the packed sequence, not to the step, so any mixture, seed, batch
size or number of ranks can use them; what must match is the packing. Its fingerprint names
the directory and covers the shards (their content and order), seq_len, packing and document
masking, and the meta records the tokenizer: a run that differs in any of them is refused,
and told which.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ipt.config import ConfigError
from ipt.data.loader import Concat, PackedShards

FORMAT = "ipt-soft-labels/1"


def directory(source_dir: Path, data: PackedShards) -> Path:
    return Path(source_dir) / "soft_labels" / data.fingerprint


def ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


@torch.no_grad()
def top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` token ids and their log-probabilities (fp16) at every position of [batch, seq,
    vocab] logits, one sequence at a time (one fp32 copy of a sequence's logits at most)."""
    ids, logp = [], []
    for row in logits:
        values, index = torch.log_softmax(row.float(), dim=-1).topk(k, dim=-1)
        ids.append(index.cpu().numpy())
        logp.append(values.to(torch.float16).cpu().numpy())
    return np.stack(ids), np.stack(logp)


def _describe(fingerprint: str) -> dict[str, str]:
    shards, seq_len, packing, masking = fingerprint.rsplit("-", 3)
    return {"shards": shards, "seq_len": seq_len[1:], "packing": packing,
            "doc_masking": str(masking == "m1").lower()}


class SourceSoftLabels:
    """One source's stored soft labels, checked against the run's packing and tokenizer;
    memory-mapped per process on first use."""

    def __init__(self, name: str, source_dir: Path, data: PackedShards, tokenizer_fp: str,
                 vocab: int) -> None:
        self.dir = directory(source_dir, data)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise ConfigError(self._missing(name, Path(source_dir), data))
        meta = json.loads(meta_path.read_text())
        if meta["tokenizer"] != tokenizer_fp or meta["vocab_size"] != vocab:
            raise ConfigError(
                f"source {name}: the soft labels in {self.dir} were made with tokenizer "
                f"{meta['tokenizer']} ({meta['vocab_size']} tokens); this run's is "
                f"{tokenizer_fp} ({vocab} tokens); teacher and student must share one")
        if meta["sequences"] != len(data):
            raise ConfigError(f"source {name}: {self.dir} holds soft labels for "
                              f"{meta['sequences']} sequences, the packing has {len(data)}")
        self.meta, self.block_size = meta, int(meta["block_size"])
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _missing(name: str, source_dir: Path, data: PackedShards) -> str:
        made = sorted(p.name for p in (source_dir / "soft_labels").glob("*")
                      if (p / "meta.json").exists())
        if not made:
            return (f"source {name} has no soft labels for its packing ({data.fingerprint}); "
                    f"run data_pipeline/score.py slm=<teacher> soft_labels=64 "
                    f"+sources.{name}={source_dir} seq_len={data.seq_len} packing={data.how} "
                    f"doc_masking={str(data.doc_masking).lower()}")
        ours = _describe(data.fingerprint)
        lines = []
        for fp in made:
            theirs = _describe(fp)
            diff = ", ".join(f"{k} {theirs[k]} there, {ours[k]} here" for k in ours
                             if theirs[k] != ours[k])
            if theirs["shards"] != ours["shards"]:
                diff += " (the shards' content or order changed since)"
            lines.append(f"  {fp}: {diff}")
        return (f"source {name}: its soft labels were made for another packing than this "
                f"run's, so they do not line up with its sequences:\n" + "\n".join(lines)
                + "\nre-run data_pipeline/score.py with this run's packing, or train with it")

    def __len__(self) -> int:
        return int(self.meta["sequences"])

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            stem = self.dir / f"block_{b:06d}"
            self._blocks[b] = (np.load(f"{stem}.ids.npy", mmap_mode="r"),
                               np.load(f"{stem}.logp.npy", mmap_mode="r"))
        return self._blocks[b]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, logp = self._block(i // self.block_size)
        row = i % self.block_size
        return (torch.from_numpy(ids[row].astype(np.int64)),
                torch.from_numpy(logp[row].astype(np.float32)))

    def __getstate__(self) -> dict[str, Any]:  # to loader workers: they map their own
        return {**self.__dict__, "_blocks": {}}


class WithSoftLabels(Dataset):
    """The training set, with the teacher's top-K (`teacher_ids`, `teacher_logp`, [seq, K])
    added to the samples the loader asks them for: an item is `(index, wanted)`."""

    def __init__(self, data: Concat, labels: Sequence[SourceSoftLabels]) -> None:
        self.data, self.labels = data, list(labels)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        index, wanted = item
        out = self.data[index]
        if wanted:
            k = int(np.searchsorted(self.data.offsets, index, side="right")) - 1
            out["teacher_ids"], out["teacher_logp"] = \
                self.labels[k][index - int(self.data.offsets[k])]
        return out


def for_run(train: Concat, names: Sequence[str], dirs: Sequence[Path], tokenizer_fp: str,
            vocab: int, teacher_path: str | None) -> WithSoftLabels:
    """The training set with its sources' soft labels, each checked (see the module doc)."""
    parts = [p for p in train.parts if isinstance(p, PackedShards)]
    assert len(parts) == len(names), "one packed source per name"
    labels = [SourceSoftLabels(n, d, p, tokenizer_fp, vocab)
              for n, d, p in zip(names, dirs, parts, strict=True)]
    if teacher_path is not None:
        from ipt.slm.teacher import resolve

        for name, sl in zip(names, labels, strict=True):
            if sl.meta["model"] != str(resolve(teacher_path).resolve()):
                raise ConfigError(f"teacher.path={teacher_path!r}, but the soft labels of "
                                  f"source {name} were made by {sl.meta['model']}")
    return WithSoftLabels(train, labels)


class SoftLabelWriter:
    """Writes one block of soft labels straight to disk (memory-mapped), published by rename."""

    def __init__(self, out: Path, block: int, sequences: int, seq_len: int, k: int,
                 vocab: int) -> None:
        self.stem = out / f"block_{block:06d}"
        shape = (sequences, seq_len, k)
        self.ids = np.lib.format.open_memmap(f"{self.stem}.ids.tmp.npy", "w+",
                                             ids_dtype(vocab), shape)
        self.logp = np.lib.format.open_memmap(f"{self.stem}.logp.tmp.npy", "w+",
                                              np.float16, shape)
        self.at, self.k, self.vocab = 0, k, vocab

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A batch's rows; every position is stored (those without a target go unused). The
        teacher's distribution is over the tokenizer's `vocab` rows: a vocabulary padded past
        it keeps no token there."""
        ids, logp = top_k(logits[..., :self.vocab], self.k)
        self.ids[self.at:self.at + len(ids)] = ids
        self.logp[self.at:self.at + len(ids)] = logp
        self.at += len(ids)

    def commit(self) -> None:
        assert self.at == len(self.ids), "a block is written whole"
        for name, arr in (("ids", self.ids), ("logp", self.logp)):
            arr.flush()
            Path(f"{self.stem}.{name}.tmp.npy").replace(f"{self.stem}.{name}.npy")
        del self.ids, self.logp


def done(out: Path, block: int) -> bool:
    stem = out / f"block_{block:06d}"
    return Path(f"{stem}.ids.npy").exists() and Path(f"{stem}.logp.npy").exists()
