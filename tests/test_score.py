"""The SLM scoring stage: per-sequence statistics, keyed to the packing, resumable, by rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipt.config import ConfigError, ScoreConfig
from ipt.data.loader import PackedShards
from ipt.data.shards import ShardSet
from ipt.losses import IGNORE
from ipt.slm import score as sc


def test_the_median_counts_only_targets_inside_the_top_k():
    logits = torch.tensor([[[5.0, 4.0, 0.0], [5.0, 4.0, 0.0], [5.0, 4.0, 0.0],
                            [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, 2, IGNORE]])  # ranks 1, 2 and 3 of 3; the last: no target
    out = sc.sequence_scores(logits, labels, k=2)  # logits by hand, checked by arithmetic
    losses = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, :3], reduction="none")
    assert out[0, 0] == pytest.approx(losses[:2].median().item())  # token 2 is not in top-2
    assert out[0, 1] == pytest.approx(losses.mean().item())
    assert out[0, 2] == pytest.approx(2 / 3)


def config(data_dir, tiny_lm, **kw) -> ScoreConfig:
    base = {"sources": {"docs": str(data_dir / "shards" / "docstrings")}, "block_size": 64}
    return ScoreConfig(slm=str(tiny_lm), tokenizer=str(data_dir / "tokenizer"), seq_len=64,
                       batch_size=8, progress_bar="never", **{**base, **kw})


def test_scores_cover_every_packed_sequence_and_resume_by_block(data_dir, tiny_lm, tmp_path):
    import shutil

    src = tmp_path / "docstrings"
    shutil.copytree(data_dir / "shards" / "docstrings", src)
    cfg = config(data_dir, tiny_lm, sources={"docs": str(src)})
    path = sc.score(cfg)["docs"]["scores"]
    scores = np.load(path)
    n = len(PackedShards(ShardSet(src / "train"), 64))
    assert scores.shape == (n, 3) and np.isfinite(scores[:, 1]).all()
    assert ((scores[:, 2] >= 0) & (scores[:, 2] <= 1)).all()
    parts = sorted((src / "scores" / "parts").rglob("block_*.npy"))
    kept = {p: p.stat().st_mtime_ns for p in parts[1:]}
    parts[0].unlink()
    (src / "scores" / path.split("/")[-1]).unlink()  # as if killed before the merge
    again = np.load(sc.score(cfg)["docs"]["scores"])
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # only block 0 redone
    np.testing.assert_array_equal(again, scores)


def test_ranks_split_the_blocks_and_the_last_merges(data_dir, tiny_lm, tmp_path, monkeypatch):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(data_dir / "shards" / "docstrings", d)
    single = np.load(sc.score(config(data_dir, tiny_lm,
                                     sources={"docs": str(one)}))["docs"]["scores"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert sc.score(config(data_dir, tiny_lm,
                           sources={"docs": str(two)}))["docs"]["scores"] is None
    monkeypatch.setenv("RANK", "1")
    merged = np.load(sc.score(config(data_dir, tiny_lm,
                                     sources={"docs": str(two)}))["docs"]["scores"])
    np.testing.assert_array_equal(merged, single)


def test_a_folder_that_is_not_a_prepared_source_is_refused(data_dir, tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="not a prepared source"):
        sc.score(config(data_dir, tiny_lm, sources={"x": str(tmp_path)}))


def test_the_entry_point_scores_from_the_command_line(data_dir, tiny_lm, tmp_path):
    import shutil

    from .conftest import run_entry

    src = tmp_path / "docstrings"
    shutil.copytree(data_dir / "shards" / "docstrings", src)
    proc = run_entry("data_pipeline/score.py", [
        f"slm={tiny_lm}", f"tokenizer={data_dir / 'tokenizer'}", f"+sources.docs={src}",
        "seq_len=64", "soft_labels=4", "progress_bar=never"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (src / "scores").is_dir() and list((src / "soft_labels").glob("*/meta.json"))
