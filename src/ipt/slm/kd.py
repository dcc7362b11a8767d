"""Distillation from a small LM (SALT, stage 1), as a loss module.

    L = (1 - w) * CE(student, labels) + w * KD(teacher -> student)

KD is the token-level cross-entropy of the student's softmax against the teacher's, both at
temperature tau, scaled by tau^2 (so its gradient does not shrink as tau grows). Only
positions with a target count, so loss masks and document ends are honoured by both parts.

Memory: the student's logits come from its ordinary forward (through the DeepSpeed engine,
which under ZeRO-3 must see the whole forward to gather parameters and scale gradients).
The loss and its gradient with respect to those logits are computed together
(`ipt.losses.kd`, shared with the fused unembedding loss), over chunks
of `chunk_size` positions: the teacher's logits and the fp32 softmaxes exist one chunk at a
time, and what is kept for the backward is the gradient itself (the size of the logits, in
their dtype; autograd would build it anyway). Nothing is recomputed.

`w` follows the step (`kd_weight`): KD for the first `kd_steps`, then a hard switch, or a
linear decay to 0 over `decay_steps`. Once it is 0 for good, the teacher is released and the
loss is plain next-token loss, at no further cost.

The teacher is online (its forward runs in the step) or offline: its top-K log-probabilities
per token, written once by the scoring stage (`ipt.slm.soft_labels`), arrive with the batch.
Either way the loss sees the teacher as a function giving its distribution for a chunk.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ipt.attention import model_inputs
from ipt.config import TeacherConfig
from ipt.losses import Loss, LossOutput, denominator
from ipt.losses.kd import KDTerm, kd_losses, offline_probs, online_probs
from ipt.losses.logits import logit_rule

log = logging.getLogger(__name__)


def kd_weight(cfg: TeacherConfig, step: int) -> float:
    """w at optimizer step `step` (0-based): a pure function, so resume is exact."""
    if step < cfg.kd_steps:
        return cfg.weight
    if cfg.switch == "linear" and step < cfg.kd_steps + cfg.decay_steps:
        return cfg.weight * (1 - (step - cfg.kd_steps + 1) / (cfg.decay_steps + 1))
    return 0.0


class DistillationLoss:
    """KD from a frozen teacher mixed into next-token loss, on the schedule of `cfg`; outside
    the KD phase (and in evaluation) it is the run's configured loss, `base`.

    Online (`teacher` a model) the teacher runs on each batch; offline (`cfg.soft_labels`,
    `teacher` None) its stored top-K log-probabilities come with the batch, from the loader.
    The phase follows the step: a rollback that returns into it after the teacher was
    released loads it again (`reload`).
    """

    def __init__(self, teacher: Any, cfg: TeacherConfig, base: Loss,
                 vocab_size: int | None = None,
                 reload: Callable[[], Any] | None = None) -> None:
        self.teacher, self.cfg, self.base, self.vocab_size = teacher, cfg, base, vocab_size
        self.reload = reload

    def count_targets(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return self.base.count_targets(batch)  # KD counts where next-token loss does

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int,
                 norm: Sequence[float] | None = None) -> LossOutput:
        w = kd_weight(self.cfg, step)
        if w == 0.0 or not torch.is_grad_enabled():  # after the KD phase, and in evaluation
            if w == 0.0 and step >= self.cfg.kd_steps and self.teacher is not None:
                self.release()
            out = self.base(model, batch, step, norm)
            out.metrics |= {"kd_weight": w}
            return out
        # A loss that takes the teacher (the fused next-token and multi-token losses) runs
        # the model itself and applies KD to its next-token head; otherwise the student's
        # logits come from here.
        fused = getattr(self.base, "takes_kd", False)
        logits = None if fused else model(  # ZeRO sees an ordinary forward
            input_ids=batch["input_ids"], **model_inputs(batch, model)).logits
        # KD compares the tokenizer's rows (a padded vocabulary's padding is no token)
        vocab = self.vocab_size or (logits.shape[-1] if logits is not None else None)
        if vocab is None:
            raise ValueError("DistillationLoss needs vocab_size with a loss that runs the "
                             "model itself (loss=mtp)")
        tau = self.cfg.temperature
        if self.cfg.soft_labels:
            if "teacher_ids" not in batch:
                raise RuntimeError(f"step {step} is in the KD phase but its batch has no soft "
                                   "labels: the loader was built without them")
            probs = offline_probs(batch["teacher_ids"], batch["teacher_logp"], vocab, tau)
        else:
            if self.teacher is None:
                if self.reload is None:
                    raise RuntimeError(f"step {step} is in the KD phase but the teacher was "
                                       "released")
                log.info("step %d is in the KD phase again (a rollback): reloading the "
                         "teacher", step)
                self.teacher = self.reload()
            with torch.no_grad():
                h_t = self.teacher.get_decoder()(input_ids=batch["input_ids"], **model_inputs(
                    batch, self.teacher)).last_hidden_state
            probs = online_probs(h_t, self.teacher.get_output_embeddings(), tau,
                                 logit_rule(self.teacher.config), vocab)
        if logits is None:
            takes_kd: Any = self.base  # a loss with `takes_kd` has the `kd` keyword
            out = takes_kd(model, batch, step, norm, kd=KDTerm(probs, tau, w))
            out.metrics["kd_weight"] = w
            return out
        mixed, ce, kd, n = kd_losses(logits, batch["labels"], probs, tau, w,
                                     self.cfg.chunk_size)
        d = denominator(norm, n)
        return LossOutput(mixed / d, {"ce": ce / d, "kd": kd / d, "kd_weight": w}, n)

    def release(self) -> None:
        """Drop the teacher: the rest of the run pays nothing for it."""
        log.info("KD phase over: teacher released")
        self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
