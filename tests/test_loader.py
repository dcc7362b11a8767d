"""The global order and the loader: a pure function of (seed, fingerprint, consumed)."""

from pathlib import Path

import numpy as np
import pytest

from ipt.data.loader import ChunkedSequences, GlobalOrder, RankBatches, train_loader
from ipt.data.shards import ShardError, ShardSet, write_shards


def test_order_is_a_permutation_per_epoch_and_reproducible():
    a, b = GlobalOrder(100, 7, "fp"), GlobalOrder(100, 7, "fp")
    first = [a[k] for k in range(100)]
    assert sorted(first) == list(range(100))
    assert first == [b[k] for k in range(100)]
    assert [a[k] for k in range(100, 200)] != first  # a new epoch reshuffles


def test_order_depends_on_seed_and_fingerprint():
    base = [GlobalOrder(50, 1, "x")[k] for k in range(50)]
    assert base != [GlobalOrder(50, 2, "x")[k] for k in range(50)]
    assert base != [GlobalOrder(50, 1, "y")[k] for k in range(50)]


def global_batches(order, consumed, world, steps, gb=12, mb=2):
    """The set of samples each global batch covers, read through every rank."""
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
    order = GlobalOrder(40, 0, "fp")
    assert global_batches(order, 0, world, 5) == global_batches(order, 0, 1, 5)


def test_resume_from_counter_continues_with_next_unseen_samples():
    order = GlobalOrder(40, 0, "fp")
    straight = global_batches(order, 0, 2, 6)
    resumed = global_batches(order, 3 * 12, 3, 3)  # 3 steps done on 2 ranks, resumed on 3
    assert resumed == straight[3:]


def test_loader_yields_shifted_windows(data_dir: Path):
    ds = ChunkedSequences(ShardSet(data_dir / "train"), seq_len=32)
    batch = next(iter(train_loader(ds, 0, 0, 4, 2, 0, 1, num_workers=0)))
    assert batch["input_ids"].shape == (2, 32)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


def test_windows_cover_the_token_stream(data_dir: Path):
    shards = ShardSet(data_dir / "train")
    ds = ChunkedSequences(shards, seq_len=32)
    tokens = np.asarray(shards.shards[0].tokens)
    joined = np.concatenate([ds[i]["input_ids"].numpy() for i in range(3)])
    assert (joined == tokens[:96]).all()


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


def test_too_little_data_for_one_sequence_is_refused(tmp_path: Path):
    write_shards([[1, 2, 3]], tmp_path, 512, "fp")
    with pytest.raises(ShardError, match="do not fill one sequence"):
        ChunkedSequences(ShardSet(tmp_path), seq_len=8)


def test_uint16_is_used_when_the_vocabulary_fits(tmp_path: Path):
    write_shards([[1, 65535]], tmp_path / "a", 65536, "fp")
    write_shards([[1, 65536]], tmp_path / "b", 70000, "fp")
    assert ShardSet(tmp_path / "a").shards[0].tokens.dtype == np.uint16
    assert ShardSet(tmp_path / "b").shards[0].tokens.dtype == np.uint32
