"""The GPU path's switches keep training the same: activation checkpointing and regional
compile give the losses and gradients of plain eager training, and the losses read nothing
back from the device while a step runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ipt.config import LossConfig, ModelConfig
from ipt.data.loader import stack, to_device, unstack
from ipt.losses import IGNORE, build_loss
from ipt.losses.kd import KDTerm, online_probs
from ipt.model import build_model, checkpoint_layers, compile_layers
from ipt.mtp.heads import attach
from ipt.observe import read_metrics

from .conftest import ROOT, run_pretrain, tiny_overrides
from .workers.host_reads import HostReads

EOS = 2


def packed_batch(vocab: int = 120, rows: int = 2, seq: int = 64) -> dict:
    """A loader-made micro-batch: documents of uneven lengths, their ends without targets."""
    torch.manual_seed(1)
    items = []
    for r in range(rows):
        cut = 19 + 11 * r
        ids = torch.randint(3, vocab, (seq,))
        ids[cut - 1] = EOS
        labels = torch.roll(ids, -1)
        labels[cut - 1] = labels[-1] = IGNORE
        pos = torch.cat([torch.arange(cut), torch.arange(seq - cut)])
        items.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return to_device(unstack(stack(items)), torch.device("cpu"))


def mtp_with_teacher(vocab: int = 120):
    torch.manual_seed(0)
    shape = ModelConfig(name="t", hidden_size=64, intermediate_size=128, num_layers=3,
                        num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = attach(build_model(shape, vocab), 2, None)
    teacher = build_model(ModelConfig(name="s", hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=2, num_kv_heads=2,
                                      max_seq_len=64), vocab).eval()
    return model, teacher


def step(model, teacher, batch, loss) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.no_grad():
        h_t = teacher.model(input_ids=batch["input_ids"],
                            position_ids=batch["position_ids"]).last_hidden_state
    kd = KDTerm(online_probs(h_t, teacher.lm_head, 2.0), 2.0, 0.5)
    out = loss(model, batch, 0, norm=[40.0, 38.0, 36.0], kd=kd)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointing_and_compile_give_the_eager_losses_and_gradients():
    """Three MTP heads with KD on head 1, over packed documents: recomputing layers (every
    one, or every other) and compiling them change neither the loss nor any gradient."""
    model, teacher = mtp_with_teacher()
    model.train()
    batch = packed_batch()
    loss = build_loss(LossConfig(name="mtp", heads=3, chunk_size=24), EOS)
    ref_loss, ref_grads = step(model, teacher, batch, loss)
    variants = [("selective", False), ("full", False), ("full", True)]
    for mode, compiled in variants:
        assert checkpoint_layers(model, mode, 2) == (5 if mode == "full" else 3)
        if compiled:
            assert compile_layers(model) == 5  # 3 layers and 2 heads
        got_loss, grads = step(model, teacher, batch, loss)
        assert got_loss == pytest.approx(ref_loss, rel=1e-6), (mode, compiled)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6,
                                       msg=f"{mode} compiled={compiled}: {name}")


@pytest.mark.parametrize("loss_cfg", [LossConfig(name="ntp"), LossConfig(name="mtp", heads=3)],
                         ids=["ntp", "mtp"])
def test_a_training_micro_batch_reads_nothing_back_from_the_device(loss_cfg):
    """The fused next-token and multi-token losses, with KD, forward and backward, given the
    step's norm the trainer counted on the host: not one value is read back."""
    model, teacher = mtp_with_teacher()
    model.train()
    batch = packed_batch()
    loss = build_loss(loss_cfg, EOS)
    step(model, teacher, batch, loss)  # the first call may set things up
    with HostReads() as reads:
        loss(model, batch, 1, norm=[40.0, 38.0, 36.0]).loss.backward()
    assert reads.count == 0


@pytest.mark.parametrize(("nproc", "opts"), [
    (1, {"deepspeed.stage": 0, "train.activation_checkpointing": "selective",
         "train.on_anomaly": "none", "logger.log_every": 2}),
    pytest.param(2, {"deepspeed.stage": 3, "train.activation_checkpointing": "full",
                     "train.compile": True}, marks=pytest.mark.slow)],
    ids=["1rank-zero0-selective", "2ranks-zero3-full-compiled"])
def test_training_with_the_switches_gives_the_plain_losses(data_dir, tiny_lm, tmp_path, nproc,
                                                           opts):
    """MTP heads and online KD under DeepSpeed: the switches change no logged loss. Without
    anomaly checks, metrics are read every `log_every` steps, and every step is still
    logged; throughput only where the host waited for the device."""
    base = {"loss": "mtp", "loss.heads": 2, "train.max_steps": 3, "teacher.path": str(tiny_lm),
            "teacher.kd_steps": 2, "train.eval_every": 3, "train.checkpoint_every": 0,
            "deepspeed.stage": opts["deepspeed.stage"]}
    rows = {}
    for name, extra in (("plain", {}), ("switched", opts)):
        run = tmp_path / name
        run_pretrain(tiny_overrides(data_dir, run, **{**base, **extra}), nproc)
        rows[name] = read_metrics(run / "metrics.jsonl")
    for a, b in zip(rows["plain"], rows["switched"], strict=True):
        for key in ("loss", "ce", "ce_2", "kd", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    if opts.get("train.on_anomaly") == "none":
        assert [r["tokens_per_s"] is None for r in rows["switched"]] == [True, False, False]


def test_precision_auto_is_fp32_on_the_cpu():
    from ipt.config import PretrainConfig
    from ipt.engine import Dist
    from ipt.pretrain import resolve_precision

    cfg = PretrainConfig(tokenizer="unused")
    assert cfg.train.precision == "auto"
    resolve_precision(cfg, Dist(0, 1, 0, 1, torch.device("cpu")))
    assert cfg.train.precision == "fp32"


def test_training_runs_without_wandb_datasets_or_flash_attn(data_dir, tmp_path):
    """A GPU node's image may lack the optional packages: the training path never needs
    them (blocked here as if not installed)."""
    run = tmp_path / "bare-image"
    code = ("import runpy, sys\n"
            "for name in ('wandb', 'datasets', 'flash_attn'):\n"
            "    sys.modules[name] = None  # import fails, as when not installed\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "train" / "pretrain.py"),
                           *tiny_overrides(data_dir, run, **{"train.max_steps": 2,
                                                             "train.eval_every": 2})],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
