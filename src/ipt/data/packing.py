"""Packing documents into training sequences, keeping every document boundary.

A packed sequence is a list of segments `(doc, start, length)`: `length` tokens of document
`doc` of a shard, from token `start`. Two ways to fill sequences of `seq_len` positions:

- `bestfit` (default): a document longer than a sequence fills whole sequences and leaves a
  remainder. All pieces are then placed largest first, each in the open sequence with the
  least room that still fits it (best-fit decreasing). Few positions are left empty, and no
  document is cut more often than its length forces.
- `concat`: documents in order, cut wherever a sequence ends (the classic concat-and-chunk).

Position `i` of a segment is trained to predict the document's next token; a document's last
token (its EOS) has no target. With document masking, position ids restart at every segment,
which is how attention learns the boundaries (`transformers` turns restarting position ids
into a block-diagonal causal mask for SDPA, and into variable-length sequences for
flash-attention). Unfilled positions are padding: no target, and their own position ids.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ipt.losses import IGNORE

PACKINGS = ("bestfit", "concat")


@dataclass
class Packing:
    """Segments of all sequences of one shard, flat; sequence i is `[offsets[i], offsets[i+1])`."""

    doc: np.ndarray  # int64
    start: np.ndarray  # int64
    length: np.ndarray  # int64
    offsets: np.ndarray  # int64, len = sequences + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def segments(self, i: int) -> range:
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))

    def fill(self, seq_len: int) -> float:
        return float(self.length.sum()) / max(1, len(self) * seq_len)


def _from_bins(bins: list[list[tuple[int, int, int]]]) -> Packing:
    flat = [seg for b in bins for seg in b]
    arr = np.asarray(flat, dtype=np.int64).reshape(-1, 3)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
    return Packing(arr[:, 0], arr[:, 1], arr[:, 2], offsets)


def pack_concat(doc_lens: np.ndarray, seq_len: int) -> Packing:
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
            start += take
            room -= take
    if not bins[-1]:
        bins.pop()
    return _from_bins(bins)


def pack_bestfit(doc_lens: np.ndarray, seq_len: int) -> Packing:
    bins: list[list[tuple[int, int, int]]] = []
    pieces: list[tuple[int, int, int]] = []  # (length, doc, start) of what is left to place
    for d, n in enumerate(doc_lens.tolist()):
        full = n // seq_len
        bins.extend([[(d, i * seq_len, seq_len)] for i in range(full)])
        if n % seq_len:
            pieces.append((n % seq_len, d, full * seq_len))
    pieces.sort(key=lambda p: (-p[0], p[1]))  # largest first; ties in document order
    open_bins: list[tuple[int, int]] = []  # (room, bin index), sorted
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
    return _from_bins(bins)


def pack(doc_lens: np.ndarray, seq_len: int, how: str) -> Packing:
    if how not in PACKINGS:
        raise ValueError(f"packing={how!r}; expected one of {PACKINGS}")
    return pack_bestfit(doc_lens, seq_len) if how == "bestfit" else pack_concat(doc_lens, seq_len)


def assemble(tokens: np.ndarray, doc_starts: np.ndarray, doc_lens: np.ndarray, packing: Packing,
             i: int, seq_len: int, pad_id: int, doc_masking: bool,
             loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays of packed sequence `i`: input ids, targets and position ids."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for s in packing.segments(i):
        d, start, n = int(packing.doc[s]), int(packing.start[s]), int(packing.length[s])
        _put(ids[at:at + n], labels[at:at + n], tokens, int(doc_starts[d]) + start,
             start + n == int(doc_lens[d]), loss_mask)
        positions[at:at + n] = np.arange(n) if doc_masking else np.arange(at, at + n)
        at += n
    if at < seq_len:  # padding gets positions of its own, so it forms its own "document"
        positions[at:] = np.arange(seq_len - at) if doc_masking else np.arange(at, seq_len)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def piece(tokens: np.ndarray, base: int, n: int, ends_document: bool,
          loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays of a sequence that is one piece of one document: `n` tokens from flat
    offset `base` of a shard (Dataset Decomposition, `ipt.data.pieces`)."""
    ids = np.empty(n, dtype=np.int64)
    labels = np.full(n, IGNORE, dtype=np.int64)
    _put(ids, labels, tokens, base, ends_document, loss_mask)
    return {"input_ids": ids, "labels": labels, "position_ids": np.arange(n, dtype=np.int64)}


def _put(ids: np.ndarray, labels: np.ndarray, tokens: np.ndarray, base: int,
         ends_document: bool, loss_mask: np.ndarray | None) -> None:
    """Fill a segment's input ids and targets from the tokens at flat offset `base`."""
    n = len(ids)
    ids[:] = tokens[base:base + n]
    # targets: the next token of the same document (which may lie past the segment, in the
    # document's next piece); a document's last token (its EOS) has none
    got = n - 1 if ends_document else n
    labels[:got] = tokens[base + 1:base + 1 + got]
    if loss_mask is not None:
        labels[:got][loss_mask[base + 1:base + 1 + got] == 0] = IGNORE
