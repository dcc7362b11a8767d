"""Loss modules: given the model and a micro-batch, return the loss and what to log.

The trainer calls `loss_fn(model, batch, step)` and back-propagates the returned loss through
the DeepSpeed engine; it knows nothing else about losses. A loss honours the per-token side
channels of a batch: `labels == IGNORE` positions (loss masks, document ends) never count.
Losses register here under the name their `configs/loss/*.yaml` gives (multi-token
prediction lives in `ipt.mtp`); distillation wraps whichever is configured (`ipt.slm.kd`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ipt.config import ConfigError, LossConfig

IGNORE = -100


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # target tokens that counted


class NextTokenLoss:
    """Mean cross-entropy of the next token over the positions that have a target."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 step: int) -> LossOutput:
        labels = batch["labels"]
        extra = {k: v for k, v in batch.items() if k in ("position_ids", "attention_mask")}
        logits = model(input_ids=batch["input_ids"], **extra).logits
        tokens = int((labels != IGNORE).sum())
        # A sum over max(tokens, 1): a micro-batch whose every token is masked (all context,
        # in SFT data) gives 0 with a graph, not a NaN mean.
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE, reduction="sum") / max(tokens, 1)
        return LossOutput(loss, {"ce": loss.item()}, tokens)


def _mtp(cfg: LossConfig, eos_id: int | None) -> Callable[..., LossOutput]:
    from ipt.mtp.loss import MTPLoss

    return MTPLoss(cfg, eos_id)


LOSSES: dict[str, Callable[[LossConfig, int | None], Callable]] = {
    "ntp": lambda cfg, eos_id: NextTokenLoss(),
    "mtp": _mtp,
}


def build_loss(cfg: LossConfig, eos_id: int | None = None) -> Callable[..., LossOutput]:
    """The loss `cfg` names; `eos_id` ends documents in packed sequences (multi-token
    targets must not cross them)."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg, eos_id)
