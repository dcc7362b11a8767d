"""SALT as a technique of a run: the small LM teaches through distillation in the first
steps (online, or from soft labels stored by the scoring stage), and its scores choose the
data those steps draw from."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ipt.config import PretrainConfig
from ipt.data.loader import Concat
from ipt.data.sampling import Sampling, TrainData
from ipt.losses import Loss
from ipt.slm import select
from ipt.slm.kd import DistillationLoss, kd_weight
from ipt.technique import Setup, Technique

log = logging.getLogger(__name__)


class SmallLM(Technique):
    """The `teacher` group (knowledge distillation) and `data.select` (data selection)."""

    name = "slm"

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        sel = cfg.data.select
        # selection follows the KD phase unless it says otherwise
        self.select_steps = sel.steps if sel.steps is not None else cfg.teacher.kd_steps

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> SmallLM | None:
        on = cfg.teacher.enabled or cfg.data.select.fraction is not None
        return cls(cfg) if on else None

    def check(self, setup: Setup) -> None:
        k = self.cfg.teacher
        if k.path is not None and not k.soft_labels:
            from ipt.slm import teacher

            teacher.check(k, self.cfg.tokenizer)  # before any model is built

    def data(self, data: TrainData, sampling: Sampling, setup: Setup) -> TrainData:
        sel, k = self.cfg.data.select, self.cfg.teacher
        if sel.fraction is not None:
            chosen = select.selections(data.order.key, data.parts, data.dirs, data.names, sel)
            data = replace(data, order=sampling.restricted(data.order, data, chosen,
                                                           self.select_steps))
            log.info("data selection: the first %d steps draw from the %s %.0f%% of each "
                     "source by %s", self.select_steps, sel.mode, 100 * sel.fraction, sel.column)
        if k.soft_labels:  # the loader adds them to the samples of the KD phase
            from ipt.slm import soft_labels

            assert isinstance(data.dataset, Concat), "soft labels wrap the packed sources"
            labelled = soft_labels.for_run(data.dataset, data.names, data.dirs,
                                           setup.tokenizer_fp, setup.vocab_size, k.path)
            data = replace(data, dataset=labelled, channels_until=k.kd_steps + k.decay_steps)
        return data

    def loss(self, loss: Loss, step: int, setup: Setup) -> Loss:
        """The KD loss; the teacher is loaded only if the run resumes before the KD phase
        ends (and never for offline soft labels, which the loader brings)."""
        k, cfg = self.cfg.teacher, self.cfg
        if not k.enabled:
            return loss
        if k.soft_labels:
            log.info("offline KD from the stored soft labels for steps < %d (%s switch)",
                     k.kd_steps, k.switch)
            return DistillationLoss(None, k, loss, setup.vocab_size)
        pending = any(kd_weight(k, s) > 0 for s in range(step, k.kd_steps + k.decay_steps))
        zero3 = cfg.train.micro_batch_size if cfg.deepspeed.stage == 3 else None

        def load() -> Any:
            from ipt.slm import teacher

            # the student's kernel: it runs the precision, and the teacher needs no backward
            return teacher.load(k, setup.dist.device, setup.dtype, zero3, setup.kernel)

        model = None
        if pending:
            model = load()
            log.info("teacher %s%s: KD for steps < %d (%s switch)", k.path,
                     ", sharded with ZeRO-3" if zero3 else "", k.kd_steps, k.switch)
        return DistillationLoss(model, k, loss, setup.vocab_size, reload=load)
