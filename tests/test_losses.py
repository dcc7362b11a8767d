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


def test_under_autocast_every_gemm_of_the_fused_loss_runs_in_bf16():
    """The trainer's bf16 path over fp32 weights: autocast casts the out-of-place products
    but skips in-place ones, so an `addmm_` into the unembedding's gradient would be a full
    fp32 GEMM. Every matrix product the fused loss issues, forward and backward, is bf16,
    and its gradients still match the naive loss's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ipt.losses.fused import heads_loss

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, torch.dtype, torch.dtype]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
                a, b = args[-2], args[-1]
                self.seen.append((name, a.dtype, b.dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 96, bias=False)
    hidden = torch.randn(1, 2, 40, 32, requires_grad=True)
    targets = torch.randint(0, 96, (1, 80))

    def grads(memory_efficient: bool, watch: Products | None = None):
        head.weight.grad, hidden.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hs = [hidden[0]]
            if watch is not None:
                with watch:
                    loss, _, _ = heads_loss(hs, head, targets.view(1, 2, 40), [1 / 80], None,
                                            memory_efficient, chunk_size=16)
                    loss.backward()
            else:
                loss, _, _ = heads_loss(hs, head, targets.view(1, 2, 40), [1 / 80], None,
                                        memory_efficient, chunk_size=16)
                loss.backward()
        return head.weight.grad.clone(), hidden.grad.clone()

    watch = Products()
    fused = grads(True, watch)
    assert len(watch.seen) >= 3 * 5  # 5 chunks: logits, hidden grad, weight grad
    assert all(a == b == torch.bfloat16 for _, a, b in watch.seen), watch.seen
    naive = grads(False)
    for f, n in zip(fused, naive, strict=True):
        assert f.dtype == n.dtype == torch.float32
        torch.testing.assert_close(f, n, rtol=0.05, atol=2e-3)
