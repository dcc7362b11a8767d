"""Dataset Decomposition: documents cut into power-of-two pieces, and the order of buckets.

(Spec: `dataset_decomposition.md`. Not wired into training yet: issue 17 builds on this.)

**Pieces.** A document of n tokens is cut from its start, largest piece first: as many pieces
of `max_len` as fit, then one piece for each set bit of the remainder, from the highest down
to `min_len`. Bits below `min_len` are the tail no bucket takes: those tokens are dropped and
counted, never silently. Each piece lies inside one document; pieces are disjoint; covered
plus dropped tokens are the document's tokens. Only the documents' lengths (the shards' doc
ends) are needed.

**Order of buckets.** One step draws one bucket. An epoch has, per bucket of length L, the
number of whole global batches its pieces fill; a curriculum orders those batches:
- `natural`: a seeded shuffle of all of them;
- `uniform`, `grow_linear`, `grow_p2`: each bucket's batches are split into `cycles` equal
  parts (the remainder is dropped); within a cycle, each step picks a bucket with probability
  proportional to its odds among the buckets with batches left in that cycle. The odds of
  the buckets, shortest first, are 1 1 ... 1 (uniform), n n-1 ... 1 (grow_linear) and
  2^(n-1) ... 2 1 (grow_p2): short sequences come early in a cycle, long ones late.

In every curriculum batch 0 comes from the longest bucket, so a run that does not fit in
memory fails at its first step. Everything is a pure function of the seed and the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipt.config import ConfigError

CURRICULA = ("natural", "uniform", "grow_linear", "grow_p2")


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


def odds(curriculum: str, n_buckets: int) -> np.ndarray:
    """Each bucket's odds of being drawn, shortest bucket first."""
    if curriculum == "uniform":
        return np.ones(n_buckets)
    if curriculum == "grow_linear":
        return np.arange(n_buckets, 0, -1, dtype=np.float64)
    if curriculum == "grow_p2":
        return 2.0 ** np.arange(n_buckets - 1, -1, -1)
    raise ConfigError(f"curriculum={curriculum!r}; expected one of {CURRICULA}")


def bucket_order(batches: dict[int, int], curriculum: str, cycles: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The bucket length of each step of an epoch, given each bucket's whole batches."""
    if curriculum not in CURRICULA:
        raise ConfigError(f"curriculum={curriculum!r}; expected one of {CURRICULA}")
    if cycles < 1:
        raise ConfigError(f"cycles={cycles} must be >= 1")
    lengths = sorted(L for L, n in batches.items() if n > 0)
    if not lengths:
        return np.empty(0, dtype=np.int64)
    if curriculum == "natural":
        order = np.concatenate([np.full(batches[L], L, dtype=np.int64) for L in lengths])
        order = order[rng.permutation(len(order))]
    else:
        w = odds(curriculum, len(lengths))
        per_cycle = np.array([batches[L] // cycles for L in lengths], dtype=np.int64)
        steps = []
        for _ in range(cycles):
            left = per_cycle.copy()
            for _ in range(int(left.sum())):
                p = w * (left > 0)
                i = int(rng.choice(len(lengths), p=p / p.sum()))
                left[i] -= 1
                steps.append(lengths[i])
        order = np.asarray(steps, dtype=np.int64)
    if len(order):
        longest = int(np.nonzero(order == order.max())[0][0])
        order[[0, longest]] = order[[longest, 0]]  # an out-of-memory error shows at once
    return order
