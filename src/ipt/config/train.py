"""The run's groups: `optim`, `schedule`, `deepspeed`, `logger`, `train`, `eval`; and the
export and evaluation stages' schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

SCHEDULES = ("cosine", "wsd", "constant")


PRECISIONS = ("auto", "fp32", "bf16")


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# What the trainer does about a loss spike or a non-finite loss (`ipt.health`)
ANOMALY_ACTIONS = ("skip", "stop", "rollback", "none")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # AdamW's fused kernel (one launch per parameter group) instead of its foreach kernels;
    # refused at start-up on a device torch has no fused AdamW for.
    fused: bool = False
    # The optimizer, not DeepSpeed, skips a step whose gradient norm is not finite, on the
    # device (fused AdamW's found_inf: weights, moments and step count stay as they were),
    # and clips the gradients there too; DeepSpeed's own overflow check and clipping, which
    # read the norm on the host, are turned off (ipt.health.SkippableAdamW). The trainer
    # reads such a step's norm with the next step's metrics. Needs fused.
    device_skip: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule as a function of the optimizer step (see `ipt.schedule`)."""

    name: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0
    # Continual pre-training re-warms from this fraction of the peak lr instead of from 0.
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the run spent in the final decay


@dataclass
class DeepSpeedConfig:
    """Rendered into DeepSpeed's config dict by `ipt.engine.deepspeed_config`."""

    stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    # Anything else DeepSpeed accepts, merged last (e.g. {"zero_optimization": {...}}).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    log_every: int = 10
    progress_bar: str = "auto"  # auto (on a terminal) | always | never
    wandb: bool = False
    wandb_project: str = "ipt"
    wandb_group: str | None = None
    tensorboard: bool = False
    plot: bool = True
    # Peak FLOP/s of one device for MFU; null: looked up for known GPUs, not reported on CPU.
    peak_flops: float | None = None


@dataclass
class EvalConfig:
    """Downstream evaluation during training (`ipt.evaluate.DownstreamEval`): the live
    weights on lm-evaluation-harness tasks, on rank 0, while the other ranks wait."""

    tasks: list[str] = field(default_factory=list)  # harness or local task names; []: off
    include_path: str | None = None  # a folder of local task YAML files
    every: int = 0  # steps between evaluations; 0: only at the end of the run
    num_fewshot: int = 0
    limit: float | None = None  # examples per task (a fraction if < 1); null: all
    batch_size: int = 16
    max_length: int = 0  # context the harness may use; 0: the model's own
    seed: int = 1234


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8  # = micro_batch_size x grad accumulation x ranks
    max_steps: int = 100
    # auto: bf16 on a GPU that has it, fp32 elsewhere | fp32 | bf16. In bf16 the weights the
    # forward and backward use are bf16; DeepSpeed keeps fp32 master weights and optimizer
    # state.
    precision: str = "auto"
    # none | full (every decoder layer) | selective (every ac_every-th layer): recompute the
    # layer in the backward instead of keeping its activations (ipt.model.checkpoint_layers).
    activation_checkpointing: str = "none"
    ac_every: int = 2
    # Regional torch.compile: each decoder layer's forward (and each MTP head's).
    compile: bool = False
    seed: int = 0
    # Intra-op threads per rank; 0 means cores // local ranks (at least 1).
    threads_per_rank: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_last: int = 3
    resume: str = "auto"  # auto | never | <path of a checkpoint>
    # A rank that finishes no step (with its evaluation and checkpoint) for this long ends the
    # job with a message and its threads' stacks: a dead or hung peer blocks every collective.
    # Also the collectives' own timeout. 0: wait forever.
    hang_timeout_s: float = 1800.0
    # A step whose loss is not finite, or spikes (more than spike_sigma standard deviations
    # above the mean of the last spike_window steps; 0: non-finite only), gets no update and:
    # skip: training goes on | stop: the run ends with an error | rollback: the weights go
    # back to the last checkpoint, the data since is skipped (ipt.health) | none: no check.
    # Checking reads the step's loss on the host before its update, and its gradient norm
    # after it (two syncs per step; with optim.device_skip one: the norm is read with the next
    # step's loss); with none, metrics are read once per logger.log_every steps, and so are
    # stop signals.
    on_anomaly: str = "skip"
    spike_sigma: float = 6.0
    spike_window: int = 100
    max_anomalies_in_row: int = 5  # more in a row end the run: it has diverged
    max_rollbacks: int = 5  # rollback: after this many in one run, the next anomaly ends it
    export_at_end: bool = True
    # Stop after this many steps of *this* process (tests use it to simulate a crash).
    stop_after: int | None = None


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run's checkpoints/ to take the latest
    out: str = MISSING


@dataclass
class EvaluateConfig:
    """`train/evaluate.py`: downstream tasks with lm-evaluation-harness (ipt.evaluate)."""

    # a Hugging Face folder, an ipt run (its hf/ export, else its latest checkpoint), a
    # checkpoint, or a checkpoints/ folder
    checkpoint: str = MISSING
    tasks: list[str] = field(default_factory=list)  # harness task names, or local ones
    include_path: str | None = None  # a folder of local task YAML files
    out: str = MISSING  # gets results.json and table.md
    num_fewshot: int = 0
    batch_size: int = 16
    limit: float | None = None  # examples per task (a fraction if < 1); null: all
    max_length: int = 0  # context the harness may use; 0: the model's own
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234
