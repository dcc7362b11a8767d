"""Dataset Decomposition's pieces and bucket order: the spec's guarantees on real documents."""

from __future__ import annotations

import numpy as np
import pytest

from ipt.config import CURRICULA, ConfigError
from ipt.data.pieces import DecomposedShards, decompose
from ipt.data.shards import ShardError, ShardSet, ShardWriter
from ipt.decompose.order import DecomposedOrder, EarlyPhase, PieceBatches, bucket_order, piece_ids
from ipt.losses import IGNORE


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


# --- pieces as training sequences, their order, and each rank's share -------------------

def write_shard(directory, docs, masks=None):
    """One shard of `docs` (token lists), with a loss-mask channel when `masks` is given."""
    w = ShardWriter(directory / "shard_00000", 1000, "fp",
                    channels={"loss_mask": "uint8"} if masks else {})
    for i, d in enumerate(docs):
        w.add(d, **({"loss_mask": masks[i]} if masks else {}))
    w.close()
    return ShardSet(directory)


def test_a_piece_is_its_documents_tokens_with_next_token_targets(tmp_path):
    docs = [list(range(1, 201)), list(range(300, 427))]  # 200 = 128+64+8, 127 = 64+32+16+8+7
    data = DecomposedShards(write_shard(tmp_path, docs), 8, 128)
    assert data.total == 327 and data.dropped == 7 and data.lengths == [128, 64, 32, 16, 8]
    seen = []
    for i in range(len(data)):
        item = data[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert len(ids) == data.length_of(i) and item["position_ids"].tolist() == list(range(len(ids)))
        doc = next(d for d in docs if ids[0] in d)
        at = doc.index(ids[0])
        assert ids == doc[at:at + len(ids)]
        # the next token of the document, even past the piece; none after the document's end
        expected = doc[at + 1:at + 1 + len(ids)]
        assert labels == expected + [IGNORE] * (len(ids) - len(expected))
        seen.append((docs.index(doc), at, len(ids)))
    assert sorted(seen) == [(0, 0, 128), (0, 128, 64), (0, 192, 8),
                            (1, 0, 64), (1, 64, 32), (1, 96, 16), (1, 112, 8)]


def test_a_loss_mask_hides_the_targets_it_covers(tmp_path):
    doc = list(range(1, 65))
    mask = [0] * 32 + [1] * 32  # a prompt, then its response
    data = DecomposedShards(write_shard(tmp_path, [doc], [mask]), 32, 32)
    first, second = data[0]["labels"].tolist(), data[1]["labels"].tolist()
    assert first == [IGNORE] * 31 + [33]  # the target of position 31 is token 33, trained
    assert second == list(range(34, 65)) + [IGNORE]


def test_a_source_with_no_piece_long_enough_is_refused(tmp_path):
    with pytest.raises(ShardError, match="min_len=64"):
        DecomposedShards(write_shard(tmp_path, [[1, 2, 3]] * 4), 64, 128)


@pytest.fixture(scope="module")
def demo_pieces(data_dir):
    return [DecomposedShards(ShardSet(data_dir / "shards" / s / "train"), 16, 64)
            for s in ("docstrings", "packages")]


def test_every_step_holds_the_same_tokens_from_one_bucket_and_no_piece_twice(demo_pieces):
    data = demo_pieces[0]
    order = DecomposedOrder(piece_ids([data]), [1.0], 8 * 64, "grow_p2", 2, 0, "fp")
    steps = [order.batch(s) for s in range(order.epoch_steps)]
    assert steps[0][0] == 64  # the longest first
    used = np.concatenate([ids for _, ids in steps])
    assert len(np.unique(used)) == len(used)  # no piece twice within an epoch
    for L, ids in steps:
        assert len(ids) * L == 8 * 64
        assert all(data.length_of(int(i)) == L for i in ids)
    counts = {L: sum(1 for length, _ in steps if length == L) for L in order.lengths}
    assert counts == {L: n // 2 * 2 for L, n in order.batches.items()}  # as the curriculum says
    assert 0 <= order.left_out < 0.05
    # the same settings give the same order; another seed another one; the next epoch anew
    again = DecomposedOrder(piece_ids([data]), [1.0], 8 * 64, "grow_p2", 2, 0, "fp")
    other = DecomposedOrder(piece_ids([data]), [1.0], 8 * 64, "grow_p2", 2, 1, "fp")
    assert all(np.array_equal(again.batch(s)[1], steps[s][1]) for s in range(0, 50, 7))
    assert not all(np.array_equal(other.batch(s)[1], steps[s][1]) for s in range(50))
    assert not np.array_equal(order.batch(order.epoch_steps + 1)[1], steps[1][1])


def test_sources_mix_by_tokens_each_with_its_own_lengths(demo_pieces):
    order = DecomposedOrder(piece_ids(demo_pieces), [0.75, 0.25], 8 * 64, "natural", 1, 0,
                            "fp", names=["docstrings", "packages"])
    tokens = [0, 0]
    first_packages = len(demo_pieces[0])
    for s in range(order.epoch_steps):
        L, ids = order.batch(s)
        tokens[1] += L * int((ids >= first_packages).sum())
        tokens[0] += L * int((ids < first_packages).sum())
    assert tokens[0] / sum(tokens) == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ConfigError, match="source packages: its weight asks for"):
        DecomposedOrder(piece_ids(demo_pieces), [0.01, 0.99], 8 * 64, "natural", 1, 0, "fp",
                        max_repeat=1.0, names=["docstrings", "packages"])


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_the_global_batch(demo_pieces, world_size):
    """8 sequences of 64 tokens per step, micro-batches of 1 x 64 tokens per rank."""
    order = DecomposedOrder(piece_ids(demo_pieces[:1]), [1.0], 8 * 64, "uniform", 1, 3, "fp")
    accum = 8 // world_size
    ranks = [iter(PieceBatches(order, 5, accum, r, world_size)) for r in range(world_size)]
    for step in range(5, 12):
        L, ids = order.batch(step)
        micro = [[next(it) for _ in range(accum)] for it in ranks]
        assert all(len(m) == 64 // L for rank in micro for m in rank)  # micro x seq_len / L
        assert np.array_equal(np.concatenate([m for rank in micro for m in rank]), ids)


def test_the_early_phase_draws_from_the_selection_then_the_whole(demo_pieces):
    data = demo_pieces[0]
    keep = [np.arange(0, len(data), 3)]
    full = DecomposedOrder(piece_ids([data]), [1.0], 8 * 64, "grow_p2", 1, 0, "fp")
    early = DecomposedOrder(piece_ids([data], keep), [1.0], 8 * 64, "grow_p2", 1, 0, "sel")
    phased = EarlyPhase(early, full, 20)
    assert all(set(phased.batch(s)[1].tolist()) <= set(keep[0].tolist()) for s in range(20))
    assert all(np.array_equal(phased.batch(s)[1], full.batch(s)[1]) for s in range(20, 30))


def test_a_bucket_no_source_fills_is_left_out_and_every_step_of_an_epoch_builds(caplog):
    """Source 1's few 16-token pieces round to none at its weight, and source 0 has none:
    the 16-token bucket is empty. Every step of an epoch is built, none of 16 tokens, and the
    empty bucket is said once."""
    sources = [{64: range(0, 400), 32: range(400, 800)}, {16: range(800, 802),
                                                          32: range(802, 900)}]
    with caplog.at_level("INFO", logger="ipt.decompose.order"):
        order = DecomposedOrder(sources, [0.95, 0.05], 8 * 64, "grow_p2", 2, 0, "fp",
                                names=["big", "small"])
    assert 16 not in order.batches or order.batches[16] == 0
    lengths = [order.batch(t)[0] for t in range(order.epoch_steps)]
    assert set(lengths) == {32, 64}
    assert caplog.text.count("no 16-token step") == 1
