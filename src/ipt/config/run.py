"""The pre-training job's root schema, and the checks that span its groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from ipt.config.base import ConfigError
from ipt.config.data import PACKINGS, DataConfig
from ipt.config.decompose import check_decompose
from ipt.config.loss import LossConfig, check_loss
from ipt.config.model import ModelConfig
from ipt.config.slm import TeacherConfig, check_select, check_teacher
from ipt.config.train import (
    ACTIVATION_CHECKPOINTING,
    ANOMALY_ACTIONS,
    PRECISIONS,
    SCHEDULES,
    DeepSpeedConfig,
    EvalConfig,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)


@dataclass
class PretrainConfig:
    """The whole job: `train/pretrain.py` and the functions it calls read only this."""

    name: str = "run"
    run_dir: str = "runs/${name}"
    tokenizer: str = MISSING  # folder with tokenizer.model / tokenizer.json
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate(cfg: PretrainConfig, world_size: int) -> int:
    """Check what a schema cannot; returns the gradient-accumulation steps.

    Runs before the model is built, so a mistake costs seconds, not a queue slot.
    """
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}"
        )
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    if t.on_anomaly not in ANOMALY_ACTIONS:
        raise ConfigError(f"train.on_anomaly={t.on_anomaly!r}; expected one of {ANOMALY_ACTIONS}")
    if t.spike_sigma < 0 or t.spike_window < 1 or t.max_anomalies_in_row < 0 \
            or t.max_rollbacks < 0:
        raise ConfigError(f"train.spike_sigma={t.spike_sigma} (>= 0), train.spike_window="
                          f"{t.spike_window} (>= 1), train.max_anomalies_in_row="
                          f"{t.max_anomalies_in_row} (>= 0) and train.max_rollbacks="
                          f"{t.max_rollbacks} (>= 0) are out of range")
    if t.hang_timeout_s < 0:
        raise ConfigError(f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: no limit)")
    e = cfg.eval
    if e.tasks and (e.every < 0 or e.num_fewshot < 0 or e.batch_size < 1
                    or (e.limit is not None and e.limit <= 0)):
        raise ConfigError(f"eval.every={e.every} (>= 0), eval.num_fewshot={e.num_fewshot} "
                          f"(>= 0), eval.batch_size={e.batch_size} (>= 1) and eval.limit="
                          f"{e.limit} (> 0 or null) are out of range")
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r}; expected one of {SCHEDULES}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}; expected one of {PRECISIONS}")
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING or t.ac_every < 1:
        raise ConfigError(f"train.activation_checkpointing={t.activation_checkpointing!r} "
                          f"must be one of {ACTIVATION_CHECKPOINTING}, and train.ac_every="
                          f"{t.ac_every} >= 1")
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage}; expected 0, 1, 2 or 3")
    if cfg.data.seq_len > cfg.model.max_seq_len and cfg.model.init_from is None:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name at least one prepared source folder")
    if cfg.teacher.enabled:
        check_teacher(cfg.teacher)
    check_loss(cfg.loss)
    check_select(cfg.data.select, cfg.teacher)
    if cfg.data.packing not in PACKINGS:
        raise ConfigError(f"data.packing={cfg.data.packing!r}; expected one of {PACKINGS}")
    if cfg.data.packing == "decompose":
        check_decompose(cfg)
    paths = [("tokenizer", cfg.tokenizer), ("model.init_from", cfg.model.init_from)]
    paths += [(f"data.sources.{name}.path", f"{m.path}/train")
              for name, m in cfg.data.sources.items()]
    for key, path in paths:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
    return t.global_batch_size // per_step
