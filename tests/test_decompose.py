"""Dataset Decomposition's pieces and bucket order: the spec's guarantees on real documents."""

from __future__ import annotations

import numpy as np
import pytest

from ipt.config import ConfigError
from ipt.data.decompose import CURRICULA, bucket_order, decompose
from ipt.data.shards import ShardSet


def test_pieces_are_disjoint_powers_of_two_inside_documents(data_dir):
    shard = ShardSet(data_dir / "shards" / "docstrings" / "train").shards[0]
    ends = shard.doc_ends.astype(np.int64)
    lens = ends - np.concatenate([[0], ends[:-1]])
    pieces = decompose(lens, 8, 64)
    assert set(pieces.starts) == {8, 16, 32, 64}
    assert pieces.covered + pieces.dropped == pieces.total == int(lens.sum())
    covered = [np.zeros(n, dtype=np.int64) for n in lens]
    for length, rows in pieces.starts.items():
        for doc, start in rows.tolist():
            assert start + length <= lens[doc]
            covered[doc][start:start + length] += 1
    assert max(int(c.max(initial=0)) for c in covered) == 1  # disjoint
    # what is not covered is each document's tail, shorter than min_len
    for n, c in zip(lens.tolist(), covered, strict=True):
        tail = n - int(c.sum())
        assert tail < 8 and not c[n - tail:].any()


@pytest.mark.parametrize(("n", "expected"), [
    (200, {64: [0, 64, 128], 8: [192]}),  # 200 = 3 x 64 + 8
    (127, {64: [0], 32: [64], 16: [96], 8: [112]}),  # 127 = 64 + 32 + 16 + 8, 7 dropped
    (5, {}),
])
def test_a_document_is_cut_largest_piece_first(n, expected):
    pieces = decompose(np.array([n]), 8, 64)
    got = {L: rows[:, 1].tolist() for L, rows in pieces.starts.items() if len(rows)}
    assert got == expected
    assert pieces.dropped == n - sum(L * len(v) for L, v in expected.items())


def test_limits_must_be_powers_of_two_in_order():
    for lo, hi in ((6, 64), (8, 100), (128, 64)):
        with pytest.raises(ConfigError):
            decompose(np.array([10]), lo, hi)


@pytest.mark.parametrize("curriculum", CURRICULA)
def test_an_order_uses_each_batch_once_longest_first_and_is_reproducible(curriculum):
    batches = {64: 5, 128: 9, 256: 4, 512: 8}
    cycles = 1 if curriculum == "natural" else 2
    order = bucket_order(batches, curriculum, cycles, np.random.default_rng(7))
    again = bucket_order(batches, curriculum, cycles, np.random.default_rng(7))
    assert np.array_equal(order, again)
    assert order[0] == 512
    expected = {L: n if cycles == 1 else n // cycles * cycles for L, n in batches.items()}
    assert {L: int((order == L).sum()) for L in batches} == expected


@pytest.mark.parametrize("curriculum", ["grow_p2", "grow_linear"])
def test_growing_curricula_lengthen_sequences_within_each_cycle(curriculum):
    batches = {64: 400, 128: 400, 256: 400, 512: 400}
    order = bucket_order(batches, curriculum, 4, np.random.default_rng(0))
    for cycle in np.split(order, 4):
        first, second = np.split(cycle, 2)
        assert first[1:].mean() < second.mean()  # (step 0 is the longest bucket)


def test_unknown_curriculum_is_refused():
    with pytest.raises(ConfigError, match="curriculum='grow'"):
        bucket_order({64: 1}, "grow", 1, np.random.default_rng(0))
