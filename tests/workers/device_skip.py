"""Real DeepSpeed engines on one CPU rank, with and without `optim.device_skip`, run through
the real trainer; what `tests/test_device_skip.py` checks is written to argv[1].

- `planted/<stage>-<precision>`: steps 2 and 4 (the last) get an infinite gradient through a
  hook; after every step, the optimizer's fp32 weights, moments and step counts, the model's
  weights and the step's metrics row.
- `losses/<stage>-<switch>`: four ordinary steps (with clipping that bites), their losses and
  the final fp32 weights; `losses/zero1-fused` with fused AdamW alone.
- `reads/<stage>-<precision>-<switch>`: host reads of tensor values inside `engine.step()`.
- `resume/saved-<switch>`: the clipping and kernel of an engine that loaded a checkpoint
  saved with the other setting.

    python tests/workers/device_skip.py out.pt
"""

import sys
import tempfile
from typing import Any

import torch
from host_reads import HostReads  # beside this script

from ipt.checkpoint import TrainerState
from ipt.config import ModelConfig, PretrainConfig
from ipt.engine import build_engine, init_distributed
from ipt.health import AnomalyPolicy, LossAnomalies
from ipt.losses import NextTokenLoss
from ipt.model import build_model
from ipt.trainer import Trainer, TrainerOptions

VOCAB, SEQ, MICRO, ACCUM, STEPS = 64, 16, 2, 2, 4
PLANTED = (2, 4)


def config(stage: int, precision: str, device_skip: bool, clip: float = 1.0,
           fused: bool | None = None) -> PretrainConfig:
    cfg = PretrainConfig(tokenizer="-")
    cfg.deepspeed.stage, cfg.train.precision = stage, precision
    cfg.optim.device_skip = device_skip
    cfg.optim.fused = device_skip if fused is None else fused
    cfg.optim.grad_clip, cfg.optim.lr = clip, 1e-2
    cfg.train.micro_batch_size, cfg.train.global_batch_size = MICRO, MICRO * ACCUM
    return cfg


def engine_for(cfg: PretrainConfig) -> Any:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="t", hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, num_kv_heads=2,
                                    max_seq_len=SEQ), VOCAB)
    return build_engine(model, cfg, ACCUM, lambda step: 1.0)


def batches():
    g = torch.Generator().manual_seed(1)
    while True:
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        yield {"input_ids": ids, "labels": labels}


def host(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}


class Record:
    """Each step's metrics row (read after the run) and, optionally, a copy of the weights
    and optimizer state."""

    def __init__(self, engine: Any, snapshots: bool) -> None:
        self.engine, self.snapshots = engine, snapshots
        self.rows: list[dict[str, Any]] = []
        self.snaps: list[dict[str, list[torch.Tensor]]] = []

    def on_start(self, trainer: Trainer) -> None:
        if self.snapshots:
            self.snaps.append(self.snapshot())

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.rows.append(metrics)
        if self.snapshots:
            self.snaps.append(self.snapshot())

    def on_end(self, trainer: Trainer) -> None:
        self.rows = [host(r) for r in self.rows]

    def snapshot(self) -> dict[str, list[torch.Tensor]]:
        opt = self.engine.basic_optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        state = [v for p in params for v in opt.state[p].values()]
        return {"fp32": [p.detach().clone() for p in params],
                "state": [torch.as_tensor(v).clone() for v in state],
                "model": [p.detach().clone() for p in self.engine.module.parameters()]}


def train(cfg: PretrainConfig, snapshots: bool = False, plant: bool = False) -> Record:
    engine = engine_for(cfg)
    record = Record(engine, snapshots)
    trainer = Trainer(engine, NextTokenLoss(), batches(), TrainerState(), DIST, [record],
                      TrainerOptions(ACCUM, MICRO * ACCUM, SEQ, STEPS),
                      anomalies=AnomalyPolicy(LossAnomalies(0.0, 100, 5), "skip"))
    if plant:
        weight = next(p for n, p in engine.module.named_parameters() if "q_proj" in n)
        weight.register_hook(lambda g: torch.full_like(g, float("inf"))
                             if trainer.state.step + 1 in PLANTED else None)
    trainer.fit()
    return record


def reads_in_engine_step(cfg: PretrainConfig) -> int:
    """Host reads inside `engine.step()` at the second of two steps (the first sets up)."""
    engine = engine_for(cfg)
    step, reads = engine.step, HostReads()

    def counted(*args, **kwargs):
        with reads:
            return step(*args, **kwargs)

    engine.step = counted
    trainer = Trainer(engine, NextTokenLoss(), batches(), TrainerState(), DIST, [],
                      TrainerOptions(ACCUM, MICRO * ACCUM, SEQ, 2))
    trainer.train_step()
    reads.count = 0
    trainer.train_step()
    return reads.count


def resumed(saved_with: bool) -> dict[str, Any]:
    """Save a ZeRO-1 checkpoint with the switch `saved_with`, load it into an engine with the
    other setting: its clipping and kernel."""
    with tempfile.TemporaryDirectory() as root:
        before = engine_for(config(1, "fp32", saved_with))
        Trainer(before, NextTokenLoss(), batches(), TrainerState(), DIST, [],
                TrainerOptions(ACCUM, MICRO * ACCUM, SEQ, 1)).train_step()
        before.save_checkpoint(root, tag="t")
        after = engine_for(config(1, "fp32", not saved_with))
        after.load_checkpoint(root, tag="t")
        groups = after.basic_optimizer.param_groups
        return {"clip_grad": after.optimizer.clip_grad,
                "fused": [g["fused"] for g in groups], "foreach": [g["foreach"] for g in groups]}


def main(out: str) -> None:
    results: dict[str, Any] = {}
    for stage, precision in ((0, "fp32"), (1, "fp32"), (1, "bf16")):
        r = train(config(stage, precision, True), snapshots=True, plant=True)
        results[f"planted/zero{stage}-{precision}"] = {"rows": r.rows, "snaps": r.snaps}
    for stage in (0, 1):
        for switch in (False, True):
            r = train(config(stage, "fp32", switch, clip=0.05), snapshots=True)
            results[f"losses/zero{stage}-{switch}"] = {"losses": [x["loss"] for x in r.rows],
                                                       "fp32": r.snaps[-1]["fp32"]}
    r = train(config(1, "fp32", False, clip=0.05, fused=True), snapshots=True)
    results["losses/zero1-fused"] = {"losses": [x["loss"] for x in r.rows],
                                     "fp32": r.snaps[-1]["fp32"]}
    for stage, precision in ((0, "fp32"), (1, "fp32"), (1, "bf16")):
        for switch in (False, True):
            results[f"reads/zero{stage}-{precision}-{switch}"] = reads_in_engine_step(
                config(stage, precision, switch))
    for saved_with in (False, True):
        results[f"resume/saved-{saved_with}"] = resumed(saved_with)
    torch.save(results, out)


if __name__ == "__main__":
    DIST = init_distributed(threads_per_rank=1)
    main(sys.argv[1])
