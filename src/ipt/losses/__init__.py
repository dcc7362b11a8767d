"""Loss modules: given the model and a micro-batch, return the loss and what to log.

The trainer calls `loss_fn(model, batch, step, norm)` and back-propagates the returned loss
through the DeepSpeed engine; it knows nothing else about losses. A loss honours the
per-token side channels of a batch: `labels == IGNORE` positions (loss masks, document ends)
never count. Losses register here under the name their `configs/loss/*.yaml` gives
(`ipt.losses.fused` runs one head or several); distillation wraps whichever is configured
(`ipt.slm.kd`).

Weighting. A loss is a sum over target tokens divided by a denominator per term (one term for
next-token loss, one per head for multi-token prediction). Before a step's first forward the
trainer asks the loss for each micro-batch's target counts (`count_targets`, read off the
host batch), adds them up over the step's micro-batches and ranks, and hands every
micro-batch `norm[i] = count_i / (micro-batches x ranks)`. DeepSpeed then averages the
micro-batches' gradients over accumulation steps and ranks, so the step's gradient is that
of the sum over all its target tokens divided by their number: every token weighs the same,
whatever micro-batch it sits in, and the objective does not change with
`train.micro_batch_size` or the number of ranks. Without `norm` (evaluation, tests) a
micro-batch is normalised by its own counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ipt.config import ConfigError, LossConfig
from ipt.losses.base import IGNORE, Loss, LossOutput, NextTokenLoss, denominator, target_count
from ipt.losses.fused import FusedLoss

__all__ = ["IGNORE", "LOSSES", "FusedLoss", "Loss", "LossOutput", "NextTokenLoss",
           "build_loss", "denominator", "target_count"]


def _ntp(cfg: LossConfig, eos_id: int | None) -> Loss:
    """Next-token loss as the one-head case of the fused unembedding and cross-entropy
    (`ipt.losses.fused`): logits exist one chunk of positions at a time, and distillation
    mixes into the same pass. The model has no extra heads (`ipt.model.FusedLM`)."""
    return FusedLoss(replace(cfg, heads=1, weights=None, later_weights=None,
                             later_from_step=None, reduction="sum"), eos_id)


def _mtp(cfg: LossConfig, eos_id: int | None) -> Loss:
    """One term per head: the extra heads are attached by `ipt.mtp`."""
    return FusedLoss(cfg, eos_id)


LOSSES: dict[str, Callable[[LossConfig, int | None], Loss]] = {
    "ntp": _ntp,
    "mtp": _mtp,
}


def build_loss(cfg: LossConfig, eos_id: int | None = None) -> Loss:
    """The loss `cfg` names; `eos_id` ends documents in packed sequences (multi-token
    targets must not cross them)."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg, eos_id)
