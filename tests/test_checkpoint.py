"""Checkpoints count only when whole: partial or corrupt ones are skipped with a warning, and a
checkpoint of another model is refused before any step runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ipt import checkpoint
from ipt.observe import read_metrics

from .conftest import run_pretrain, tiny_overrides


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """8 steps with checkpoints at 4 and 8 (kept: both)."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    run_pretrain(tiny_overrides(data_dir, run_dir))
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()
    return dst


def resume_overrides(data_dir, run_dir, **extra):
    return tiny_overrides(data_dir, run_dir, **{"train.max_steps": 10, **extra})


def first_logged_step(run_dir: Path) -> int:
    return read_metrics(run_dir / "metrics.jsonl")[0]["step"]


def test_a_finished_run_has_complete_checkpoints_and_a_latest_pointer(finished_run):
    root = finished_run / "checkpoints"
    assert [p.name for p in checkpoint.usable_checkpoints(root)] == ["step_00000008",
                                                                       "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000008"
    state = json.loads((root / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["consumed_samples"] == 64
    assert state["config"]["model"]["hidden_size"] == 64
    assert state["tokenizer_fingerprint"] and state["data_fingerprint"]


def test_checkpoint_without_marker_is_skipped(finished_run, data_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "checkpoints" / "step_00000008" / checkpoint.MARKER).unlink()
    proc = run_pretrain(resume_overrides(data_dir, run))
    assert "skipping checkpoint" in proc.stderr and "interrupted" in proc.stderr
    assert first_logged_step(run) == 5  # resumed from step 4


def test_truncated_checkpoint_file_is_skipped(finished_run, data_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    f = next((run / "checkpoints" / "step_00000008").glob("*optim_states.pt"))
    f.write_bytes(f.read_bytes()[:100])
    proc = run_pretrain(resume_overrides(data_dir, run))
    assert "skipping checkpoint" in proc.stderr and "manifest says" in proc.stderr
    assert first_logged_step(run) == 5


def test_corrupt_checkpoint_that_fails_to_load_is_skipped(finished_run, data_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    f = next((run / "checkpoints" / "step_00000008").glob("*optim_states.pt"))
    f.write_bytes(b"\0" * f.stat().st_size)  # right size, garbage content
    proc = run_pretrain(resume_overrides(data_dir, run))
    assert "loading failed" in proc.stderr
    assert first_logged_step(run) == 5


def test_checkpoint_of_another_model_config_is_refused_before_any_step(finished_run, data_dir,
                                                                     tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    proc = run_pretrain(resume_overrides(data_dir, run, **{"model.hidden_size": 32}),
                        check=False)
    assert proc.returncode == 2
    assert "another model config" in proc.stderr and "hidden_size: checkpoint 64" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_resume_never_starts_over(finished_run, data_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    run_pretrain(resume_overrides(data_dir, run, **{"train.resume": "never"}))
    assert first_logged_step(run) == 1


def test_keep_last_prunes_old_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.checkpoint_every": 2,
                                                  "train.keep_last": 2}))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_00000006", "step_00000008"]


def test_explicit_resume_path_that_is_unusable_is_an_error(finished_run, data_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    bad = run / "checkpoints" / "step_00000004"
    (bad / checkpoint.MARKER).unlink()
    proc = run_pretrain(resume_overrides(data_dir, run, **{"train.resume": str(bad)}),
                        check=False)
    assert proc.returncode == 2 and "is not a usable checkpoint" in proc.stderr
