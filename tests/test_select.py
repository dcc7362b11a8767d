"""SLM-scored data selection, built into the global order of the early phase."""

from __future__ import annotations

import numpy as np
import pytest

from ipt.config import SelectConfig
from ipt.data.loader import MixtureOrder
from ipt.data.sampling import SelectedOrder
from ipt.slm.select import choose

from .conftest import run_pretrain, scored_copy, tiny_overrides


def test_top_selection_takes_the_highest_scores_and_ranks_nan_last():
    scores = np.array([0.5, np.nan, 2.0, 1.0, 3.0, 0.1], dtype=np.float32)
    picked = choose(scores, SelectConfig(fraction=0.5), np.random.default_rng(0))
    assert picked.tolist() == [2, 3, 4]
    everything = choose(scores, SelectConfig(fraction=1.0), np.random.default_rng(0))
    assert everything.tolist() == list(range(6))


def test_sampling_with_scores_as_logits_favours_high_scores_reproducibly():
    scores = np.linspace(-3, 3, 1000).astype(np.float32)
    cfg = SelectConfig(fraction=0.2, mode="sample")
    a = choose(scores, cfg, np.random.default_rng(1))
    assert np.array_equal(a, choose(scores, cfg, np.random.default_rng(1)))
    assert len(a) == 200 and len(set(a.tolist())) == 200  # without replacement
    assert scores[a].mean() > 1.0  # far above the mean of all (0)


def test_the_early_samples_come_only_from_the_selection_then_the_full_mixture():
    full = MixtureOrder([100, 50], [0.5, 0.5], seed=0, fingerprint="f")
    chosen = [np.arange(0, 100, 10), np.arange(0, 50, 5)]  # 10 of each source
    order = SelectedOrder(full, chosen, [0.5, 0.5], 0, until=40, max_repeat=8, names=["a", "b"])
    allowed = set(range(0, 100, 10)) | {100 + i for i in range(0, 50, 5)}
    assert {order[k] for k in range(40)} <= allowed
    assert [order[k] for k in range(40, 200)] == [full[k] for k in range(40, 200)]
    assert order.key != full.key  # a checkpoint of one never resumes the other


@pytest.fixture(scope="module")
def scored(data_dir, tiny_lm, tmp_path_factory):
    """A copy of the session's data with scores (the shared data stays unscored)."""
    return scored_copy(data_dir, tiny_lm, tmp_path_factory.mktemp("scored"), block_size=256)[0]


def test_training_draws_its_early_steps_from_the_selection(scored, tmp_path):
    run = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(scored, run, **{
        "train.max_steps": 4, "data.select.fraction": 0.25, "data.select.steps": 2}))
    assert "data selection: the first 2 steps draw from the top 25%" in proc.stderr


@pytest.mark.parametrize(("override", "message"), [
    ({"data.select.fraction": 0}, "must be in (0, 1]"),
    ({"data.select.fraction": 1.5}, "must be in (0, 1]"),
    ({"data.select.fraction": 0.5}, "needs data.select.steps"),
    ({"data.select.fraction": 0.5, "data.select.steps": 2, "data.seq_len": 32},
     "has no scores for its packing"),
])
def test_a_selection_that_cannot_run_fails_at_start_with_the_reason(scored, tmp_path,
                                                                    override, message):
    proc = run_pretrain(tiny_overrides(scored, tmp_path / "run", **override), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
