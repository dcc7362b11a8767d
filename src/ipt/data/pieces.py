"""Documents cut into power-of-two pieces: the dataset Dataset Decomposition trains on
(`ipt.decompose`) and the scoring stage scores (`ipt.slm.score`).

**Pieces.** A document of n tokens is cut from its start, largest piece first: as many pieces
of `max_len` as fit, then one piece for each set bit of the remainder, from the highest down
to `min_len`. Bits below `min_len` are the tail no bucket takes: those tokens are dropped and
counted, never silently. Each piece lies inside one document; pieces are disjoint; covered
plus dropped tokens are the document's tokens. Only the documents' lengths (the shards' doc
ends) are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ipt.config import ConfigError
from ipt.data.index import IndexWriter, cached
from ipt.data.packing import piece
from ipt.data.shards import ShardError, ShardSet


def _log2(n: int, name: str) -> int:
    if n < 1 or n & (n - 1):
        raise ConfigError(f"{name}={n} must be a power of two")
    return n.bit_length() - 1


@dataclass
class Pieces:
    """The pieces of one shard, by bucket: `starts[L]` is an [m, 2] array of
    (document index, token offset in the document) for the pieces of length L."""

    starts: dict[int, np.ndarray]
    total: int  # tokens in the documents
    dropped: int  # tokens in no piece

    @property
    def covered(self) -> int:
        return sum(int(L) * len(a) for L, a in self.starts.items())


def decompose(doc_lens: np.ndarray, min_len: int, max_len: int) -> Pieces:
    """Every document of a shard in power-of-two pieces of `min_len` to `max_len` tokens."""
    kmin, kmax = _log2(min_len, "min_len"), _log2(max_len, "max_len")
    if kmin > kmax:
        raise ConfigError(f"min_len={min_len} is above max_len={max_len}")
    n = np.asarray(doc_lens, dtype=np.int64)
    full = n >> kmax
    docs = np.arange(len(n), dtype=np.int64)
    starts: dict[int, np.ndarray] = {}
    # pieces of max_len: document d has full[d] of them, at 0, max_len, 2 max_len, ...
    first = np.repeat(np.cumsum(full) - full, full)
    at = (np.arange(int(full.sum()), dtype=np.int64) - first) << kmax
    starts[max_len] = np.stack([np.repeat(docs, full), at], axis=1)
    rest = n & (max_len - 1)
    for k in range(kmax - 1, kmin - 1, -1):
        has = np.nonzero((rest >> k) & 1)[0]
        # after the max_len pieces, the higher bits' pieces come first
        offset = (full[has] << kmax) + ((rest[has] >> (k + 1)) << (k + 1))
        starts[1 << k] = np.stack([has, offset], axis=1)
    dropped = int((rest & (min_len - 1)).sum())
    return Pieces(starts, int(n.sum()), dropped)


PIECE_ARRAYS = {"shard": "int32", "base": "int64", "ends": "uint8"}


def _cut_all(shards: ShardSet, min_len: int, max_len: int, out: IndexWriter) -> dict[str, Any]:
    """Every shard's pieces into `out`, bucket by bucket, longest first; one pass over the
    shards per bucket, so the build holds one shard's pieces at a time."""
    lengths = [1 << k for k in range(_log2(max_len, "max_len"), _log2(min_len, "min_len") - 1,
                                     -1)]
    counts, total, dropped = [], 0, 0
    for i, length in enumerate(lengths):
        counts.append(0)
        for k, shard in enumerate(shards.shards):
            ends = shard.doc_ends.astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            cut = decompose(ends - starts, min_len, max_len)
            if i == 0:
                total, dropped = total + cut.total, dropped + cut.dropped
            at = cut.starts[length]
            base = starts[at[:, 0]] + at[:, 1]
            out.append(shard=np.full(len(at), k), base=base,
                       ends=base + length == ends[at[:, 0]])
            counts[-1] += len(at)
    return {"lengths": lengths, "pieces": counts, "total": total, "dropped": dropped}


class DecomposedShards(Dataset):
    """One source's shards in pieces. Item i is one piece, as a sequence of its own length;
    the pieces are numbered bucket by bucket, longest first (`ranges`). Which pieces there
    are comes from the shard set's index (`ipt.data.index`): built once, memory-mapped here."""

    def __init__(self, shards: ShardSet, min_len: int, max_len: int,
                 index_dir: str | Path | None = None) -> None:
        self.shards, self.min_len, self.max_len = shards, min_len, max_len
        if min_len > max_len:
            raise ConfigError(f"min_len={min_len} is above max_len={max_len}")
        self.index = cached(shards, f"pieces-{min_len}-{max_len}", PIECE_ARRAYS,
                            lambda w: _cut_all(shards, min_len, max_len, w),
                            Path(index_dir) if index_dir is not None else None)
        meta = self.index.meta
        self.total, self.dropped = meta["total"], meta["dropped"]
        counts = dict(zip(meta["lengths"], meta["pieces"], strict=True))
        self.lengths = [L for L in meta["lengths"] if counts[L]]
        if not self.lengths:
            raise ShardError(f"{shards.directory}: no document has {min_len} tokens, so no "
                             f"piece fits a bucket (data.decompose.min_len={min_len})")
        edges = np.concatenate([[0], np.cumsum([counts[L] for L in self.lengths])])
        self.ranges = {L: (int(edges[i]), int(edges[i + 1])) for i, L in enumerate(self.lengths)}
        self._edges = edges[1:].astype(np.int64)

    def __len__(self) -> int:
        return int(self._edges[-1])

    def length_of(self, index: int) -> int:
        return self.lengths[int(np.searchsorted(self._edges, index, side="right"))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.shards.shards[int(self.index["shard"][index])]
        base, ends_doc = int(self.index["base"][index]), bool(self.index["ends"][index])
        arrays = piece(shard.tokens, base, self.length_of(index), ends_doc,
                       shard.channels.get("loss_mask"))
        return {name: torch.from_numpy(a) for name, a in arrays.items()}

    @property
    def dropped_share(self) -> float:
        """Share of the tokens in no piece (document tails shorter than `min_len`)."""
        return self.dropped / max(1, self.total)

    @property
    def fingerprint(self) -> str:
        return f"{self.shards.fingerprint}-D{self.min_len}-{self.max_len}"

    @property
    def score_options(self) -> str:
        """The options of data_pipeline/score.py that score these pieces."""
        return (f"packing=decompose decompose.min_len={self.min_len} "
                f"decompose.max_len={self.max_len}")
