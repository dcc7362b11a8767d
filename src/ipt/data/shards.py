"""Token shards on disk: a flat memmap of token ids, cumulative document ends, JSON metadata.

One shard is three files sharing a stem, plus one per side channel:
  `{stem}.tokens`  token ids, uint16 when the vocabulary fits, else uint32
  `{stem}.docs`    uint64 cumulative end offsets of the documents (the last one = token count)
  `{stem}.json`    metadata: dtype, counts, channels, tokenizer fingerprint, source, hash
  `{stem}.{name}`  a per-token side channel as long as the tokens (e.g. `loss_mask`, uint8)

The JSON is written last, by rename, so a shard without it was never finished and is ignored
by readers and redone by writers.
"""

from __future__ import annotations

import hashlib
import json
import mmap
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
                 source: str = "", channels: dict[str, str] | None = None,
                 extra: dict | None = None) -> None:
        self.stem = Path(stem)
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.channels = dict(channels or {})
        self.meta = {"format": FORMAT, "dtype": self.dtype.name, "vocab_size": vocab_size,
                     "tokenizer": tokenizer_fingerprint, "source": source,
                     "channels": self.channels, **(extra or {})}
        names = ["tokens", *self.channels]
        self._files = {n: open(f"{self.stem}.{n}.tmp", "wb") for n in names}  # noqa: SIM115
        self._ends: list[int] = []
        self.num_tokens = 0
        self._hash = hashlib.sha256()

    def add(self, ids: Sequence[int], **channels: Sequence[int] | np.ndarray) -> None:
        """Append one document; `channels` gives each declared side channel's values."""
        if set(channels) != set(self.channels):
            raise ValueError(f"document has channels {sorted(channels)}, shard declares "
                             f"{sorted(self.channels)}")
        arrays = {"tokens": np.asarray(ids, dtype=self.dtype)}
        for name, values in channels.items():
            arrays[name] = np.asarray(values, dtype=self.channels[name])
            if len(arrays[name]) != len(arrays["tokens"]):
                raise ValueError(f"channel {name} has {len(arrays[name])} values for "
                                 f"{len(arrays['tokens'])} tokens")
        for name, arr in arrays.items():
            data = arr.tobytes()
            self._files[name].write(data)
            self._hash.update(data)
        self.num_tokens += len(arrays["tokens"])
        self._ends.append(self.num_tokens)

    def close(self) -> dict:
        for f in self._files.values():
            f.close()
        ends = np.asarray(self._ends, dtype=np.uint64)
        ends.tofile(f"{self.stem}.docs.tmp")
        self._hash.update(ends.tobytes())
        self.meta.update(num_tokens=self.num_tokens, num_docs=len(self._ends),
                         content_hash=self._hash.hexdigest())
        for name in [*self._files, "docs"]:
            os.replace(f"{self.stem}.{name}.tmp", f"{self.stem}.{name}")
        tmp = f"{self.stem}.json.tmp"
        Path(tmp).write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, f"{self.stem}.json")
        return self.meta


def map_array(path: Path, dtype: np.dtype, count: int, random: bool = True) -> np.ndarray:
    """The first `count` values of a raw file as a read-only memory-mapped array. `random`:
    for reads here and there (training sequences), the kernel reads only the pages a read
    touches; its default read-around on a page fault, up to the device's read-ahead (8 MB on
    some machines), would read and map megabytes for each sequence of a few kilobytes. Arrays
    read whole (a shard's document ends) keep the default, which reads ahead."""
    if count == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random and hasattr(mmap, "MADV_RANDOM"):  # Linux, macOS; elsewhere the default
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count)


@dataclass
class Shard:
    stem: Path
    meta: dict
    tokens: np.ndarray  # memory-mapped (`map_array`)
    doc_ends: np.ndarray  # memory-mapped
    channels: dict[str, np.ndarray]  # memory-mapped, as long as `tokens`

    @classmethod
    def open(cls, stem: Path) -> Shard:
        meta = json.loads(Path(f"{stem}.json").read_text())
        if meta.get("format") != FORMAT:
            raise ShardError(f"{stem}.json: unknown format {meta.get('format')!r}")
        n = meta["num_tokens"]
        arrays = {"tokens": np.dtype(meta["dtype"]),
                  **{k: np.dtype(v) for k, v in meta.get("channels", {}).items()}}
        expected = {name: n * dt.itemsize for name, dt in arrays.items()}
        expected["docs"] = meta["num_docs"] * 8
        for name, size in expected.items():
            path = Path(f"{stem}.{name}")
            if not path.exists():
                raise ShardError(f"{path} is missing (its metadata {stem}.json exists)")
            if path.stat().st_size != size:
                raise ShardError(f"{path} has {path.stat().st_size} bytes, metadata says {size}: "
                                 "the shard is truncated or corrupt; re-run the prepare stage")
        maps = {name: map_array(Path(f"{stem}.{name}"), dt, n) for name, dt in arrays.items()}
        ends = map_array(Path(f"{stem}.docs"), np.dtype(np.uint64), meta["num_docs"], False)
        tokens = maps.pop("tokens")
        return cls(stem, meta, tokens, ends, maps)


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
        if writer.num_tokens >= tokens_per_shard:
            metas.append(writer.close())
            writer = None
    if writer is not None:
        metas.append(writer.close())
    return metas
