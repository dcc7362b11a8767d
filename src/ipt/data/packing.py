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


def pack_concat(doc_lens: np.ndarray, seq_len: int) -> Packing:
    """The documents end to end, cut at every multiple of `seq_len`: a segment runs between
    consecutive cuts of either kind (document ends and sequence ends)."""
    n = np.asarray(doc_lens, dtype=np.int64)
    ends = np.cumsum(n)
    total = int(ends[-1]) if len(n) else 0
    cuts = np.sort(np.concatenate([ends, np.arange(0, total + 1, seq_len, dtype=np.int64)]))
    cuts = cuts[np.diff(cuts, prepend=-1) > 0]
    at, length = cuts[:-1], np.diff(cuts)
    doc = np.searchsorted(ends, at, side="right")  # empty documents hold no segment
    sequences = -(-total // seq_len)
    offsets = np.searchsorted(at // seq_len, np.arange(sequences + 1), side="left")
    return Packing(doc, at - (ends[doc] - n[doc]), length, offsets.astype(np.int64))


def pack_bestfit(doc_lens: np.ndarray, seq_len: int) -> Packing:
    """Whole sequences of long documents first, in document order; then the remainders,
    largest first (ties in document order), each into the open sequence with the least room
    that fits it, or a new one (`_best_fit`)."""
    n = np.asarray(doc_lens, dtype=np.int64)
    full = n // seq_len
    whole = int(full.sum())
    whole_doc = np.repeat(np.arange(len(n), dtype=np.int64), full)
    whole_start = (np.arange(whole, dtype=np.int64) - np.repeat(np.cumsum(full) - full, full))
    rest = n % seq_len
    has = np.flatnonzero(rest)
    docs = has[np.lexsort((has, -rest[has]))]
    sequence = _best_fit(rest[docs], seq_len)
    placed = np.argsort(sequence, kind="stable")  # by sequence, then in placement order
    docs = docs[placed]
    per_sequence = np.bincount(sequence, minlength=int(sequence.max(initial=-1)) + 1)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(
        [np.ones(whole, dtype=np.int64), per_sequence]))]).astype(np.int64)
    return Packing(np.concatenate([whole_doc, docs]),
                   np.concatenate([whole_start * seq_len, full[docs] * seq_len]),
                   np.concatenate([np.full(whole, seq_len, dtype=np.int64), rest[docs]]),
                   offsets)


def _best_fit(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """The sequence each piece goes to, for pieces sorted largest first: best fit, the open
    sequence with the least room that still holds the piece (the lowest-numbered among
    equals), else a new one.

    Exactly the piece-by-piece rule, done a run of equal pieces at a time. The open sequences
    are kept in classes by their room. For pieces of length n, the class of least room r >= n
    takes them: its first sequence takes floor(r/n) pieces (after each, it still has the least
    fitting room), then the next sequence, and so on. So a run of equal pieces costs a few
    array operations per class it reaches, and the whole packing a few per distinct length.
    """
    out = np.empty(len(lengths), dtype=np.int64)
    classes: dict[int, np.ndarray] = {}  # room -> its open sequences, ascending
    rooms: list[int] = []  # the rooms that have open sequences, ascending
    opened = 0

    def add(room: int, ids: np.ndarray) -> None:
        if room == 0 or not len(ids):
            return
        if room in classes:
            classes[room] = np.sort(np.concatenate([classes[room], ids]))
        else:
            classes[room] = ids
            bisect.insort(rooms, room)

    runs = np.flatnonzero(np.diff(lengths, prepend=-1, append=-1)).tolist()  # equal pieces
    for first, last in zip(runs[:-1], runs[1:], strict=True):
        n, at = int(lengths[first]), first
        while at < last:
            left = last - at
            i = bisect.bisect_left(rooms, n)
            if i == len(rooms):  # nothing fits: new sequences, floor(seq_len/n) pieces each
                k = seq_len // n
                out[at:last] = opened + np.arange(left) // k
                ids = opened + np.arange(-(-left // k), dtype=np.int64)
                opened += len(ids)
                add(seq_len - k * n, ids[: left // k])
                add(seq_len - left % k * n, ids[left // k:])
                break
            r = rooms[i]
            ids, k = classes[r], r // n
            filled = min(len(ids), left // k)
            out[at:at + filled * k] = np.repeat(ids[:filled], k)
            at += filled * k
            moved, keep = [(r - k * n, ids[:filled])], ids[filled:]
            if at < last and len(keep):  # fewer than k left: all go to the next sequence
                out[at:last] = keep[0]
                moved.append((r - (last - at) * n, keep[:1]))
                keep, at = keep[1:], last
            if len(keep):
                classes[r] = keep
            else:
                del classes[r]
                rooms.pop(i)
            for room, moving in moved:
                add(room, moving)
    return out


def pack(doc_lens: np.ndarray, seq_len: int, how: str) -> Packing:
    if how not in PACKINGS:
        raise ValueError(f"packing={how!r}; expected one of {PACKINGS}")
    return pack_bestfit(doc_lens, seq_len) if how == "bestfit" else pack_concat(doc_lens, seq_len)


def assemble(tokens: np.ndarray, doc_starts: np.ndarray, doc_lens: np.ndarray, packing: Packing,
             i: int, seq_len: int, pad_id: int, doc_masking: bool,
             loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays of packed sequence `i`: input ids, targets and position ids."""
    seg = slice(int(packing.offsets[i]), int(packing.offsets[i + 1]))
    doc, start, length = packing.doc[seg], packing.start[seg], packing.length[seg]
    return sequence(tokens, doc_starts[doc] + start, length, start + length == doc_lens[doc],
                    seq_len, pad_id, doc_masking, loss_mask)


def sequence(tokens: np.ndarray, bases: np.ndarray, lengths: np.ndarray, ends: np.ndarray,
             seq_len: int, pad_id: int, doc_masking: bool,
             loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays of a packed sequence from its segments: `lengths[j]` tokens from flat
    offset `bases[j]` of a shard, `ends[j]` whether that is where its document ends."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for base, n, last in zip(bases.tolist(), lengths.tolist(), ends.tolist(), strict=True):
        _put(ids[at:at + n], labels[at:at + n], tokens, base, bool(last), loss_mask)
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
