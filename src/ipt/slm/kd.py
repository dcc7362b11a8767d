"""Online distillation from a small LM (SALT, stage 1), as a loss module.

    L = (1 - w) * CE(student, labels) + w * KD(teacher -> student)

KD is the token-level cross-entropy of the student's softmax against the teacher's, both at
temperature tau, scaled by tau^2 (so its gradient does not shrink as tau grows). Only
positions with a target count, so loss masks and document ends are honoured by both parts.

Memory: the logits are never materialised for the whole micro-batch. The student and the
teacher run their trunks once; the vocabulary projections run over chunks of `chunk_size`
target positions inside activation checkpoints, so at most a few [chunk, vocab] fp32 tensors
exist at a time, in the forward and again in the backward (which recomputes a chunk's
logits from its hidden states instead of storing them).

`w` follows the step (`kd_weight`): KD for the first `kd_steps`, then a hard switch, or a
linear decay to 0 over `decay_steps`. Once it is 0 for good, the teacher is released and the
loss is plain next-token loss, at no further cost.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ipt.config import TeacherConfig
from ipt.losses import IGNORE, LossOutput, NextTokenLoss

log = logging.getLogger(__name__)


def kd_weight(cfg: TeacherConfig, step: int) -> float:
    """w at optimizer step `step` (0-based): a pure function, so resume is exact."""
    if step < cfg.kd_steps:
        return cfg.weight
    if cfg.switch == "linear" and step < cfg.kd_steps + cfg.decay_steps:
        return cfg.weight * (1 - (step - cfg.kd_steps + 1) / (cfg.decay_steps + 1))
    return 0.0


def _chunk(h_s: torch.Tensor, h_t: torch.Tensor, y: torch.Tensor, head_s: torch.nn.Module,
           head_t: torch.nn.Module, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = head_s(h_s).float()
    ce = F.cross_entropy(s, y, reduction="sum")
    with torch.no_grad():
        p_t = F.softmax(head_t(h_t).float() / tau, dim=-1)
    kd = -(p_t * F.log_softmax(s / tau, dim=-1)).sum() * tau**2
    return ce, kd


def kd_losses(h_s: torch.Tensor, h_t: torch.Tensor, labels: torch.Tensor,
              head_s: torch.nn.Module, head_t: torch.nn.Module, tau: float,
              chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(CE sum, KD sum, target count) over the positions of `labels` that have a target."""
    keep = (labels.flatten() != IGNORE).nonzero().squeeze(1)
    hs, ht = h_s.flatten(0, 1)[keep], h_t.flatten(0, 1)[keep]
    y = labels.flatten()[keep]
    ce = kd = hs.sum() * 0.0  # part of the graph even with no target in this micro-batch
    for a in range(0, len(keep), chunk_size):
        c, k = checkpoint(_chunk, hs[a:a + chunk_size], ht[a:a + chunk_size],
                          y[a:a + chunk_size], head_s, head_t, tau, use_reentrant=False)
        ce, kd = ce + c, kd + k
    return ce, kd, len(keep)


class DistillationLoss:
    """Next-token loss plus KD from a frozen teacher, on the schedule of `cfg`."""

    def __init__(self, teacher: Any, cfg: TeacherConfig) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.plain = NextTokenLoss()

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int) -> LossOutput:
        w = kd_weight(self.cfg, step)
        if w == 0.0 or not torch.is_grad_enabled():  # after the KD phase, and in evaluation
            if w == 0.0 and step >= self.cfg.kd_steps and self.teacher is not None:
                self.release()
            out = self.plain(model, batch, step)
            out.metrics |= {"kd_weight": w}
            return out
        assert self.teacher is not None, "the teacher was released before the KD phase ended"
        student = model.module if hasattr(model, "module") else model
        inputs = {"input_ids": batch["input_ids"]}
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        h_s = student.model(**inputs).last_hidden_state
        with torch.no_grad():
            h_t = self.teacher.model(**inputs).last_hidden_state
        ce, kd, n = kd_losses(h_s, h_t, batch["labels"], student.lm_head, self.teacher.lm_head,
                              self.cfg.temperature, self.cfg.chunk_size)
        ce, kd = ce / max(n, 1), kd / max(n, 1)
        loss = (1 - w) * ce + w * kd
        return LossOutput(loss, {"ce": ce.item(), "kd": kd.item(), "kd_weight": w}, n)

    def release(self) -> None:
        """Drop the teacher: the rest of the run pays nothing for it."""
        log.info("KD phase over: teacher released")
        self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
