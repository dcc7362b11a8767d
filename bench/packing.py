"""Packing speed: ipt's vectorised best-fit and concat beside the piece-by-piece loops they
replaced (the same results: tests/test_index.py), on synthetic document lengths.

    .venv/bin/python bench/packing.py [--tokens 1e9] [--seq-len 2048]

Documents are log-normal in length (median about 665 tokens, clipped at 4), like web text.
Each packing runs once per implementation in this process; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import bisect
import json
import time

import numpy as np

from ipt.data.packing import pack


def reference_bestfit(doc_lens: np.ndarray, seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Best-fit decreasing, one piece at a time: segments (doc, start, length) per sequence."""
    bins: list[list[tuple[int, int, int]]] = []
    pieces = []
    for d, n in enumerate(doc_lens.tolist()):
        full = n // seq_len
        bins.extend([[(d, i * seq_len, seq_len)] for i in range(full)])
        if n % seq_len:
            pieces.append((n % seq_len, d, full * seq_len))
    pieces.sort(key=lambda p: (-p[0], p[1]))
    open_bins: list[tuple[int, int]] = []
    for n, d, start in pieces:
        at = bisect.bisect_left(open_bins, (n, -1))
        if at == len(open_bins):
            bins.append([(d, start, n)])
            if seq_len - n:
                bisect.insort(open_bins, (seq_len - n, len(bins) - 1))
        else:
            room, b = open_bins.pop(at)
            bins[b].append((d, start, n))
            if room - n:
                bisect.insort(open_bins, (room - n, b))
    return bins


def reference_concat(doc_lens: np.ndarray, seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Documents in order, cut at sequence ends, one segment at a time."""
    bins: list[list[tuple[int, int, int]]] = [[]]
    room = seq_len
    for d, n in enumerate(doc_lens.tolist()):
        start = 0
        while n - start > 0:
            if room == 0:
                bins.append([])
                room = seq_len
            take = min(room, n - start)
            bins[-1].append((d, start, take))
            start, room = start + take, room - take
    return bins if bins[-1] else bins[:-1]


REFERENCES = {"bestfit": reference_bestfit, "concat": reference_concat}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(6.5, 1.0, int(args.tokens / 1100)).astype(np.int64), 4, None)
    for how, reference in REFERENCES.items():
        start = time.perf_counter()
        reference(lens, args.seq_len)
        loop = time.perf_counter() - start
        start = time.perf_counter()
        pack(lens, args.seq_len, how)
        vectorised = time.perf_counter() - start
        print(json.dumps({"packing": how, "tokens": int(lens.sum()), "docs": len(lens),
                          "seq_len": args.seq_len, "loop_s": round(loop, 3),
                          "vectorised_s": round(vectorised, 3),
                          "speedup": round(loop / vectorised, 1)}))


if __name__ == "__main__":
    main()
