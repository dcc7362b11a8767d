"""Loss anomalies on real training runs: spikes (a tight `train.spike_sigma` over a short
window, so that the ordinary step-to-step noise of a tiny model counts as one) and a diverged
run (an absurd learning rate makes the gradient norm infinite). Each action is checked by
what it leaves behind: skipped updates leave the weights bitwise unchanged; stop ends the run
with a message; rollback restores the last checkpoint and moves on through the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ipt import checkpoint
from ipt.health import LossAnomalies
from ipt.observe import read_metrics

from .conftest import run_pretrain, tiny_overrides

TIGHT = {"train.spike_sigma": 1.5, "train.spike_window": 5, "train.max_anomalies_in_row": 40,
         "train.eval_every": 1000, "train.max_steps": 30}


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / checkpoint.tag_for(step) / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def anomalous_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "anomaly" in r]


def test_a_spike_is_skipped_leaving_the_weights_as_they_were(data_dir, tmp_path):
    run = tmp_path / "skip"
    run_pretrain(tiny_overrides(data_dir, run, **TIGHT, **{
        "train.checkpoint_every": 1, "train.keep_last": 1000, "train.on_anomaly": "skip"}))
    spikes = anomalous_steps(run)
    assert spikes and spikes[0] > 5, spikes  # none before the window has 5 steps
    s = next(s for s in spikes if s - 1 not in spikes and s - 2 not in spikes)
    before, at, earlier = weights(run, s - 1), weights(run, s), weights(run, s - 2)
    assert all(torch.equal(before[k], at[k]) for k in before)  # no update at step s
    assert not all(torch.equal(before[k], earlier[k]) for k in before)  # but at step s - 1
    assert "its update is skipped" in (run / "train.log").read_text()
    assert json.loads((run / "summary.json").read_text())["step"] == 30


@pytest.mark.slow
def test_stop_ends_the_run_at_the_first_spike(data_dir, tmp_path):
    run = tmp_path / "stop"
    proc = run_pretrain(tiny_overrides(data_dir, run, **TIGHT, **{"train.on_anomaly": "stop"}),
                        check=False)
    assert proc.returncode == 2
    (spike,) = anomalous_steps(run)
    assert f"step {spike}: loss spike" in proc.stderr and "train.on_anomaly=stop" in proc.stderr
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == spike


@pytest.mark.slow
def test_rollback_restores_the_checkpoint_and_skips_the_data_since(data_dir, tmp_path):
    """The first spike rolls back, leaving the checkpoint it restored as it was; a later
    anomaly, past train.max_rollbacks=1, ends the run. What follows the first rollback depends
    on the noise (with a window this tight, the run may finish, or end on that cap), so the
    rollback itself and the cap's bound are what is checked."""
    run = tmp_path / "rollback"
    proc = run_pretrain(tiny_overrides(data_dir, run, **{
        **TIGHT, "train.spike_sigma": 1.0, "train.max_anomalies_in_row": 3,
        "train.checkpoint_every": 5, "train.keep_last": 20, "train.on_anomaly": "rollback",
        "train.max_rollbacks": 1}), check=False)
    log = (run / "train.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(i for i, r in enumerate(rows) if "anomaly" in r)
    spike, back_to = rows[first]["step"], (rows[first]["step"] - 1) // 5 * 5
    assert back_to >= 5  # spikes are judged once the window is full: a checkpoint exists
    assert f"step {spike}: " in log and f"rolled back to the checkpoint of step {back_to}," in log
    assert rows[first]["rolled_back_to"] == back_to
    restored = checkpoint.read_state(run / "checkpoints" / checkpoint.tag_for(back_to))
    assert restored.consumed_samples == back_to * 8 and restored.rollbacks == 0  # untouched
    # the next step is back_to + 1 again, on the samples after the spike's batch
    after = rows[first + 1]
    assert after["step"] == back_to + 1
    assert after["consumed_samples"] == rows[first]["consumed_samples"] + 8
    assert log.count("rolled back to the checkpoint") == 1
    if sum("anomaly" in r for r in rows) > 1:
        assert proc.returncode == 2 and "train.max_rollbacks=1" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_diverged_run_stops_after_too_many_anomalies_in_a_row(data_dir, tmp_path):
    run = tmp_path / "diverged"
    proc = run_pretrain(tiny_overrides(data_dir, run, **{
        "optim.lr": 1e30, "optim.grad_clip": 0.0, "schedule.warmup_steps": 0,
        "train.max_anomalies_in_row": 3, "train.max_steps": 20}), check=False)
    assert proc.returncode == 2
    assert "the gradient norm is inf" in proc.stderr and "4th anomalous step in a row" \
        in proc.stderr
    assert len(anomalous_steps(run)) == 4


def curriculum_losses(cycles: int = 3, per_length: int = 120, seed: int = 0):
    """(length, loss) of a `grow_p2` curriculum at scale: within a cycle 64-, then 128-, then
    256-token steps; the loss falls slowly, a step's noise is 0.02 nats, and a 64-token
    step costs 0.3 nats more than a 256-token one (less context)."""
    rng = np.random.default_rng(seed)
    gap = {64: 0.3, 128: 0.12, 256: 0.0}
    steps = [L for _ in range(cycles) for L in (64, 128, 256) for _ in range(per_length)]
    return [(L, 6.5 - 0.0002 * t + gap[L] + rng.normal(0, 0.02)) for t, L in enumerate(steps)]


def test_steps_of_each_length_are_judged_against_their_own_length():
    """The returning short steps of a length curriculum are not spikes; a planted spike,
    short of the gap between lengths, still is."""
    series = curriculum_losses()
    detector = LossAnomalies(6.0, 100, 3)
    flagged = [t for t, (L, x) in enumerate(series) if detector.check(x, x, L) is not None]
    assert flagged == []
    # one length window for all (what the detector did before): every return is flagged
    mixed = LossAnomalies(6.0, 100, 1000)
    assert sum(mixed.check(x, x) is not None for _, x in series) >= 40
    spike = series[-1][1] + 0.25  # a spike at 256 tokens below the 64-token steps' loss
    assert detector.check(spike, spike, 256) is not None
    assert "256-token steps" in detector.check(spike, spike, 256)


def test_windows_per_length_survive_a_checkpoint_and_old_checkpoints_load():
    detector = LossAnomalies(6.0, 100, 3)
    for L, x in curriculum_losses(cycles=1):
        detector.check(x, x, L)
    again = LossAnomalies(6.0, 100, 3)
    again.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert {n: list(r) for n, r in again.recent.items()} == \
        {n: list(r) for n, r in detector.recent.items()}
    old = LossAnomalies(6.0, 100, 3)  # a checkpoint of a fixed-length run before per-length
    old.load_state_dict({"recent": [1.0, 2.0], "in_row": 1})
    assert list(old.recent[0]) == [1.0, 2.0] and old.in_row == 1


def test_the_detector_resumed_from_a_checkpoint_judges_like_the_uninterrupted_one(data_dir,
                                                                                 tmp_path):
    """Its window and count in a row travel in trainer_state.json; a fresh detector loaded
    from them flags exactly the steps the one that saw every step flags."""
    run = tmp_path / "saved"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 12,
                                                  "train.checkpoint_every": 6,
                                                  "train.eval_every": 0}))
    rows = read_metrics(run / "metrics.jsonl")
    saved = checkpoint.read_state(run / "checkpoints" / checkpoint.tag_for(6)).health
    assert saved["by_length"]["0"] == pytest.approx([r["ce"] for r in rows[:6]])
    whole, resumed, fresh = (LossAnomalies(1.0, 5, 40) for _ in range(3))
    for r in rows[:6]:
        whole.check(r["loss"], r["ce"])
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    spike = rows[6]["ce"] * 10  # at once: a detector without the saved window misses it
    later = [(spike, spike)] + [(r["loss"], r["ce"]) for r in rows[6:]]
    judged = [whole.check(*x) for x in later]
    assert judged == [resumed.check(*x) for x in later]
    assert judged[0] is not None and fresh.check(*later[0]) is None
