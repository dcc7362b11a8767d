"""What a run shows: `metrics.jsonl` always, a progress bar or log lines, wandb, TensorBoard,
and a loss-curve PNG at the end. All of it happens on rank 0, as a trainer callback."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from ipt.config import LoggerConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s (no sparsity) by the exact name `torch.cuda.get_device_name()`
# reports, from the vendors' datasheets: a part's SXM, PCIe and NVL forms differ by up to 25%,
# so a substring match would give a PCIe card the SXM peak.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 125e12,
}


def peak_flops(configured: float | None, device_name: str | None = None) -> float | None:
    """One device's dense bf16 peak: `logger.peak_flops` when set, else the table's entry for
    this GPU's exact name. An unknown GPU gets None (no MFU), with a warning naming it,
    rather than a guess."""
    if configured:
        return configured
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    peak = PEAK_FLOPS.get(device_name.strip())
    if peak is None:
        log.warning("no peak FLOP/s known for %r, so no MFU is logged: set logger.peak_flops "
                    "to its dense bf16 peak", device_name)
    return peak


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes one JSON object per step to metrics.jsonl; every `log_every` steps (and at each
    validation) also to the log or progress bar, wandb and TensorBoard."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, max_steps: int,
                 config: dict[str, Any], run_name: str) -> None:
        self.cfg, self.run_dir, self.max_steps = cfg, run_dir, max_steps
        self.path = run_dir / "metrics.jsonl"
        self.pending: list[dict[str, Any]] = []  # rows not written yet (values on the device)
        self.written: dict[str, Any] = {}
        self.file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run
        show = cfg.progress_bar == "always" or (cfg.progress_bar == "auto" and sys.stderr.isatty())
        self.bar = None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, desc=run_name, unit="step", dynamic_ncols=True)
        self.wandb = self._start_wandb(config, run_name) if cfg.wandb else None
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _start_wandb(self, config: dict[str, Any], run_name: str):
        import wandb

        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        # The run id is kept in the run directory, so a resumed job continues the same run.
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.wandb_project, group=self.cfg.wandb_group,
                          name=run_name, id=run_id, resume="allow", config=config,
                          dir=str(self.run_dir))

    def on_start(self, trainer) -> None:
        if self.bar is not None:
            self.bar.update(trainer.state.step)

    def on_step(self, trainer, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
        self.pending.append(metrics)
        step = metrics["step"]
        due = step % self.cfg.log_every == 0 or step == self.max_steps or "val_loss" in metrics \
            or "downstream/seconds" in metrics
        if due or not _on_device(metrics):
            self.flush()
        if due:
            self.show(self.written)

    def flush(self) -> None:
        """Write the pending rows, reading whatever of them is still on the device at once
        (one sync per logging interval, not one per step)."""
        if not self.pending:
            return
        for row in to_host(self.pending):
            self.file.write(json.dumps(row) + "\n")  # every step: cheap, and plots need it
            self.written = row
        self.file.flush()
        self.pending = []
        if self.bar is not None and self.written.get("tokens_per_s") is not None:
            self.bar.set_postfix(loss=f"{self.written['loss']:.4f}",
                                 tok_s=f"{self.written['tokens_per_s']:.0f}")

    def show(self, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in metrics.items())
            log.info(shown)
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    def on_end(self, trainer) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.cfg.plot:
            plot_losses(self.path, self.run_dir / "loss.png")
        if self.wandb is not None:
            if trainer.stopped:
                self.wandb.mark_preempting()  # shown as preempted; the requeued job resumes it
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _on_device(row: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in row.values())


def to_host(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every tensor value a float, read from the device in one transfer."""
    where = [(i, k) for i, row in enumerate(rows) for k, v in row.items()
             if isinstance(v, torch.Tensor)]
    if not where:
        return rows
    device = rows[where[0][0]][where[0][1]].device
    values = torch.stack([rows[i][k].detach().reshape(()).to(device, torch.float64)
                          for i, k in where]).tolist()
    out = [dict(row) for row in rows]
    for (i, k), v in zip(where, values, strict=True):
        out[i][k] = v
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, the last row of each step winning (after a resume)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[k] for k in sorted(rows)]


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    scores = sorted({k for r in rows for k in r if k.startswith("downstream/")
                     and k.rsplit("/", 1)[1] in ("acc", "exact_match")})
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4),
                             squeeze=False)
    ax = axes[0][0]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:  # the accuracy panel: downstream tasks during training
        acc = axes[0][1]
        for key in scores:
            points = [(r["step"], r[key]) for r in rows if key in r]
            acc.plot(*zip(*points, strict=True), "o-", label=key.removeprefix("downstream/"))
        acc.set_xlabel("step")
        acc.set_ylabel("accuracy / exact match")
        acc.set_ylim(0, 1)
        acc.grid(alpha=0.3)
        acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
