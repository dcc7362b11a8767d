"""The prepare stage: raw sources to token shards, in parallel, resumable, every record
accounted for.

Each source's records are cut, in their fixed order, into groups of `docs_per_shard`. Group
`k` becomes shard `k`: one worker process tokenizes it (BOS + text + EOS per document) and
writes `train/shard_k`, `valid/shard_k` (documents held out by a hash of their id), and
`rejects/shard_k.jsonl`. Last, it writes `parts/shard_k.json`, the shard's accounting and its
completion mark. A re-run skips every group that has its mark, so a killed run goes on without
redoing or duplicating anything. Memory stays flat: at most two groups per worker are in
flight.

Output, per source: `{out}/{source}/{train,valid,rejects,parts}/` and `summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ipt.config import ConfigError, PrepareConfig, SourceConfig
from ipt.data import sources as src
from ipt.data import tokenizer as tok
from ipt.data.shards import ShardWriter

log = logging.getLogger(__name__)


def is_valid_doc(doc_id: str, fraction: float) -> bool:
    """Deterministic hold-out by id: the same documents on every run and machine."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def pieces(text: str, limit: int) -> list[str]:
    """Cut a long text at line breaks (else anywhere) into pieces of at most `limit` chars."""
    out, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1 or start + limit
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


Encoded = tuple[list[int], "np.ndarray | None"]  # token ids, and the loss mask if any


class Encoder:
    """Tokenizes documents in one worker: ids and, for SFT-style data, the loss mask."""

    def __init__(self, tokenizer_dir: str, add_bos: bool, max_chars: int) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, no oversubscription
        self.tok = tok.load(tokenizer_dir)
        self.bos = [self.tok.bos_token_id] if add_bos else []
        self.eos = self.tok.eos_token_id
        self.max_chars = max_chars

    def encode(self, docs: list[src.Doc]) -> list[Encoded]:
        plain = [d for d in docs if d.loss_spans is None and len(d.text) <= self.max_chars]
        batch = self.tok([d.text for d in plain], add_special_tokens=False)["input_ids"] \
            if plain else []
        encoded = dict(zip((id(d) for d in plain), batch, strict=True))
        out: list[Encoded] = []
        for d in docs:
            if id(d) in encoded:
                out.append((self.bos + encoded[id(d)] + [self.eos], None))
            elif d.loss_spans is None:  # a huge document: bounded memory, piece by piece
                out.append((self.bos + self._encode_long(d.text) + [self.eos], None))
            else:
                out.append(self._with_mask(d))
        return out

    def _encode_long(self, text: str) -> list[int]:
        """Piece by piece, each after a little of the text before it, keeping only the tokens
        that start inside the piece: the same ids as encoding the whole text at once, where
        the cuts fall on line breaks (no sentencepiece word-start marker at every piece)."""
        ids: list[int] = []
        context = ""
        for piece in pieces(text, self.max_chars):
            enc = self.tok(context + piece, add_special_tokens=False,
                           return_offsets_mapping=True)
            ids += [t for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                    if a >= len(context)]
            context = piece[-64:]
        return ids

    def _with_mask(self, d: src.Doc) -> tuple[list[int], np.ndarray]:
        """A token counts when its text starts inside a loss span; BOS never, EOS always."""
        enc = self.tok(d.text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.array([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(starts), dtype=np.uint8)
        for a, b in d.loss_spans or ():
            mask[(starts >= a) & (starts < b)] = 1
        full = np.concatenate([np.zeros(len(self.bos), np.uint8), mask, np.ones(1, np.uint8)])
        return self.bos + list(enc["input_ids"]) + [self.eos], full


_encoder: Encoder | None = None


def _init_worker(tokenizer_dir: str, add_bos: bool, max_chars: int) -> None:
    global _encoder
    _encoder = Encoder(tokenizer_dir, add_bos, max_chars)


def write_group(out: str, k: int, records: list[src.Record], source: str, vocab_size: int,
                fingerprint: str, valid_fraction: float, masked: bool) -> dict[str, Any]:
    """Tokenize and write group `k` of a source; returns (and writes) its accounting."""
    assert _encoder is not None, "worker not initialised"
    root = Path(out)
    docs = [r for r in records if isinstance(r, src.Doc)]
    rejects = [r for r in records if isinstance(r, src.Reject)]
    channels = {"loss_mask": "uint8"} if masked else {}
    writers: dict[str, ShardWriter] = {}
    counts: Counter[str] = Counter()
    for doc, (ids, mask) in zip(docs, _encoder.encode(docs), strict=True):
        split = "valid" if is_valid_doc(doc.id, valid_fraction) else "train"
        if split not in writers:
            writers[split] = ShardWriter(root / split / f"shard_{k:05d}", vocab_size, fingerprint,
                                         source, channels, extra={"group": k})
        extra = {"loss_mask": mask if mask is not None else np.ones(len(ids), np.uint8)} \
            if masked else {}
        writers[split].add(ids, **extra)
        counts[f"{split}_docs"] += 1
        counts[f"{split}_tokens"] += len(ids)
    for w in writers.values():
        w.close()
    (root / "rejects").mkdir(parents=True, exist_ok=True)
    with open(root / "rejects" / f"shard_{k:05d}.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps({"id": r.id, "reason": r.reason}) + "\n")
    part = {"group": k, "records": len(records), **counts,
            "rejected": len(rejects), "reasons": dict(Counter(_reason_kind(r) for r in rejects))}
    (root / "parts").mkdir(parents=True, exist_ok=True)
    tmp = root / "parts" / f"shard_{k:05d}.json.tmp"
    tmp.write_text(json.dumps(part))
    tmp.rename(root / "parts" / f"shard_{k:05d}.json")  # the completion mark
    return part


def _reason_kind(r: src.Reject) -> str:
    return r.reason.split(" (")[0].split(":")[0]


def groups(records: Iterator[src.Record], size: int) -> Iterator[list[src.Record]]:
    while batch := list(islice(records, size)):
        yield batch


def prepare_source(spec: SourceConfig, cfg: PrepareConfig, vocab_size: int,
                   fingerprint: str) -> dict[str, Any]:
    out = Path(cfg.out) / spec.name
    parts_dir = out / "parts"
    done = {int(p.stem.split("_")[1]) for p in parts_dir.glob("shard_*.json")} \
        if parts_dir.is_dir() else set()
    masked = src.masked(spec)
    bar = _progress(cfg, spec.name)
    started, docs_done = time.perf_counter(), 0
    pool = ProcessPoolExecutor(max(1, cfg.workers), initializer=_init_worker,
                               initargs=(cfg.tokenizer, cfg.add_bos, cfg.max_chars_per_piece))
    in_flight: deque[Future] = deque()
    try:
        for k, group in enumerate(groups(src.read(spec), cfg.docs_per_shard)):
            if k in done:
                continue  # finished by an earlier run: read past it, do not redo it
            in_flight.append(pool.submit(write_group, str(out), k, group, spec.name, vocab_size,
                                         fingerprint, cfg.valid_fraction, masked))
            while len(in_flight) >= 2 * max(1, cfg.workers):
                docs_done += _finish(in_flight.popleft(), bar, started, docs_done)
        while in_flight:
            docs_done += _finish(in_flight.popleft(), bar, started, docs_done)
    finally:
        pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return summarize(out, spec)


def _finish(future: Future, bar: Any, started: float, docs_done: int) -> int:
    part = future.result()
    n = part["records"]
    if bar is not None:
        bar.update(n)
        bar.set_postfix(docs_s=f"{(docs_done + n) / (time.perf_counter() - started):.0f}",
                        rejected=part["rejected"])
    return n


def _progress(cfg: PrepareConfig, name: str) -> Any:
    if cfg.progress_bar == "never" or (cfg.progress_bar == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=f"prepare {name}", unit="doc", dynamic_ncols=True)


def summarize(out: Path, spec: SourceConfig) -> dict[str, Any]:
    """Add up the groups' accounting: every record read is in train, valid or rejects."""
    total: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    parts = sorted((out / "parts").glob("shard_*.json"))
    for p in parts:
        part = json.loads(p.read_text())
        reasons.update(part.pop("reasons"))
        part.pop("group")
        total.update(part)
    summary = {"source": asdict(spec), "groups": len(parts), **dict(total),
               "reject_reasons": dict(reasons)}
    written = total["train_docs"] + total["valid_docs"] + total["rejected"]
    if written != total["records"]:
        raise RuntimeError(f"{out}: {total['records']} records read but {written} accounted for")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def prepare(cfg: PrepareConfig) -> dict[str, dict[str, Any]]:
    """Every source of `cfg`, one after another (each in parallel over its groups)."""
    if not cfg.sources:
        raise ConfigError("sources is empty: name at least one, e.g. "
                          "+sources.web.path=/data/web.jsonl")
    if not 0 <= cfg.valid_fraction < 1:
        raise ConfigError(f"valid_fraction={cfg.valid_fraction} must be in [0, 1)")
    if not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"tokenizer={cfg.tokenizer!r} does not exist")
    specs = []
    for name, spec in cfg.sources.items():
        spec.name = name
        src.check(spec)  # every source must be readable before any work starts
        specs.append(spec)
    fingerprint = tok.fingerprint(cfg.tokenizer)
    vocab_size = len(tok.load(cfg.tokenizer))
    summaries = {}
    for spec in specs:
        summaries[spec.name] = s = prepare_source(spec, cfg, vocab_size, fingerprint)
        log.info("%s: %d records -> %d train docs (%s tokens), %d valid docs, %d rejected %s",
                 spec.name, s.get("records", 0), s.get("train_docs", 0),
                 f"{s.get('train_tokens', 0):,}", s.get("valid_docs", 0), s.get("rejected", 0),
                 s["reject_reasons"] or "")
    return summaries
