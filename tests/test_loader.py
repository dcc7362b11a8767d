"""The global order and the loader: a pure function of (seed, fingerprint, consumed)."""

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from ipt.config import ConfigError
from ipt.data.loader import (
    MixtureOrder,
    PackedShards,
    RankBatches,
    eval_batches,
    shares,
    train_loader,
)
from ipt.data.permutation import Permutation
from ipt.data.shards import ShardError, ShardSet, write_shards


def order(n=100, seed=7, fp="fp"):
    return MixtureOrder([n], [1.0], seed, fp)


def test_one_source_is_a_permutation_per_epoch_and_reproducible():
    a, b = order(), order()
    first = [a[k] for k in range(100)]
    assert sorted(first) == list(range(100))
    assert first == [b[k] for k in range(100)]
    assert [a[k] for k in range(100, 200)] != first  # a new epoch reshuffles


def test_order_depends_on_seed_and_fingerprint():
    base = [order(50, 1, "x")[k] for k in range(50)]
    assert base != [order(50, 2, "x")[k] for k in range(50)]
    assert base != [order(50, 1, "y")[k] for k in range(50)]


def test_mixture_gives_each_source_its_weighted_share():
    mix = MixtureOrder([300, 100], [0.5, 0.5], 0, "fp")
    epoch = [mix[k] for k in range(mix.epoch_len)]
    small = [i for i in epoch if i >= 300]
    assert len(epoch) == 400 and len(small) == 200  # half the epoch from the small source
    assert sorted(set(small)) == list(range(300, 400))  # every sequence of it, each twice
    assert max(np.bincount(small)) == 2
    big = [i for i in epoch if i < 300]
    assert len(set(big)) == 200  # the big source is subsampled without repeats


def test_mixture_subsample_differs_between_epochs():
    mix = MixtureOrder([300, 100], [0.5, 0.5], 0, "fp")
    e0 = {mix[k] for k in range(400) if mix[k] < 300}
    e1 = {mix[k] for k in range(400, 800) if mix[k] < 300}
    assert e0 != e1


def test_repetition_beyond_the_cap_is_refused_with_the_source_named():
    with pytest.raises(ConfigError, match="source tiny: .* repetition of 8.0x > data.max_repeat=4"):
        MixtureOrder([900, 100], [0.2, 0.8], 0, "fp", max_repeat=4, names=["big", "tiny"])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 2**20 + 3, 3_000_001])
def test_a_keyed_permutation_reaches_every_element_once(n):
    perm = Permutation(n, key=12345)
    everything = perm.take(np.arange(n))
    assert np.array_equal(np.sort(everything), np.arange(n))
    assert perm[n - 1] == everything[n - 1]
    if n > 64:  # shuffled, and another key shuffles otherwise
        assert not np.array_equal(everything, np.arange(n))
        assert not np.array_equal(Permutation(n, key=54321).take(np.arange(n)), everything)


def test_a_large_mixture_keeps_its_shares_and_never_repeats_within_a_pass():
    sizes = [2_000_000, 500_000, 7]
    mix = MixtureOrder(sizes, [0.5, 0.5, 1e-9], seed=3, fingerprint="big")
    epoch = mix.take(np.arange(mix.epoch_len))
    source = np.searchsorted(np.cumsum(sizes), epoch, side="right")
    assert np.bincount(source, minlength=3).tolist() == mix.counts.tolist()
    big = epoch[source == 0]
    assert len(np.unique(big)) == len(big)  # subsampled, each sequence at most once
    small = np.bincount(epoch[source == 1] - sizes[0], minlength=sizes[1])
    assert small.min() == 2 and small.max() == 3  # 2.5 passes: every sequence 2 or 3 times
    again = MixtureOrder(sizes, [0.5, 0.5, 1e-9], seed=3, fingerprint="big")
    picks = np.random.default_rng(0).integers(0, 10**12, 1000)
    assert np.array_equal(again.take(picks), mix.take(picks))  # a pure function of the key
    assert not np.array_equal(MixtureOrder(sizes, [0.5, 0.5, 1e-9], seed=4,
                                           fingerprint="big").take(picks), mix.take(picks))


def test_the_order_of_a_trillion_token_corpus_costs_no_memory_to_build_or_resume():
    """About 250M sequences of 4096 tokens: nothing of that size is built, and a sample
    of the hundredth epoch is found at once."""
    import tracemalloc

    tracemalloc.start()
    mix = MixtureOrder([200_000_000, 44_000_000], [0.8, 0.2], 0, "1T")
    far = [mix[k] for k in range(100 * mix.epoch_len, 100 * mix.epoch_len + 64)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000 and len(set(far)) == 64


def test_shares_add_up_exactly():
    assert shares([10, 10, 10], [1, 1, 1]).tolist() == [10, 10, 10]
    assert shares([7, 0, 6], [1, 2, 1]).sum() == 13


def global_batches(order, consumed, world, steps, gb=12, mb=2):
    per_rank = [iter(RankBatches(order, consumed, gb, mb, r, world)) for r in range(world)]
    out = []
    for _ in range(steps):
        samples = []
        for it in per_rank:
            for _ in range(gb // world // mb):
                samples += next(it)
        out.append(sorted(samples))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_global_batches_do_not_depend_on_world_size(world):
    o = MixtureOrder([30, 10], [0.7, 0.3], 0, "fp")
    assert global_batches(o, 0, world, 5) == global_batches(o, 0, 1, 5)


def test_resume_from_counter_continues_with_next_unseen_samples():
    o = MixtureOrder([30, 10], [0.7, 0.3], 0, "fp")
    straight = global_batches(o, 0, 2, 6)
    resumed = global_batches(o, 3 * 12, 3, 3)  # 3 steps done on 2 ranks, resumed on 3
    assert resumed == straight[3:]


def test_loader_yields_packed_batches(data_dir: Path):
    ds = PackedShards(ShardSet(data_dir / "shards" / "docstrings" / "train"), seq_len=32)
    batch = next(train_loader(ds, MixtureOrder([len(ds)], [1], 0, "x"), 0, 4, 2, 0, 1))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    assert batch["input_ids"].shape == (2, 32)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_the_batches_of_the_global_order(data_dir: Path, workers):
    """On its thread or with worker processes, rank 1 of 2 gets exactly its slice."""
    ds = PackedShards(ShardSet(data_dir / "shards" / "docstrings" / "train"), seq_len=32)
    order = MixtureOrder([len(ds)], [1], 0, "x")
    loader = train_loader(ds, order, 8, 4, 2, 1, 2, workers)
    for indices in islice(RankBatches(order, 8, 4, 2, 1, 2), 3):
        expected = torch.stack([ds[i]["input_ids"] for i in indices])
        assert torch.equal(next(loader)["input_ids"], expected)


def test_closing_the_loader_stops_its_thread(data_dir: Path):
    ds = PackedShards(ShardSet(data_dir / "shards" / "docstrings" / "train"), seq_len=32)
    loader = train_loader(ds, MixtureOrder([len(ds)], [1], 0, "x"), 0, 4, 2, 0, 1)
    next(loader)
    loader.close()
    assert not loader.thread.is_alive()


def test_loader_errors_surface_on_the_training_thread():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise ValueError(f"record {i} is corrupt")

    with pytest.raises(ValueError, match="is corrupt"):
        next(train_loader(Broken(), MixtureOrder([10], [1], 0, "x"), 0, 2, 2, 0, 1))


def test_truncated_shard_is_named(tmp_path: Path):
    write_shards([[1, 2, 3], [4, 5]], tmp_path, 512, "fp")
    tokens = next(tmp_path.glob("*.tokens"))
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"shard_00000.tokens has 8 bytes.*truncated"):
        ShardSet(tmp_path)


def test_missing_shard_file_is_named(tmp_path: Path):
    write_shards([[1, 2, 3]], tmp_path, 512, "fp")
    next(tmp_path.glob("*.docs")).unlink()
    with pytest.raises(ShardError, match="docs is missing"):
        ShardSet(tmp_path)


def test_empty_dataset_is_refused(tmp_path: Path):
    write_shards([[]], tmp_path, 512, "fp")
    with pytest.raises(ShardError, match="empty dataset"):
        ShardSet(tmp_path)


def test_directory_without_shards_is_refused(tmp_path: Path):
    with pytest.raises(ShardError, match="holds no token shards"):
        ShardSet(tmp_path)


def test_uint16_is_used_when_the_vocabulary_fits(tmp_path: Path):
    write_shards([[1, 65535]], tmp_path / "a", 65536, "fp")
    write_shards([[1, 65536]], tmp_path / "b", 70000, "fp")
    assert ShardSet(tmp_path / "a").shards[0].tokens.dtype == np.uint16
    assert ShardSet(tmp_path / "b").shards[0].tokens.dtype == np.uint32


@pytest.mark.parametrize(("size", "micro", "world", "batches"),
                         [(3, 1, 2, 4), (5, 2, 2, 4), (1, 2, 4, 1), (7, 3, 3, 2), (0, 2, 2, 3),
                          (100, 4, 2, 3)])
def test_every_rank_runs_as_many_eval_batches_and_each_sequence_counts_once(size, micro, world,
                                                                            batches):
    """Under ZeRO-3 an eval forward is a collective: unequal counts per rank hang the job."""
    split = [eval_batches(range(size), micro, r, world, batches) for r in range(world)]
    assert len({len(s) for s in split}) == 1
    assert all(len(b) <= micro for s in split for b in s)
    real = sorted(i for s in split for b in s for i in b)
    assert real == list(range(min(size, micro * world * batches)))
