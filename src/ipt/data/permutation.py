"""Random permutations read one element at a time: `Permutation(n, key)[i]` is where `i` goes,
computed from (n, key, i) alone, in O(1) time and memory, with no table of size n.

A balanced Feistel network permutes the 2b-bit integers (the smallest even width with
2^(2b) >= n): the high and low halves swap through rounds of a keyed mixing function, which
is a bijection whatever the function. Values that land at n or beyond walk on through the
same network until they land inside range(n) ("cycle walking"); since the network is a
bijection of the larger domain, walking stays one inside range(n), and as the domain is
under 4n, a walk takes fewer than 4 steps on average.

Large corpora need this: the order of an epoch of a 1T-token mixture has hundreds of
millions of sequences, and a materialised permutation of them would cost every rank
gigabytes at every start (`ipt.data.loader.MixtureOrder`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every output bit depends on every input bit (uint64, wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def subkey(*parts: int) -> int:
    """One 64-bit key from several integers (a seed, an epoch, a source...)."""
    h = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix(h ^ (np.uint64(p % 2**64) + _GOLDEN))
    return int(h[0])


class Permutation:
    """A keyed random permutation of range(n); index it with an int or an int array."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(subkey(key, r)) for r in range(ROUNDS)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        b = np.uint64(self.half)
        left, right = x >> b, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (mix(right ^ k) & self.mask)
        return (left << b) | right

    def take(self, i: np.ndarray) -> np.ndarray:
        """Where each of `i` (ints in range(n)) goes, as int64."""
        i = np.asarray(i, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"an index outside range({self.n})")
        x = self._rounds(i.astype(np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():
            x[outside] = self._rounds(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)

    def __getitem__(self, i: int) -> int:
        return int(self.take(np.array([i]))[0])

    def __len__(self) -> int:
        return self.n


class Draws:
    """An epoch's slots shared out among sources: source i fills `counts[i]` slots, drawn
    from its `sizes[i]` elements in passes, a new permutation each pass (so a count above
    the size repeats elements, one below subsamples them, and no element repeats within a
    pass), and the slots are shuffled. `take(slots, *path)` says which source and element
    fill each slot of the epoch named by `path`; every permutation is keyed by `path`, so the
    result is a pure function of (key, path, slot), computed with no table of the epoch."""

    def __init__(self, sizes: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray,
                 key: int) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if np.any((self.counts > 0) & (self.sizes < 1)):
            raise ValueError("a source with slots to fill has no elements")
        self.ends, self.key = np.cumsum(self.counts), key
        self.slots = int(self.ends[-1]) if len(self.ends) else 0
        self._permutations: dict[tuple[int, ...], Permutation] = {}

    def permutation(self, n: int, *path: int) -> Permutation:
        """The permutation of range(n) keyed by `path`, kept while it is in use."""
        if path not in self._permutations:
            if len(self._permutations) >= 256:  # an old epoch's or pass's: not read again
                self._permutations.clear()
            self._permutations[path] = Permutation(n, subkey(self.key, *path))
        return self._permutations[path]

    def take(self, slots: np.ndarray, *path: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, element within the source) of each slot (ints in range(self.slots))."""
        j = self.permutation(self.slots, *path).take(slots)  # slots in source order, shuffled
        source = np.searchsorted(self.ends, j, side="right")
        passes, t = np.divmod(j - (self.ends - self.counts)[source], self.sizes[source])
        width = int(passes.max(initial=0)) + 1
        group, element = source * width + passes, np.empty_like(j)
        for g in np.unique(group).tolist():
            i, p = divmod(g, width)
            at = group == g
            element[at] = self.permutation(int(self.sizes[i]), *path, i, p).take(t[at])
        return source, element
