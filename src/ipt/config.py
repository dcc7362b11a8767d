"""Typed configuration: the schema every Hydra config is validated against.

The YAML files under `configs/` hold the defaults; these dataclasses hold the *types*. Hydra
merges the YAML into the schema registered here, so an unknown key or a wrong type fails at
start-up with the full key named (for example `Key 'lr_max' not in 'OptimConfig'`).
Checks that involve several fields (a batch that does not divide, a file that is missing) live
in `validate()`, which also runs before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to change."""


@dataclass
class ModelConfig:
    """A Llama-family causal LM (see `configs/model/`)."""

    name: str = MISSING
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # A Hugging Face folder to continue pre-training from (weights and architecture);
    # null means random initialisation from the fields above.
    init_from: str | None = None
    # auto: flash_attention_2 on a GPU with flash-attn installed, sdpa otherwise.
    attn_implementation: str = "auto"


@dataclass
class DataConfig:
    """Token shards to train on (written by `data_pipeline/prepare.py`)."""

    root: str | None = None  # a folder the paths below may interpolate (${data.root})
    train: str = MISSING  # directory of token shards
    valid: str | None = None  # directory of token shards for validation loss
    seq_len: int = 256
    seed: int = 1234
    num_workers: int = 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


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
class LossConfig:
    name: str = "ntp"


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
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8  # = micro_batch_size x grad accumulation x ranks
    max_steps: int = 100
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    # Intra-op threads per rank; 0 means cores // local ranks (at least 1).
    threads_per_rank: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_last: int = 3
    resume: str = "auto"  # auto | never | <path of a checkpoint>
    export_at_end: bool = True
    # Stop after this many steps of *this* process (tests use it to simulate a crash).
    stop_after: int | None = None


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DemoDataConfig:
    """`data_pipeline/demo_data.py`: the demo corpus, its tokenizer and its shards."""

    out: str = "data/demo"
    max_docs: int = 6000
    min_chars: int = 200
    vocab_size: int = 4096
    valid_every: int = 50  # every n-th document goes to the validation split


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run's checkpoints/ to take the latest
    out: str = MISSING


SECTIONS: dict[str, type] = {c.__name__: c for c in (
    ModelConfig, DataConfig, OptimConfig, ScheduleConfig, DeepSpeedConfig, LossConfig,
    LoggerConfig, TrainConfig)}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; `configs/*.yaml` name them in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="demo_data_schema", node=DemoDataConfig)


SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")


def to_object(cfg: DictConfig) -> PretrainConfig:
    """Resolve interpolations and turn Hydra's DictConfig into the typed dataclass."""
    unknown = _unknown_keys(cfg, PretrainConfig)
    if unknown:  # `+key=value` overrides slip past Hydra's struct mode; nothing else does
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, PretrainConfig), type(obj)
    return obj


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in node:
        if key not in fields:
            out.append(f"{prefix}{key}")
        elif isinstance(sub := fields[key].type, str) and sub in SECTIONS:
            out += _unknown_keys(node[key], SECTIONS[sub], f"{prefix}{key}.")
    return out


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
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r}; expected one of {SCHEDULES}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}; expected one of {PRECISIONS}")
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage}; expected 0, 1, 2 or 3")
    if cfg.data.seq_len > cfg.model.max_seq_len and cfg.model.init_from is None:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    for key, path in (("tokenizer", cfg.tokenizer), ("data.train", cfg.data.train),
                      ("data.valid", cfg.data.valid), ("model.init_from", cfg.model.init_from)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
    return t.global_batch_size // per_step
