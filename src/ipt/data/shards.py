"""Token shards on disk: a flat memmap of token ids, cumulative document ends, JSON metadata.

One shard is three files sharing a stem:
  `{stem}.tokens`  token ids, uint16 when the vocabulary fits, else uint32
  `{stem}.docs`    uint64 cumulative end offsets of the documents (the last one = token count)
  `{stem}.json`    metadata: dtype, counts, tokenizer fingerprint, source, content hash

The JSON is written last, by rename, so a shard without it was never finished and is ignored
by readers and redone by writers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "ipt-token-shard/1"


class ShardError(RuntimeError):
    """A shard that is missing, truncated or inconsistent with its metadata."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Streams documents into one shard; `close()` publishes it atomically."""

    def __init__(self, stem: str | Path, vocab_size: int, tokenizer_fingerprint: str,
                 source: str = "") -> None:
        self.stem = Path(stem)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.meta = {"format": FORMAT, "dtype": self.dtype.name, "vocab_size": vocab_size,
                     "tokenizer": tokenizer_fingerprint, "source": source}
        self._tokens = open(f"{self.stem}.tokens.tmp", "wb")  # noqa: SIM115 - closed in close()
        self._ends: list[int] = []
        self._n = 0
        self._hash = hashlib.sha256()

    def add(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        data = arr.tobytes()
        self._tokens.write(data)
        self._hash.update(data)
        self._n += len(arr)
        self._ends.append(self._n)

    def close(self) -> dict:
        self._tokens.close()
        ends = np.asarray(self._ends, dtype=np.uint64)
        ends.tofile(f"{self.stem}.docs.tmp")
        self._hash.update(ends.tobytes())
        self.meta.update(num_tokens=self._n, num_docs=len(self._ends),
                         content_hash=self._hash.hexdigest())
        os.replace(f"{self.stem}.tokens.tmp", f"{self.stem}.tokens")
        os.replace(f"{self.stem}.docs.tmp", f"{self.stem}.docs")
        tmp = f"{self.stem}.json.tmp"
        Path(tmp).write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, f"{self.stem}.json")
        return self.meta


@dataclass
class Shard:
    stem: Path
    meta: dict
    tokens: np.ndarray  # memmap
    doc_ends: np.ndarray

    @classmethod
    def open(cls, stem: Path) -> Shard:
        meta = json.loads(Path(f"{stem}.json").read_text())
        if meta.get("format") != FORMAT:
            raise ShardError(f"{stem}.json: unknown format {meta.get('format')!r}")
        dtype = np.dtype(meta["dtype"])
        for suffix, expect in ((".tokens", meta["num_tokens"] * dtype.itemsize),
                               (".docs", meta["num_docs"] * 8)):
            path = Path(f"{stem}{suffix}")
            if not path.exists():
                raise ShardError(f"{path} is missing (its metadata {stem}.json exists)")
            if path.stat().st_size != expect:
                raise ShardError(f"{path} has {path.stat().st_size} bytes, metadata says {expect}: "
                                 "the shard is truncated or corrupt; re-run the prepare stage")
        tokens = np.memmap(f"{stem}.tokens", dtype=dtype, mode="r") if meta["num_tokens"] else \
            np.zeros(0, dtype=dtype)
        ends = np.fromfile(f"{stem}.docs", dtype=np.uint64)
        return cls(stem, meta, tokens, ends)


class ShardSet:
    """All finished shards of a directory, in name order, with one fingerprint."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ShardError(f"token shard directory {self.directory} does not exist")
        stems = sorted(p.with_suffix("") for p in self.directory.glob("*.json"))
        if not stems:
            raise ShardError(f"{self.directory} holds no token shards (*.json metadata)")
        self.shards = [Shard.open(s) for s in stems]
        tokenizers = {s.meta["tokenizer"] for s in self.shards}
        if len(tokenizers) > 1:
            raise ShardError(f"{self.directory}: shards were made with different tokenizers "
                             f"{sorted(tokenizers)}")
        self.tokenizer_fingerprint = tokenizers.pop()
        self.num_tokens = sum(s.meta["num_tokens"] for s in self.shards)
        if self.num_tokens == 0:
            raise ShardError(f"{self.directory}: the shards hold no tokens (empty dataset)")
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.meta["content_hash"].encode())
        self.fingerprint = h.hexdigest()[:16]


def write_shards(docs: Iterable[Sequence[int]], out_dir: str | Path, vocab_size: int,
                 tokenizer_fingerprint: str, tokens_per_shard: int = 1 << 24,
                 source: str = "", prefix: str = "shard") -> list[dict]:
    """Write an iterable of tokenized documents into shards of about `tokens_per_shard`."""
    metas: list[dict] = []
    writer: ShardWriter | None = None
    for ids in docs:
        if writer is None:
            stem = Path(out_dir) / f"{prefix}_{len(metas):05d}"
            writer = ShardWriter(stem, vocab_size, tokenizer_fingerprint, source)
        writer.add(ids)
        if writer._n >= tokens_per_shard:
            metas.append(writer.close())
            writer = None
    if writer is not None:
        metas.append(writer.close())
    return metas
