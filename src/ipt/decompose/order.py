"""Dataset Decomposition's order (`data.packing=decompose`): every sequence is one piece of
one document, of a power-of-two length, and each step draws one length (spec:
`dataset_decomposition.md`; docs/data.md).

The pieces themselves are `ipt.data.pieces`.

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

**Steps.** Every step holds the same number of tokens, `global_batch_size x seq_len`: at
length L that is `global_batch_size x seq_len / L` pieces. Each rank takes its contiguous
slice of them, cut into the same number of micro-batches as always (the engine's gradient
accumulation is fixed), each of `micro_batch_size x seq_len / L` pieces. Sources mix by
tokens: source i's pieces are repeated or subsampled by one factor, so that it holds its
weight's share of an epoch's tokens and keeps its own spread of lengths. The loader's state
is the number of steps consumed: resuming, on any number of ranks, continues with the next
step's pieces.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from ipt.config import CURRICULA, ConfigError
from ipt.data.permutation import Draws
from ipt.data.pieces import DecomposedShards

# A bucket's pieces of one source, as global indices: all of them (a range), or a selection
Ids = range | np.ndarray

log = logging.getLogger(__name__)


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


class DecomposedOrder:
    """Which pieces each step trains on: step s of the endless stream is `batch(s)`, a
    length L and the global indices of `tokens_per_step / L` pieces of that length.

    `sources[i]` maps each length to the global indices of source i's pieces of that length
    (in the concatenation of the sources' datasets). Epoch e is a pure function of
    (seed, fingerprint, settings, e): each bucket's pieces, mixed by the sources' weights,
    in a seeded shuffle, cut into whole batches (the remainder is left out of this epoch),
    and the steps' lengths in the curriculum's order (`bucket_order`).
    """

    def __init__(self, sources: Sequence[dict[int, Ids]], weights: Sequence[float],
                 tokens_per_step: int, curriculum: str, cycles: int, seed: int,
                 fingerprint: str, max_repeat: float = float("inf"),
                 names: Sequence[str] | None = None) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source, and at least one source")
        if any(w <= 0 for w in weights):
            raise ConfigError(f"mixture weights must be > 0, got {list(weights)}")
        if curriculum not in CURRICULA or cycles < 1:
            raise ConfigError(f"curriculum={curriculum!r} must be one of {CURRICULA}, and "
                              f"cycles={cycles} >= 1")
        self.sources, self.tokens_per_step = list(sources), tokens_per_step
        self.curriculum, self.cycles = curriculum, cycles
        self.lengths = sorted({L for s in sources for L in s if len(s[L])})
        if any(tokens_per_step % L for L in self.lengths):
            raise ConfigError(f"a step's {tokens_per_step} tokens do not divide into pieces of "
                              f"{max(self.lengths)}")
        tokens = np.array([sum(L * len(a) for L, a in s.items()) for s in sources], np.float64)
        w = np.asarray(weights, dtype=np.float64)
        factor = w / w.sum() * tokens.sum() / np.maximum(tokens, 1)
        for name, f in zip(names or map(str, range(len(sources))), factor, strict=True):
            if f > max_repeat:
                raise ConfigError(
                    f"source {name}: its weight asks for {f:.1f}x its tokens per epoch, more "
                    f"than data.max_repeat={max_repeat}; lower its weight, add data, or raise "
                    "data.max_repeat")
        # pieces per epoch, per source and bucket: each source's pieces scaled by its factor
        self.counts = [{L: int(round(f * len(s.get(L, ())))) for L in self.lengths}
                       for f, s in zip(factor, sources, strict=True)]
        self.batches = {L: sum(c[L] for c in self.counts) // (tokens_per_step // L)
                        for L in self.lengths}
        for L in self.lengths:
            if self.batches[L] == 0:
                pieces = sum(c[L] for c in self.counts)
                log.info("Dataset Decomposition: no %d-token step: the sources' pieces of %d "
                         "tokens, %d an epoch at their weights, fill none of %d; they are left "
                         "out", L, L, pieces, tokens_per_step // L)
        self.epoch_steps = sum(n if curriculum == "natural" else n // cycles * cycles
                               for n in self.batches.values())
        if self.epoch_steps == 0:
            raise ConfigError(
                f"the pieces do not fill one step of {tokens_per_step} tokens in any bucket "
                f"(pieces per bucket: { {L: sum(c[L] for c in self.counts) for L in self.lengths} }); "
                "lower train.global_batch_size or data.decompose.cycles, or add data")
        settings = f"{seed}:{fingerprint}:{tokens_per_step}:{curriculum}:{cycles}"
        self.key = int.from_bytes(hashlib.sha256(settings.encode()).digest()[:8], "little")
        # each bucket's pieces of an epoch: the sources' shares of it, drawn and shuffled
        self.draws = {L: Draws([len(s.get(L, ())) for s in sources], [c[L] for c in self.counts],
                               self.key) for L in self.lengths}
        self._epoch = -1
        self._steps = np.empty(0, dtype=np.int64)  # the epoch's lengths, step by step
        self._nth = np.empty(0, dtype=np.int64)  # which batch of its bucket each step is

    @property
    def left_out(self) -> float:
        """Share of an epoch's pieces' tokens that fill no whole step (see `bucket_order`)."""
        pieces = sum(L * c[L] for c in self.counts for L in self.lengths)
        return 1 - self.epoch_steps * self.tokens_per_step / max(1, pieces)

    def _load(self, epoch: int) -> None:
        rng = np.random.Generator(np.random.PCG64([self.key, epoch]))
        steps = bucket_order(self.batches, self.curriculum, self.cycles, rng)
        nth = np.empty_like(steps)
        for L in self.lengths:
            at = np.nonzero(steps == L)[0]
            nth[at] = np.arange(len(at))
        self._epoch, self._steps, self._nth = epoch, steps, nth

    def batch(self, step: int) -> tuple[int, np.ndarray]:
        """The length and the global piece indices of step `step` (0-based)."""
        epoch, t = divmod(step, self.epoch_steps)
        if epoch != self._epoch:
            self._load(epoch)
        L = int(self._steps[t])
        size = self.tokens_per_step // L
        j = int(self._nth[t])
        source, element = self.draws[L].take(np.arange(j * size, (j + 1) * size), epoch, L)
        ids = np.empty_like(element)
        for i in np.unique(source).tolist():
            have, at = self.sources[i][L], source == i
            ids[at] = have.start + element[at] if isinstance(have, range) else have[element[at]]
        return L, ids


class PieceBatches:
    """Index lists of this rank's micro-batches, from step `step` onwards: its contiguous
    slice of each step's pieces, in `micro_batches` equal parts."""

    def __init__(self, order: DecomposedOrder | EarlyPhase, step: int, micro_batches: int,
                 rank: int, world_size: int) -> None:
        self.order, self.step, self.micro_batches = order, step, micro_batches
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.step
        while True:
            _, ids = self.order.batch(step)
            mine = np.split(ids, self.world_size)[self.rank]
            for part in np.split(mine, self.micro_batches):
                yield part.tolist()
            step += 1


def piece_ids(parts: Sequence[DecomposedShards],
              keep: Sequence[np.ndarray] | None = None) -> list[dict[int, Ids]]:
    """Each source's pieces by length, as indices into the concatenation of the sources (a
    range: nothing the size of the corpus is held); with `keep`, only those pieces of each
    source (indices within the source)."""
    out: list[dict[int, Ids]] = []
    offset = 0
    for i, part in enumerate(parts):
        ids: dict[int, Ids] = {}
        for L, (lo, hi) in part.ranges.items():
            if keep is None:
                ids[L] = range(lo + offset, hi + offset)
            else:
                ids[L] = keep[i][(keep[i] >= lo) & (keep[i] < hi)].astype(np.int64) + offset
        out.append(ids)
        offset += len(part)
    return out


class EarlyPhase:
    """Steps before `until` from the order `early`, the rest from `full`, which goes on at
    step `until` (SALT's data selection, `ipt.slm.select`)."""

    def __init__(self, early: DecomposedOrder, full: DecomposedOrder, until: int) -> None:
        self.early, self.full, self.until = early, full, until
        self.key = early.key  # the data fingerprint a checkpoint records

    def batch(self, step: int) -> tuple[int, np.ndarray]:
        return (self.early if step < self.until else self.full).batch(step)
