"""Exact resume: a run killed with SIGKILL and resumed logs the same per-step losses as a run
that was never interrupted (bitwise, CPU fp32, same world size); on another world size it
continues with the next unseen samples."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ipt.observe import read_metrics

from .conftest import kill_run, run_pretrain, start_entry, tiny_overrides

STEPS = 24


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")}


def kill_after_step(overrides: list[str], nproc: int, run_dir: Path, step: int) -> int:
    """Start a run, SIGKILL its whole process group once `step` is logged; return the step
    the run had logged when it died."""
    proc = start_entry("train/pretrain.py", overrides, nproc)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "run ended before it could be killed"
    finally:
        kill_run(proc)
    return max(r["step"] for r in read_metrics(metrics))


# `make test` keeps one single-rank and one sharded 2-rank case; CI runs all four
@pytest.mark.parametrize(("nproc", "stage"), [
    (1, 1), pytest.param(1, 3, marks=pytest.mark.slow),
    pytest.param(2, 1, marks=pytest.mark.slow), (2, 3)],
    ids=["1rank-zero1", "1rank-zero3", "2ranks-zero1", "2ranks-zero3"])
def test_sigkill_and_resume_reproduces_losses_bitwise(data_dir, tmp_path, nproc, stage):
    opts = {"train.max_steps": STEPS, "train.checkpoint_every": 5, "deepspeed.stage": stage}
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
    run_pretrain(tiny_overrides(data_dir, ref_dir, **opts), nproc)

    died_at = kill_after_step(tiny_overrides(data_dir, cut_dir, **opts), nproc, cut_dir, 6)
    assert died_at < STEPS
    run_pretrain(tiny_overrides(data_dir, cut_dir, **opts), nproc)

    ref, resumed = losses(ref_dir), losses(cut_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == ref  # exact float equality, every step, loss and grad norm


def test_rerunning_a_finished_run_exits_cleanly(data_dir, tmp_path):
    """Re-submitting a job that already finished resumes at its last step and does nothing."""
    overrides = tiny_overrides(data_dir, tmp_path / "done", **{"train.max_steps": 4})
    run_pretrain(overrides, nproc=2)
    again = run_pretrain(overrides, nproc=2)
    assert "at step 4" in again.stderr and "finished at step 4" in again.stdout
    assert len(losses(tmp_path / "done")) == 4


@pytest.mark.parametrize(("stage", "before", "after"), [
    (1, 2, 1), pytest.param(3, 1, 2, marks=pytest.mark.slow)], ids=["zero1-2to1", "zero3-1to2"])
def test_world_size_change_continues_with_next_unseen_samples(data_dir, tmp_path, stage,
                                                              before, after):
    """Ranks change after 10 steps, the global batch stays: the same samples in the same
    global batches, so the same losses up to the order of floating-point sums."""
    opts = {"train.max_steps": 16, "train.checkpoint_every": 5, "train.eval_every": 0,
            "deepspeed.stage": stage}
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "changed"
    run_pretrain(tiny_overrides(data_dir, ref_dir, **opts), nproc=before)
    run_pretrain(tiny_overrides(data_dir, cut_dir, **opts, **{"train.stop_after": 10}),
                 nproc=before)
    proc = run_pretrain(tiny_overrides(data_dir, cut_dir, **opts), nproc=after)
    assert "resumed from" in proc.stderr and "at step 10" in proc.stderr

    ref, changed = losses(ref_dir), losses(cut_dir)
    assert sorted(changed) == list(range(1, 17))
    for step in range(11, 17):
        assert changed[step][0] == pytest.approx(ref[step][0], rel=1e-6), step
    rows = read_metrics(cut_dir / "metrics.jsonl")
    assert rows[-1]["consumed_samples"] == 16 * 8


@pytest.mark.slow
def test_a_restart_after_a_world_size_change_loads_its_own_checkpoint_unconverted(data_dir,
                                                                                  tmp_path):
    """Checkpoints of the old world size are still kept; only the one loaded decides."""
    run = tmp_path / "changed"
    opts = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0,
            "train.keep_last": 5}
    run_pretrain(tiny_overrides(data_dir, run, **opts), nproc=2)
    run_pretrain(tiny_overrides(data_dir, run, **{**opts, "train.max_steps": 6}), nproc=1)
    proc = run_pretrain(tiny_overrides(data_dir, run, **{**opts, "train.max_steps": 8}), nproc=1)
    assert "resumed from" in proc.stderr and "at step 6" in proc.stderr
    assert (run / "checkpoints" / "step_00000004" / "universal").is_dir()  # 2 -> 1 ranks
    assert not (run / "checkpoints" / "step_00000006" / "universal").exists()


def test_a_checkpoint_that_cannot_be_converted_fails_every_rank_at_once(data_dir, tmp_path):
    """ZeRO-0 keeps no optimizer-state files, so DeepSpeed's converter fails: the ranks that
    did not convert hear of it at once rather than waiting in a barrier."""
    run = tmp_path / "zero0"
    opts = {"train.max_steps": 2, "train.checkpoint_every": 2, "train.eval_every": 0,
            "deepspeed.stage": 0}
    run_pretrain(tiny_overrides(data_dir, run, **opts), nproc=1)
    start = time.monotonic()
    proc = run_pretrain(tiny_overrides(data_dir, run, **{**opts, "train.max_steps": 4}),
                        nproc=2, check=False, timeout=240)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert proc.stderr.count("could not be converted for 2") >= 2, proc.stderr[-3000:]
