"""Sequence indexes: the vectorised packings equal the piece-by-piece rule, an index is built
once and shared, and a stale or damaged one is rebuilt, never used."""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import sys

import numpy as np
import pytest

from ipt.data.loader import PackedShards
from ipt.data.packing import pack
from ipt.data.pieces import DecomposedShards, decompose
from ipt.data.shards import ShardSet, ShardWriter

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from packing import reference_bestfit, reference_concat  # noqa: E402  (the baselines)


def segments(p):
    return [[(int(p.doc[s]), int(p.start[s]), int(p.length[s])) for s in p.segments(i)]
            for i in range(len(p))]


@pytest.mark.parametrize("how,reference", [("bestfit", reference_bestfit),
                                           ("concat", reference_concat)])
def test_the_vectorised_packing_is_the_piece_by_piece_one(how, reference):
    rng = np.random.default_rng(0)
    for trial in range(200):
        seq_len = int(rng.choice([4, 8, 16, 64, 256]))
        high = seq_len + 1 if trial % 2 else 5 * seq_len
        lens = rng.integers(0 if trial % 3 else 1, high, int(rng.integers(1, 300)))
        assert segments(pack(lens, seq_len, how)) == reference(lens, seq_len), (seq_len, lens)


def shards(tmp_path, docs=300, seed=0):
    rng = np.random.default_rng(seed)
    w = ShardWriter(tmp_path / "shards" / "s_00000", 1000, "fp")
    for _ in range(docs):
        w.add(rng.integers(3, 1000, int(rng.integers(2, 200))))
    w.close()
    return ShardSet(tmp_path / "shards")


def mapped(a: np.ndarray) -> bool:
    """Whether `a` reads a memory-mapped file (`ipt.data.shards.map_array`)."""
    return isinstance(a.base, memoryview) and isinstance(a.base.obj, mmap.mmap)


def items(ds):
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


def test_the_pieces_of_dataset_decomposition_are_an_index_too(tmp_path):
    """Built once, memory-mapped, and the same pieces as `decompose` cuts, shard by shard,
    numbered bucket by bucket, longest first."""
    first = DecomposedShards(shards(tmp_path), 8, 64)
    built = first.index.directory
    assert built.name.startswith("pieces-8-64-") and mapped(first.index["base"])
    mtime = (built / "index.json").stat().st_mtime_ns
    again = DecomposedShards(ShardSet(tmp_path / "shards"), 8, 64)
    assert (built / "index.json").stat().st_mtime_ns == mtime
    shard = again.shards.shards[0]
    ends = shard.doc_ends.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    cut = decompose(ends - starts, 8, 64)
    expected = [(L, int(starts[d] + o)) for L in (64, 32, 16, 8) for d, o in cut.starts[L]]
    assert [(again.length_of(i), int(again.index["base"][i])) for i in range(len(again))] \
        == expected
    assert (again.total, again.dropped) == (cut.total, cut.dropped)


def test_an_index_is_built_once_and_reused(tmp_path):
    first = PackedShards(shards(tmp_path), 64)
    built = first.index.directory
    assert built.parent == tmp_path / "shards" / "index" and (built / "index.json").exists()
    mtime = (built / "index.json").stat().st_mtime_ns
    again = PackedShards(ShardSet(tmp_path / "shards"), 64)
    assert (built / "index.json").stat().st_mtime_ns == mtime
    assert items(again) == items(first) and mapped(again.offsets)
    other = PackedShards(ShardSet(tmp_path / "shards"), 32, "concat")  # other settings
    assert other.index.directory != built and len(other) > len(first)


@pytest.mark.parametrize("damage", ["truncated", "metadata", "stale", "no-metadata"])
def test_a_damaged_or_stale_index_is_rebuilt_not_used(tmp_path, damage, caplog):
    good = items(PackedShards(shards(tmp_path), 64))
    built = PackedShards(ShardSet(tmp_path / "shards"), 64).index.directory
    meta = json.loads((built / "index.json").read_text())
    if damage == "truncated":
        base = built / "base.bin"
        base.write_bytes(base.read_bytes()[:-8])
    elif damage == "metadata":
        (built / "index.json").write_text("{not json")
    elif damage == "stale":  # built from other shards under this name
        meta["shards"][0][1] += 1
        (built / "index.json").write_text(json.dumps(meta))
    else:
        (built / "index.json").unlink()
    with caplog.at_level("WARNING"):
        again = PackedShards(ShardSet(tmp_path / "shards"), 64)
    assert "rebuilding" in caplog.text
    assert items(again) == good
    assert not [p for p in built.parent.iterdir() if p.name.startswith((".tmp-", ".bad-"))]


def build(directory, seq_len, queue):
    ds = PackedShards(ShardSet(directory), seq_len)
    queue.put((str(ds.index.directory), len(ds)))


def test_concurrent_builders_leave_one_good_index(tmp_path):
    shards(tmp_path, docs=3000)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=build, args=(tmp_path / "shards", 64, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = {queue.get(timeout=10) for _ in procs}
    assert len(results) == 1 and all(p.exitcode == 0 for p in procs)
    root = tmp_path / "shards" / "index"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == \
        [next(iter(results))[0].rsplit("/", 1)[1]]


def test_without_a_writable_folder_the_error_names_data_index_dir(tmp_path):
    s = shards(tmp_path)
    (tmp_path / "shards" / "index").write_text("a file where the folder would go")
    with pytest.raises(Exception, match="data.index_dir"):
        PackedShards(s, 64)
    assert len(PackedShards(s, 64, index_dir=tmp_path / "elsewhere")) > 0
