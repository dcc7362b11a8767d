"""The next-token loss on masked data."""

import math
import os
import subprocess
import sys

import torch

from ipt.config import ModelConfig
from ipt.losses import IGNORE, NextTokenLoss
from ipt.model import build_model

from .conftest import ROOT


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="t", hidden_size=32, intermediate_size=64, num_layers=1,
                                   num_heads=2, num_kv_heads=2, max_seq_len=16), 64)


def test_a_micro_batch_with_every_token_masked_gives_zero_loss_not_nan():
    model = tiny()
    ids = torch.randint(0, 64, (2, 8))
    out = NextTokenLoss()(model, {"input_ids": ids, "labels": torch.full_like(ids, IGNORE)}, 0)
    assert out.loss.item() == 0.0 and out.tokens == 0
    out.loss.backward()  # still part of the graph: every rank runs the same backward


def test_the_loss_is_the_mean_over_unmasked_targets_only():
    model = tiny()
    ids = torch.randint(0, 64, (1, 8))
    labels = ids.roll(-1, 1)
    labels[0, :5] = IGNORE
    out = NextTokenLoss()(model, {"input_ids": ids, "labels": labels}, 0)
    logits = model(input_ids=ids).logits[0, 5:]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, 5:])
    assert out.tokens == 3 and math.isclose(out.loss.item(), expected.item(), rel_tol=1e-6)


def test_a_step_weighs_every_token_alike_across_micro_batches_and_ranks(tmp_path):
    """2 ranks x 2 micro-batches with 17 or 32 targets each, through the real trainer and
    DeepSpeed engine: the gradient is that of all the step's tokens taken as one batch (not a
    mean of micro-batch means)."""
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(ROOT / "tests" / "workers" / "grad_step.py"),
                    str(out)], cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)
    grads = torch.load(out)
    assert len(grads["trainer"]) == len(grads["one_batch"]) > 0
    for got, want in zip(grads["trainer"], grads["one_batch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
