"""The scoring stage (SALT_DS): a small LM scores every packed training sequence.

Per sequence, over the positions that have a target (loss masks and document ends excluded):
- `median_topk_loss`: the median of the SLM's per-token losses over the tokens whose true
  next token is among its top-k predictions (k = 10): high is hard, in the top-k is
  learnable rather than noise. NaN when no token is in the top-k.
- `mean_loss`: the mean per-token loss;
- `frac_topk`: the share of targets inside the top-k.

The sequences are the trainer's own: the source's shards packed with the same `seq_len`,
packing and document masking, or with `packing=decompose` Dataset Decomposition's pieces of
the same `decompose.min_len` and `max_len` (one score per piece). The scores file is named
by that fingerprint (`{source}/scores/{fingerprint}.npy`, float32 [sequences, 3]), so the
trainer finds it, or finds that it does not match. Work is cut into blocks of `block_size` sequences; block b goes
to rank `b % world_size` (torchrun or srun set them), finished blocks are kept in
`scores/parts/`, so a killed run goes on, and the last rank to finish merges them.

With `soft_labels=K` the same pass also stores the SLM's top-K log-probabilities per token
for offline distillation (`ipt.slm.soft_labels`), block by block, resumable the same way;
`scores=false` writes only those.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipt.attention import model_inputs
from ipt.config import SCORE_COLUMNS, ConfigError, ScoreConfig, TeacherConfig, max_len
from ipt.data import tokenizer as tok
from ipt.data.loader import PackedShards, stack, to_device, unstack
from ipt.data.pieces import DecomposedShards
from ipt.data.shards import ShardSet
from ipt.engine import set_threads
from ipt.hosts import launcher_env
from ipt.losses import IGNORE
from ipt.slm import soft_labels, teacher

log = logging.getLogger(__name__)

COLUMNS = SCORE_COLUMNS


@torch.no_grad()
def sequence_scores(logits: torch.Tensor, labels: torch.Tensor, k: int) -> np.ndarray:
    """[batch, 3] statistics (see the module doc) of one batch of packed sequences."""
    out = np.full((len(labels), 3), np.nan, dtype=np.float32)
    for i in range(len(labels)):
        keep = labels[i] != IGNORE
        if not keep.any():
            continue
        lg, y = logits[i][keep].float(), labels[i][keep]
        loss = torch.nn.functional.cross_entropy(lg, y, reduction="none")
        in_topk = (lg.topk(k, dim=-1).indices == y[:, None]).any(-1)
        if in_topk.any():
            out[i, 0] = loss[in_topk].median().item()
        out[i, 1], out[i, 2] = loss.mean().item(), in_topk.float().mean().item()
    return out


def scores_path(source_dir: Path, data: Any) -> Path:
    return source_dir / "scores" / f"{data.fingerprint}.npy"


def slm_id(cfg: ScoreConfig) -> str:
    """The SLM's folder, absolute: what a partial output records it was made with."""
    return str(teacher.resolve(cfg.slm).resolve())


def _settings(where: Path, settings: dict[str, Any]) -> None:
    """Record what a partial output is made of; refuse to add to one made otherwise."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "settings.json"
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
        if diff:
            raise ConfigError(f"{where} was started with other settings "
                              + ", ".join(f"{k}={a!r} there, {b!r} now"
                                          for k, (a, b) in diff.items())
                              + "; remove it to start over")
        return
    tmp = path.with_name(f"settings.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(path)


class _Scores:
    """Scores: a block's rows in `parts/`, merged into one file when every block is in."""

    def __init__(self, source_dir: Path, data: PackedShards | DecomposedShards,
                 cfg: ScoreConfig) -> None:
        self.final = scores_path(source_dir, data)
        self.parts = self.final.parent / "parts" / data.fingerprint
        self.cfg, self.sequences, self.fingerprint = cfg, len(data), data.fingerprint
        if not self.final.exists():
            _settings(self.parts, {"model": slm_id(cfg), "top_k": cfg.top_k,
                                   "block_size": cfg.block_size})

    def finished(self) -> bool:
        return self.final.exists()

    def has(self, b: int) -> bool:
        return (self.parts / f"block_{b:06d}.npy").exists()

    def begin(self, b: int, sequences: int, seq_len: int) -> _ScoreRows:
        return _ScoreRows(self.parts / f"block_{b:06d}.npy", self.cfg.top_k)

    def finish(self, blocks: int) -> str | None:
        if not self.finished():
            done = sorted(self.parts.glob("block_*[0-9].npy"))
            if len(done) < blocks:
                return None  # other ranks still at work; the last one merges
            tmp = self.final.with_name(self.final.stem + f".{os.getpid()}.tmp.npy")
            np.save(tmp, np.concatenate([np.load(p) for p in done]))
            tmp.replace(self.final)
            meta = {"model": self.cfg.slm, "top_k": self.cfg.top_k,
                    "sequences": self.sequences, "columns": list(COLUMNS),
                    "fingerprint": self.fingerprint}
            self.final.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return str(self.final)


class _ScoreRows:
    def __init__(self, part: Path, k: int) -> None:
        self.part, self.k = part, k
        self.rows: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.rows.append(sequence_scores(logits, labels, self.k))

    def commit(self) -> None:
        tmp = self.part.with_name(self.part.stem + ".tmp.npy")
        np.save(tmp, np.concatenate(self.rows))
        tmp.replace(self.part)


class _SoftLabels:
    """Top-K soft labels, block files that stay as they are (see `ipt.slm.soft_labels`)."""

    def __init__(self, source_dir: Path, data: PackedShards, cfg: ScoreConfig,
                 tokenizer_fp: str, vocab: int) -> None:
        self.out = soft_labels.directory(source_dir, data)
        self.cfg, self.vocab = cfg, vocab
        self.meta = {"format": soft_labels.FORMAT, "model": slm_id(cfg),
                     "top_k": cfg.soft_labels, "tokenizer": tokenizer_fp, "vocab_size": vocab,
                     "block_size": cfg.block_size, "fingerprint": data.fingerprint}
        _settings(self.out, self.meta)
        self.meta |= {"sequences": len(data), "seq_len": data.seq_len,
                      "ids_dtype": soft_labels.ids_dtype(vocab).name}

    def finished(self) -> bool:
        return (self.out / "meta.json").exists()

    def has(self, b: int) -> bool:
        return soft_labels.done(self.out, b)

    def begin(self, b: int, sequences: int, seq_len: int) -> soft_labels.SoftLabelWriter:
        return soft_labels.SoftLabelWriter(self.out, b, sequences, seq_len,
                                           self.cfg.soft_labels, self.vocab)

    def finish(self, blocks: int) -> str | None:
        if not self.finished():
            if not all(self.has(b) for b in range(blocks)):
                return None
            tmp = self.out / f"meta.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.meta, indent=1))
            tmp.replace(self.out / "meta.json")
        return str(self.out)


def score_source(model: Any, source_dir: Path, cfg: ScoreConfig, rank: int,
                 world: int) -> dict[str, str | None]:
    """Score one prepared source (and store its soft labels, if asked): the finished
    outputs' paths, None for those other ranks are still writing."""
    shards = ShardSet(source_dir / "train")
    tokenizer_fp = tok.fingerprint(cfg.tokenizer)
    if shards.tokenizer_fingerprint != tokenizer_fp:
        raise ConfigError(f"{source_dir} was tokenized with another tokenizer than "
                          f"tokenizer={cfg.tokenizer!r}")
    data: PackedShards | DecomposedShards
    if cfg.packing == "decompose":  # Dataset Decomposition's pieces, one score each
        data = DecomposedShards(shards, cfg.decompose.min_len, max_len(cfg))
    else:
        data = PackedShards(shards, cfg.seq_len, cfg.packing, cfg.doc_masking)
    outputs: dict[str, Any] = {}
    if cfg.scores:
        outputs["scores"] = _Scores(source_dir, data, cfg)
    if cfg.soft_labels:
        assert isinstance(data, PackedShards)  # (`score` refuses them for pieces)
        outputs["soft_labels"] = _SoftLabels(source_dir, data, cfg, tokenizer_fp,
                                             len(tok.load(cfg.tokenizer)))
    todo = [o for o in outputs.values() if not o.finished()]
    blocks = range(0, len(data), cfg.block_size)
    bar = _progress(cfg, source_dir.name, len(data), rank) if todo else None
    for b, start in enumerate(blocks):
        need = [o for o in todo if not o.has(b)]
        if b % world != rank or not need:
            continue
        end = min(start + cfg.block_size, len(data))
        writers = [o.begin(b, end - start, cfg.seq_len) for o in need]
        for a in range(start, end, cfg.batch_size):
            items = [data[i] for i in range(a, min(a + cfg.batch_size, end))]
            for run in _same_length(items):  # (pieces of one length each)
                batch = to_device(unstack(stack(run)), model.device)  # with its documents
                with torch.no_grad():
                    logits = model(input_ids=batch["input_ids"],
                                   **model_inputs(batch, model)).logits
                for w in writers:
                    w.add(logits, batch["labels"].to(logits.device))
            if bar is not None:
                bar.update(len(items))
        for w in writers:
            w.commit()
    if bar is not None:
        bar.close()
    return {what: o.finish(len(blocks)) for what, o in outputs.items()}


def _same_length(items: list[dict[str, torch.Tensor]]) -> list[list[dict[str, torch.Tensor]]]:
    """Consecutive items in runs of one sequence length (a batch is one tensor)."""
    runs: list[list[dict[str, torch.Tensor]]] = []
    for item in items:
        if runs and len(runs[-1][0]["input_ids"]) == len(item["input_ids"]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _progress(cfg: ScoreConfig, name: str, total: int, rank: int) -> Any:
    if rank != 0 or cfg.progress_bar == "never" or \
            (cfg.progress_bar == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=f"score {name}", total=total, unit="seq", dynamic_ncols=True)


def score(cfg: ScoreConfig) -> dict[str, dict[str, str | None]]:
    """Every source's outputs: {source: {"scores": path, "soft_labels": dir}}, a path None
    where other ranks are still at work (the last to finish completes it)."""
    if not cfg.sources:
        raise ConfigError("sources is empty: name prepared source folders, e.g. "
                          "+sources.web=data/shards/web")
    if not cfg.scores and not cfg.soft_labels:
        raise ConfigError("nothing to do: scores=false and soft_labels=0")
    if cfg.packing == "decompose" and cfg.soft_labels:
        raise ConfigError("soft_labels are stored per packed sequence, and packing=decompose "
                          "scores pieces of documents; score the pieces without them "
                          "(soft_labels=0), or store soft labels for a bestfit packing")
    if cfg.soft_labels < 0 or cfg.top_k < 1:
        raise ConfigError(f"soft_labels={cfg.soft_labels} must be >= 0 (0: none) and "
                          f"top_k={cfg.top_k} >= 1")
    teacher.check(TeacherConfig(path=cfg.slm), cfg.tokenizer)
    env = launcher_env()  # torchrun's or srun's rank variables; one process without them
    rank, world = env["rank"], env["world"]
    set_threads(0, env["local_world"])  # the node's cores shared among its ranks
    device = torch.device(f"cuda:{env['local_rank']}" if torch.cuda.is_available() else "cpu")
    model = teacher.load(TeacherConfig(path=cfg.slm), device, torch.float32)
    out = {}
    for name, path in cfg.sources.items():
        if not (Path(path) / "train").is_dir():
            raise ConfigError(f"sources.{name}={path!r} is not a prepared source (no train/)")
        out[name] = score_source(model, Path(path), cfg, rank, world)
    return out
