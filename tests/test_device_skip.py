"""`optim.fused` and `optim.device_skip`: a step with an infinite gradient is skipped inside
the fused AdamW kernel, on the device, leaving weights, moments and step counts bit for bit
as they were, and the trainer still counts it as an anomaly; ordinary steps train as
DeepSpeed's own check and clipping do; under bf16 ZeRO-1 `engine.step()` reads nothing back.

The DeepSpeed engines run in one worker process (`tests/workers/device_skip.py`), which
starts a process group of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ipt.config import ConfigError, PretrainConfig
from ipt.engine import check_optimizer
from ipt.health import SkippableAdamW

from .conftest import ROOT

PLANTED = ("zero0-fp32", "zero1-fp32", "zero1-bf16")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("device_skip") / "results.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "device_skip.py"),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for part in a for x, y in zip(a[part], b[part], strict=True))


@pytest.mark.parametrize("variant", PLANTED)
def test_an_infinite_gradient_is_skipped_exactly_and_counted(results, variant):
    """Steps 2 and 4 have an infinite gradient: nothing of the optimizer or the model moves
    (the step counts stay at 2); steps 1 and 3 update. Step 2's anomaly is read with step 3's
    metrics (or at once, where DeepSpeed itself still checks: fp32 ZeRO-1), the last step's at
    once."""
    run = results[f"planted/{variant}"]
    snaps, rows = run["snaps"], run["rows"]
    assert [same(snaps[i], snaps[i + 1]) for i in range(4)] == [False, True, False, True]
    steps = [s for s in snaps[-1]["state"] if s.numel() == 1]
    assert steps and all(float(s) == 2.0 for s in steps)
    assert [r["grad_norm"] == float("inf") for r in rows] == [False, True, False, True]
    flagged = {r["step"]: r["anomaly"] for r in rows if "anomaly" in r}
    assert flagged[4] == "the gradient norm is inf"
    if variant == "zero1-fp32":
        assert flagged == {2: "the gradient norm is inf", 4: "the gradient norm is inf"}
    else:
        assert flagged[3] == ("the gradient norm is inf at step 2, whose update was skipped "
                              "on the device") and set(flagged) == {3, 4}


@pytest.mark.parametrize("variant", ["zero0-True", "zero1-True", "zero1-fused"])
def test_the_switches_train_as_foreach_adamw_and_deepspeeds_clipping_do(results, variant):
    """Four clipped fp32 steps: the same losses and weights with fused AdamW, and with the
    optimizer clipping on the device, as with foreach AdamW and DeepSpeed's clipping."""
    off, on = results[f"losses/{variant[:5]}-False"], results[f"losses/{variant}"]
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-6)
    for a, b in zip(off["fp32"], on["fp32"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_engine_step_reads_nothing_back_with_the_switch(results):
    """Host reads inside `engine.step()`. With the switch: none under bf16 ZeRO-1 and fp32
    ZeRO-0; under fp32 ZeRO-1, DeepSpeed's own check of the norm (it cannot be turned off in
    fp32). Without it, DeepSpeed's checks and foreach AdamW's reads of its host-side step
    counts (reads of host tensors, which do not wait for a GPU)."""
    reads = {k.removeprefix("reads/"): v for k, v in results.items() if k.startswith("reads/")}
    assert reads["zero1-bf16-True"] == 0 and reads["zero0-fp32-True"] == 0
    assert reads["zero1-fp32-True"] == 1
    assert reads["zero1-bf16-False"] > 0 and reads["zero1-fp32-False"] > 1


@pytest.mark.parametrize("saved_with", [False, True])
def test_a_resumed_run_keeps_its_own_clipping_and_kernel(results, saved_with):
    """DeepSpeed's ZeRO-1 load restores the saved `clip_grad`, torch's the saved groups'
    `fused`/`foreach`: after a load across the switch, the run's own settings hold."""
    got = results[f"resume/saved-{saved_with}"]
    switched = not saved_with
    assert got["clip_grad"] == (0.0 if switched else 1.0)
    assert got["fused"] == [switched] * 2 and got["foreach"] == [not switched] * 2


def test_device_skip_needs_fused():
    cfg = PretrainConfig(tokenizer="-")
    cfg.optim.device_skip = True
    with pytest.raises(ConfigError, match="optim.device_skip=true needs optim.fused=true"):
        check_optimizer(cfg)
    cfg.optim.fused = True
    check_optimizer(cfg)  # this torch has fused AdamW on the CPU


def test_a_foreach_state_loaded_into_fused_runs_fused():
    """torch's `load_state_dict` takes the saved groups' kernel flags; the optimizer puts
    its own back, and skips a step on the device afterwards."""
    p = torch.nn.Parameter(torch.ones(4))
    saved = SkippableAdamW([p], foreach=True)
    p.grad = torch.ones(4)
    saved.step()
    opt = SkippableAdamW([p], fused=True, device_skip=True)
    opt.load_state_dict(saved.state_dict())
    assert not opt.param_groups[0]["fused"]  # the saved group's
    opt.restore_implementation()
    assert opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), float("nan"))
    opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())
