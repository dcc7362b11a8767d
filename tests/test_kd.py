"""Online distillation (SALT stage 1): the chunked KD loss, its schedule, the teacher checks,
and a training run that distils, switches, and releases its teacher."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from ipt.config import ConfigError, TeacherConfig
from ipt.losses import IGNORE
from ipt.losses.kd import kd_losses, online_probs
from ipt.observe import read_metrics
from ipt.slm import teacher
from ipt.slm.kd import kd_weight

from .conftest import run_entry, run_pretrain, tiny_overrides


def naive(logits, h_t, labels, head_t, tau):
    keep = labels.flatten() != IGNORE
    s = logits.float().flatten(0, 1)[keep]
    t = head_t(h_t).float().flatten(0, 1)[keep]
    ce = F.cross_entropy(s, labels.flatten()[keep], reduction="sum")
    kd = -(F.softmax(t / tau, -1) * F.log_softmax(s / tau, -1)).sum() * tau**2
    return ce, kd


def setup(vocab: int, n: int = 2, seq: int = 64):
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(32, vocab, bias=False), torch.nn.Linear(16, vocab, bias=False)
    head_t.requires_grad_(False)
    h_s = torch.randn(n, seq, 32, requires_grad=True)
    h_t = torch.randn(n, seq, 16)
    labels = torch.randint(0, vocab, (n, seq))
    labels[0, :10] = IGNORE  # a loss mask
    labels[:, -1] = IGNORE  # document ends
    return h_s, h_t, labels, head_s, head_t


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_between_vocabularies_padded_otherwise_compares_the_tokenizers_rows(tau):
    """A student of 300 rows and a teacher of 320, over one tokenizer of 280 tokens: KD is
    the cross-entropy of their softmaxes over the 280 rows, CE keeps all 300 of the
    student's, and the gradients are those of that loss (rows past 280 get CE's alone)."""
    from ipt.losses.logits import LogitRule

    h_s, h_t, labels, head_s, _ = setup(vocab=300)
    labels = labels.clamp(max=279).masked_fill(labels == IGNORE, IGNORE)
    head_t = torch.nn.Linear(16, 320, bias=False).requires_grad_(False)
    w, rows = 0.4, 280
    probs = online_probs(h_t, head_t, tau, LogitRule(), vocab=rows)
    mixed, ce, kd, _ = kd_losses(head_s(h_s), labels, probs, tau, w, 17)
    mixed.backward()
    grads = h_s.grad.clone(), head_s.weight.grad.clone()
    h_s.grad = head_s.weight.grad = None
    keep = labels.flatten() != IGNORE
    s = head_s(h_s).flatten(0, 1)[keep]
    t = head_t(h_t).flatten(0, 1)[keep][:, :rows]
    ce0 = F.cross_entropy(s, labels.flatten()[keep], reduction="sum")
    kd0 = -(F.softmax(t / tau, -1) * F.log_softmax(s[:, :rows] / tau, -1)).sum() * tau**2
    ((1 - w) * ce0 + w * kd0).backward()
    torch.testing.assert_close((ce, kd), (ce0, kd0))
    torch.testing.assert_close(grads, (h_s.grad, head_s.weight.grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kd_equals_the_full_logit_computation_with_its_gradients(dtype):
    h_s, h_t, labels, head_s, head_t = setup(vocab=300)
    w, tau = 0.3, 2.0
    probs = online_probs(h_t, head_t, tau)
    mixed, ce, kd, n = kd_losses(head_s(h_s).to(dtype), labels, probs, tau, w, 17)
    mixed.backward()
    grads = h_s.grad.clone(), head_s.weight.grad.clone()
    h_s.grad = head_s.weight.grad = None
    ce0, kd0 = naive(head_s(h_s).to(dtype), h_t, labels, head_t, tau)
    ((1 - w) * ce0 + w * kd0).backward()
    assert n == int((labels != IGNORE).sum())
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close((ce, kd, mixed), (ce0, kd0, (1 - w) * ce0 + w * kd0), **tol)
    torch.testing.assert_close(grads, (h_s.grad, head_s.weight.grad), **tol)


def test_kd_at_a_32k_vocabulary_keeps_only_a_logit_sized_gradient_for_backward():
    vocab, n, seq = 32_000, 2, 256
    h_s, h_t, labels, head_s, head_t = setup(vocab, n, seq)
    full = n * seq * vocab * 4  # one fp32 [batch, seq, vocab] tensor
    logits = head_s(h_s)  # the student's forward: one full tensor, as in next-token training
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd_losses(logits, labels, online_probs(h_t, head_t, 1.0), 1.0, 0.5, chunk_size=64)
    chunked = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive(logits, h_t, labels, head_t, tau=1.0)
    assert sum(saved) > 2.5 * full  # softmaxes and teacher probabilities, all full size
    assert chunked <= full, f"{chunked / 2**20:.0f} MiB saved for backward"


def test_the_kd_weight_switches_hard_or_decays_linearly():
    hard = TeacherConfig(path="x", weight=0.5, kd_steps=3)
    assert [kd_weight(hard, s) for s in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    lin = TeacherConfig(path="x", weight=0.6, kd_steps=2, switch="linear", decay_steps=2)
    assert [round(kd_weight(lin, s), 6) for s in range(6)] == [0.6, 0.6, 0.4, 0.2, 0.0, 0.0]


def test_a_teacher_with_another_vocabulary_is_refused_with_the_reason(tiny_lm, data_dir,
                                                                      tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_lm, other)
    cfg = json.loads((other / "tokenizer.json").read_text())
    vocab = cfg["model"]["vocab"]
    first = next(k for k in vocab if vocab[k] == 100)
    vocab["renamed-piece"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="another tokenizer"):
        teacher.check(TeacherConfig(path=str(other)), str(data_dir / "tokenizer"))
    with pytest.raises(ConfigError, match="not a model folder"):
        teacher.check(TeacherConfig(path=str(tmp_path / "missing")), str(data_dir / "tokenizer"))
    run = tmp_path / "run"  # an ipt run folder stands for its export; without one: say how
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="export it first: python train/export_hf.py"):
        teacher.check(TeacherConfig(path=str(run)), str(data_dir / "tokenizer"))
    shutil.copytree(tiny_lm, run / "hf")
    teacher.check(TeacherConfig(path=str(run)), str(data_dir / "tokenizer"))


def test_training_distils_then_switches_and_logs_both_parts(tiny_lm, data_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_pretrain(tiny_overrides(data_dir, run, **{
        "train.max_steps": 6, "teacher.path": str(tiny_lm), "teacher.kd_steps": 3,
        "teacher.chunk_size": 32}))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["kd_weight"] for r in rows] == [0.5] * 3 + [0.0] * 3
    assert all("kd" in r and r["loss"] < r["ce"] + r["kd"] for r in rows[:3])
    assert not any("kd" in r for r in rows[3:])
    assert "teacher released" in proc.stderr


@pytest.mark.parametrize(("nproc", "stage"), [
    (1, 1), pytest.param(2, 3, marks=pytest.mark.slow)], ids=["1rank-zero1", "2ranks-zero3"])
def test_resume_in_the_kd_phase_and_in_the_decay_is_exact(tiny_lm, data_dir, tmp_path, nproc,
                                                          stage):
    opts = {"train.max_steps": 12, "train.checkpoint_every": 2, "deepspeed.stage": stage,
            "teacher.path": str(tiny_lm), "teacher.kd_steps": 5, "teacher.switch": "linear",
            "teacher.decay_steps": 3, "teacher.chunk_size": 48}
    ref, cut = tmp_path / "reference", tmp_path / "interrupted"
    run_pretrain(tiny_overrides(data_dir, ref, **opts), nproc)
    run_pretrain(tiny_overrides(data_dir, cut, **opts, **{"train.stop_after": 3}), nproc)
    run_pretrain(tiny_overrides(data_dir, cut, **opts, **{"train.stop_after": 4}), nproc)
    run_pretrain(tiny_overrides(data_dir, cut, **opts), nproc)

    def per_step(run):
        return {r["step"]: (r["loss"], r["grad_norm"], r["kd_weight"])
                for r in read_metrics(run / "metrics.jsonl")}

    assert per_step(cut) == per_step(ref)
    assert [round(w, 4) for _, _, w in per_step(ref).values()][3:9] == \
        [0.5, 0.5, 0.375, 0.25, 0.125, 0.0]


@pytest.mark.slow
def test_under_zero3_the_teacher_is_sharded_and_distils_like_a_replicated_one(tiny_lm,
                                                                               data_dir,
                                                                               tmp_path):
    opts = {"train.max_steps": 3, "teacher.path": str(tiny_lm), "teacher.kd_steps": 3,
            "teacher.chunk_size": 40}
    runs = {}
    for stage in (1, 3):
        run = tmp_path / f"zero{stage}"
        proc = run_pretrain(tiny_overrides(data_dir, run, **opts, **{"deepspeed.stage": stage}),
                            nproc=2)
        assert ("sharded with ZeRO-3" in proc.stderr) == (stage == 3)
        runs[stage] = [(r["ce"], r["kd"]) for r in read_metrics(run / "metrics.jsonl")]
    for (ce1, kd1), (ce3, kd3) in zip(runs[1], runs[3], strict=True):
        assert ce3 == pytest.approx(ce1, rel=1e-4) and kd3 == pytest.approx(kd1, rel=1e-4)


def test_a_chunk_without_targets_still_runs_the_teacher_head_like_every_rank_must():
    h_s, h_t, labels, head_s, head_t = setup(vocab=50)
    labels[:] = IGNORE
    labels[1, 5] = 3  # one target, in the last chunk
    calls = []
    head_t.register_forward_hook(lambda *_: calls.append(1))
    probs = online_probs(h_t, head_t, 1.0)
    mixed, ce, kd, n = kd_losses(head_s(h_s), labels, probs, 1.0, 0.5, chunk_size=32)
    mixed.backward()
    assert len(calls) == 4 and n == 1 and torch.isfinite(mixed)


def rolled_back_into_the_kd_phase(data_dir, run, **opts):
    """A run whose step 6 (index 5) is anomalous after the KD phase (steps < 4) ended: it
    rolls back to the checkpoint of step 3, inside the phase."""
    proc = run_entry("tests/workers/planted_nan.py", tiny_overrides(data_dir, run, **{
        "teacher.kd_steps": 4, "train.max_steps": 8, "train.checkpoint_every": 3,
        "train.eval_every": 0, "train.on_anomaly": "rollback", **opts}),
        env={"PLANT_NAN_AT": "5"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]
    assert rows[5]["rolled_back_to"] == 3
    after = rows[6:8]  # steps 4 (index 3, in the phase) and 5 (after it) again
    assert after[0]["kd_weight"] == 0.5 and math.isfinite(after[0]["kd"]) and after[0]["kd"] > 0
    assert after[1]["kd_weight"] == 0.0 and "kd" not in after[1]
    return proc



def test_a_rollback_into_the_kd_phase_reloads_the_released_teacher(tiny_lm, data_dir, tmp_path):
    proc = rolled_back_into_the_kd_phase(data_dir, tmp_path / "run",
                                         **{"teacher.path": str(tiny_lm)})
    log = proc.stderr
    assert log.index("KD phase over: teacher released") < log.index("rolled back to the "
                                                                       "checkpoint of step 3")
    assert "step 3 is in the KD phase again (a rollback): reloading the teacher" in log
