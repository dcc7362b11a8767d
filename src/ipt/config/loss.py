"""`loss`: next-token (`ntp`) or multi-token prediction (`mtp`, the heads of `ipt.mtp`),
through the fused unembedding (`ipt.losses`)."""

from __future__ import annotations

from dataclasses import dataclass

from ipt.config.base import ConfigError

# The MTP heads' types (`ipt.mtp.heads`)
HEAD_TYPES = ("parallel", "sequential")


@dataclass
class LossConfig:
    """The training loss (`configs/loss/`): ntp, or mtp (multi-token prediction)."""

    name: str = "ntp"
    # mtp: n heads, head i predicting token t + i; head 1 is the model's own next-token head,
    # heads 2..n are extra decoder layers kept beside the export (docs/mtp.md).
    heads: int = 1
    head_type: str = "parallel"  # parallel (Gloeckle et al.) | sequential (DeepSeek-V3)
    weights: list[float] | None = None  # one per head; null: all 1
    # Other weights once `later_from_step` optimizer steps are done, i.e. from logged step
    # later_from_step + 1 on (DeepSeek-V3 lowers its MTP weight from 0.3 to 0.1 late in
    # training); null: the same weights throughout.
    later_weights: list[float] | None = None
    later_from_step: int | None = None
    reduction: str = "mean"  # mean | sum over heads (each head's CE a mean over its targets)
    # false: every head's logits at once (the naive baseline, for comparison)
    memory_efficient: bool = True
    chunk_size: int = 1024  # positions per vocabulary-projection chunk


def check_loss(cfg: LossConfig) -> None:
    """What the schema cannot say about the loss group."""
    if cfg.name != "mtp":
        if cfg.heads != 1:
            raise ConfigError(f"loss.heads={cfg.heads} needs loss=mtp (loss={cfg.name} "
                              "has the next-token head only)")
        return
    if cfg.heads < 1:
        raise ConfigError(f"loss.heads={cfg.heads}: there must be at least one head (head 1 "
                          "is the next-token head)")
    if cfg.head_type not in HEAD_TYPES:
        raise ConfigError(f"loss.head_type={cfg.head_type!r}; built: {HEAD_TYPES}")
    for key in ("weights", "later_weights"):
        w = getattr(cfg, key)
        if w is not None and (len(w) != cfg.heads or any(x < 0 for x in w)):
            raise ConfigError(f"loss.{key}={list(w)} must give one weight >= 0 per head "
                              f"(loss.heads={cfg.heads})")
    if (cfg.later_weights is None) != (cfg.later_from_step is None):
        raise ConfigError("loss.later_weights and loss.later_from_step go together: set both "
                          "(or neither)")
    if cfg.later_from_step is not None and cfg.later_from_step < 0:
        raise ConfigError(f"loss.later_from_step={cfg.later_from_step} must be >= 0 (optimizer "
                          "steps done before the later weights apply)")
    if cfg.reduction not in ("sum", "mean") or cfg.chunk_size < 1:
        raise ConfigError(f"loss.reduction={cfg.reduction!r} must be sum or mean, "
                          f"loss.chunk_size={cfg.chunk_size} >= 1")
