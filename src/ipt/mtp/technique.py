"""Multi-token prediction as a technique of a run: extra heads on the model, their FLOPs,
their record in the checkpoint, and their weights beside an export."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ipt.config import ConfigError, PretrainConfig
from ipt.model import flops_per_token
from ipt.mtp.heads import PREFIX, HeadsError, MTPModel, attach, save_heads
from ipt.technique import Flops, Setup, Technique


class MultiToken(Technique):
    """`loss=mtp`: `loss.heads - 1` extra heads of `loss.head_type` (the loss itself is the
    core's fused loss, `ipt.losses.fused`, which runs any number of heads)."""

    name = "mtp"
    state_prefix = PREFIX

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.extra = cfg.loss.heads - 1
        self.head_params: int | None = None

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> MultiToken | None:
        return cls(cfg) if cfg.loss.name == "mtp" else None

    def model(self, lm: Any, setup: Setup) -> MTPModel | None:
        if not self.extra:
            return None
        try:
            model = attach(lm, self.extra, self.cfg.model.init_from, self.cfg.loss.head_type)
        except HeadsError as e:  # a start-up refusal, with the config that asked for heads
            raise ConfigError(f"loss=mtp loss.heads={self.cfg.loss.heads}: {e}") from e
        self.head_params = sum(p.numel() for p in model.mtp_heads[0].parameters())
        return model

    def model_config(self) -> dict[str, Any]:
        return {"mtp_heads": self.extra,
                "mtp_head_type": self.cfg.loss.head_type if self.extra else None}

    def flops(self, flops: Flops, lm: Any) -> Flops:
        if not self.extra:
            return flops
        return functools.partial(flops_per_token, lm, extra_heads=self.extra,
                                 head_params=self.head_params)

    @classmethod
    def export(cls, extra: dict[str, torch.Tensor], hf_config: Any, out: Path,
               run_config: dict[str, Any]) -> None:
        head_type = str((run_config.get("loss") or {}).get("head_type", "parallel"))
        save_heads(extra, hf_config, out, head_type)
