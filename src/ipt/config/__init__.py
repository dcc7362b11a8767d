"""Typed configuration: the schema every Hydra config is validated against.

The YAML files under `configs/` hold the defaults; these dataclasses hold the *types*. Hydra
merges the YAML into the schema registered here, so an unknown key or a wrong type fails at
start-up with the full key named (for example `Key 'lr_max' not in 'OptimConfig'`).
Checks that involve several fields (a batch that does not divide, a file that is missing) live
in `validate()`, which also runs before any work.

One module per group, where its reader looks for it: `model`, `data` (with the data
stages), `train` (optim, schedule, deepspeed, logger, train, eval, and the export and
evaluation stages), `loss`, and the techniques' groups: `slm` (teacher, data.select, the
scoring stage), `synth` (the synthesizer's stages) and `decompose` (data.decompose). `run`
holds the pre-training root and `validate`; this module registers the schemas with Hydra and
turns Hydra's configs into them (`to_object`). Everything is importable from `ipt.config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from ipt.config.base import ConfigError
from ipt.config.data import (
    PACKINGS,
    DataConfig,
    DemoDataConfig,
    MixSourceConfig,
    PrepareConfig,
    SourceConfig,
    TokenizerConfig,
)
from ipt.config.decompose import CURRICULA, DecomposeConfig, check_decompose, max_len
from ipt.config.loss import HEAD_TYPES, LossConfig, check_loss
from ipt.config.model import ModelConfig
from ipt.config.run import PretrainConfig, validate
from ipt.config.slm import SCORE_COLUMNS, ScoreConfig, SelectConfig, TeacherConfig
from ipt.config.synth import (
    RCTasksConfig,
    SynthBackendConfig,
    SynthesizeConfig,
    WorldConfig,
)
from ipt.config.train import (
    ACTIVATION_CHECKPOINTING,
    ANOMALY_ACTIONS,
    PRECISIONS,
    SCHEDULES,
    DeepSpeedConfig,
    EvalConfig,
    EvaluateConfig,
    ExportConfig,
    LoggerConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "ACTIVATION_CHECKPOINTING", "ANOMALY_ACTIONS", "CURRICULA", "HEAD_TYPES", "PACKINGS",
    "PRECISIONS", "SCHEDULES", "SCORE_COLUMNS", "ConfigError", "DataConfig", "DecomposeConfig",
    "DeepSpeedConfig", "DemoDataConfig", "EvalConfig", "EvaluateConfig", "ExportConfig",
    "LoggerConfig", "LossConfig", "MixSourceConfig", "ModelConfig", "OptimConfig",
    "PrepareConfig", "PretrainConfig", "RCTasksConfig", "ScheduleConfig", "ScoreConfig",
    "SelectConfig", "SourceConfig", "SynthBackendConfig", "SynthesizeConfig", "TeacherConfig",
    "TokenizerConfig", "TrainConfig", "WorldConfig", "check_decompose", "check_loss", "max_len", "register",
    "to_object", "validate", "writable_dir",
]

SECTIONS: dict[str, type] = {c.__name__: c for c in (
    ModelConfig, DataConfig, MixSourceConfig, OptimConfig, ScheduleConfig, DeepSpeedConfig,
    LossConfig, LoggerConfig, TrainConfig, EvalConfig, SourceConfig, SynthBackendConfig,
    TeacherConfig, SelectConfig, DecomposeConfig)}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; `configs/*.yaml` name them in their defaults."""
    cs = ConfigStore.instance()
    for name, schema in (("pretrain", PretrainConfig), ("export", ExportConfig),
                         ("evaluate", EvaluateConfig),
                         ("demo_data", DemoDataConfig), ("prepare", PrepareConfig),
                         ("tokenizer", TokenizerConfig), ("synthesize", SynthesizeConfig),
                         ("score", ScoreConfig), ("rc_tasks", RCTasksConfig),
                         ("world", WorldConfig)):
        cs.store(name=f"{name}_schema", node=_schema_node(schema))
    OmegaConf.register_new_resolver("ipt.writable_dir", writable_dir, replace=True)


def _schema_node(schema: type) -> DictConfig:
    """`schema` as a config node whose entry maps (ENTRY_TYPES) take new names without `+`,
    so `data.sources='{web: {path: ...}}'` works on the command line; `to_object` checks each
    entry's keys instead of Hydra's struct mode."""
    node = OmegaConf.structured(schema)

    def open_maps(node: DictConfig, kind: type) -> None:
        for f in dataclasses.fields(kind):
            if (kind, f.name) in ENTRY_TYPES:
                OmegaConf.set_struct(node[f.name], False)
            elif str(f.type) in SECTIONS:
                open_maps(node[f.name], SECTIONS[str(f.type)])

    open_maps(node, schema)
    return node


def writable_dir(path: str) -> str:
    """`${ipt.writable_dir:${run_dir}}` as Hydra's run and sweep directory: a run_dir that
    cannot be created or written ends the job with one line and exit code 2 (as
    `ipt.cli.run` does), before Hydra would fail writing into it with a traceback."""
    import os
    import sys

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        print(f"ipt: error: run_dir={path} is not writable ({e}); "
              "set run_dir=<a writable folder>", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through OmegaConf's and Hydra's handlers
    return path


# Maps whose entries a user adds by name (`+sources.web.path=...`): OmegaConf cannot create
# dataclass-typed entries from the command line, so the schema types them `Any` and
# `to_object` checks each entry against its dataclass.
ENTRY_TYPES: dict[tuple[type, str], type] = {
    (DataConfig, "sources"): MixSourceConfig,
    (PrepareConfig, "sources"): SourceConfig,
    (TokenizerConfig, "sources"): SourceConfig,
}


def to_object(cfg: DictConfig, schema: type = PretrainConfig) -> Any:
    """Resolve interpolations and turn Hydra's DictConfig into the typed dataclass `schema`.

    Unknown keys and wrong types anywhere, map entries included, fail with the key named.
    """
    unknown = _unknown_keys(cfg, schema)
    if unknown:  # `+key=value` overrides slip past Hydra's struct mode; nothing else does
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, schema), type(obj)
    _build_entries(obj, "")
    return obj


def _build_entries(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (type(obj), f.name) in ENTRY_TYPES:
            kind = ENTRY_TYPES[type(obj), f.name]
            setattr(obj, f.name, {name: _entry(kind, entry, f"{prefix}{f.name}.{name}", name)
                                  for name, entry in value.items()})
        elif dataclasses.is_dataclass(value):
            _build_entries(value, f"{prefix}{f.name}.")


def _entry(kind: type, entry: Any, key: str, name: str) -> Any:
    if isinstance(entry, kind):
        return entry
    if not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping of {kind.__name__} fields, got {entry!r}")
    known = {f.name for f in dataclasses.fields(kind)}
    if extra := sorted(set(entry) - known):
        raise ConfigError(f"unknown config keys: {', '.join(f'{key}.{k}' for k in extra)} "
                          f"(known: {', '.join(sorted(known))})")
    try:
        obj: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), entry))
    except (ValidationError, MissingMandatoryValue) as e:
        raise ConfigError(f"{key}.{e.key}: {e.msg}") from e
    if "name" in known and not obj.name:
        obj.name = name
    return obj


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in node:
        if key not in fields:
            out.append(f"{prefix}{key}")
            continue
        kind = str(fields[key].type)
        if kind in SECTIONS:
            out += _unknown_keys(node[key], SECTIONS[kind], f"{prefix}{key}.")
    return out
