"""Training on Dataset Decomposition's pieces: with SALT's selection and teacher and
multi-token heads, killed and resumed exactly, on another number of ranks, and refused a
resume with other settings."""

from __future__ import annotations

import numpy as np
import pytest

from ipt import checkpoint
from ipt.config import DecomposeConfig
from ipt.data.pieces import DecomposedShards
from ipt.data.shards import ShardSet
from ipt.observe import read_metrics

from .conftest import run_pretrain, scored_copy, tiny_overrides
from .test_resume import kill_after_step, losses

# 8 x 64 tokens a step, in pieces of 16, 32 or 64 tokens; micro-batches of 2 x 64 tokens
DD = {"data.packing": "decompose", "data.decompose.min_len": 16,
      "data.decompose.curriculum": "grow_p2", "data.decompose.cycles": 2}


@pytest.fixture(scope="module")
def scored_pieces(data_dir, tiny_lm, tmp_path_factory):
    """A copy of the session's data whose pieces the tiny LM has scored."""
    return scored_copy(data_dir, tiny_lm, tmp_path_factory.mktemp("scored_pieces"),
                       packing="decompose", decompose=DecomposeConfig(min_len=16),
                       block_size=512)[0]


def test_pieces_train_with_selection_a_teacher_and_mtp_heads(scored_pieces, tiny_lm, tmp_path):
    pieces = DecomposedShards(ShardSet(scored_pieces / "shards" / "docstrings" / "train"), 16, 64)
    (scores,) = (scored_pieces / "shards" / "docstrings" / "scores").glob("*.npy")
    assert scores.name.endswith("-D16-64.npy") and np.load(scores).shape == (len(pieces), 3)

    run = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(scored_pieces, run, **DD, **{
        "train.max_steps": 8, "teacher": "kd", "teacher.path": tiny_lm, "teacher.kd_steps": 4,
        "data.select.fraction": 0.5, "loss": "mtp", "loss.heads": 2,
        "logger.peak_flops": 1e12}))
    log = proc.stderr
    assert "data selection: the first 4 steps draw from the top 50%" in log
    assert "Dataset Decomposition:" in log and "steps per epoch, curriculum grow_p2 x 2" in log
    assert "source docstrings:" in log and "pieces of 16/32/64 tokens" in log
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[0]["seq_len"] == 64  # the longest first: too little memory shows at once
    assert {r["seq_len"] for r in rows} <= {16, 32, 64} and len({r["seq_len"] for r in rows}) > 1
    assert [r["tokens"] for r in rows] == [512 * s for s in range(1, 9)]  # whatever the length
    assert all(r["kd"] > 0 for r in rows[:4]) and all(r["ce_2"] > 0 for r in rows)
    # MFU counts each step's FLOPs at its own length: per token, more for longer sequences
    per_token = {r["seq_len"]: r["mfu"] * 1e12 / r["tokens_per_s"] for r in rows}
    assert sorted(per_token.values()) == [per_token[L] for L in sorted(per_token)]
    assert len(set(per_token.values())) == len(per_token)
    assert rows[-1]["val_loss"] > 0


@pytest.mark.slow
def test_pieces_resume_bitwise_then_on_another_world_size_and_refuse_other_settings(
        data_dir, tmp_path):
    """Killed with SIGKILL and resumed: the same losses, bit for bit. Resumed on 2 ranks: the
    same pieces in the same steps (losses equal up to the order of sums). A resume with
    another curriculum is refused with the reason."""
    opts = {**DD, "train.max_steps": 16, "train.checkpoint_every": 4, "train.eval_every": 0,
            "train.keep_last": 4}
    ref_dir, run_dir, moved_dir = tmp_path / "reference", tmp_path / "run", tmp_path / "moved"
    run_pretrain(tiny_overrides(data_dir, ref_dir, **opts))

    died_at = kill_after_step(tiny_overrides(data_dir, run_dir, **opts), 1, run_dir, 6)
    assert died_at < 16
    run_pretrain(tiny_overrides(data_dir, run_dir, **opts))
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 17))
    assert got == ref  # exact float equality, every step, loss and grad norm

    # the checkpoint of step 8, resumed on 2 ranks
    proc = run_pretrain(tiny_overrides(data_dir, moved_dir, **opts, **{
        "train.resume": ref_dir / "checkpoints" / "step_00000008"}), nproc=2)
    assert "at step 8" in proc.stderr
    moved = losses(moved_dir)
    assert sorted(moved) == list(range(9, 17))
    for step in moved:
        assert moved[step][0] == pytest.approx(ref[step][0], rel=1e-5), step
    lengths = {r["step"]: r["seq_len"] for r in read_metrics(ref_dir / "metrics.jsonl")}
    assert all(r["seq_len"] == lengths[r["step"]] for r in read_metrics(moved_dir / "metrics.jsonl"))

    proc = run_pretrain(tiny_overrides(data_dir, run_dir, **{
        **opts, "data.decompose.curriculum": "uniform", "train.max_steps": 20}), check=False)
    assert proc.returncode != 0
    assert "data.decompose.curriculum: checkpoint grow_p2, config uniform" in proc.stderr, \
        proc.stderr[-2000:]
    proc = run_pretrain(tiny_overrides(data_dir, run_dir, **{
        **opts, "data.packing": "bestfit", "train.max_steps": 20}), check=False)
    assert proc.returncode != 0 and "packing: checkpoint decompose, config bestfit" in proc.stderr


def test_the_spike_detector_keeps_a_window_per_sequence_length(data_dir, tmp_path):
    """Each step's loss enters its own length's window (`ipt.health.LossAnomalies`), so the
    return of short, harder steps after long ones is not taken for a spike."""
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **DD, **{
        "train.max_steps": 16, "train.eval_every": 0, "train.checkpoint_every": 16,
        "train.spike_window": 4}))
    rows = read_metrics(run / "metrics.jsonl")
    assert not any("anomaly" in r for r in rows)
    saved = checkpoint.read_state(run / "checkpoints" / checkpoint.tag_for(16)).health
    by_length = {L: [r["ce"] for r in rows if r["seq_len"] == L][-4:]
                 for L in {r["seq_len"] for r in rows}}
    assert len(by_length) > 1
    assert sorted(int(L) for L in saved["by_length"]) == sorted(by_length)
    for L, window in by_length.items():
        assert saved["by_length"][str(L)] == pytest.approx(window)
