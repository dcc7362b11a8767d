"""Learning-rate schedules as pure functions of the optimizer step.

Being pure, a schedule needs no state of its own to resume: DeepSpeed saves the step count of
the `LambdaLR` that wraps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ipt.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The factor applied to the peak lr at optimizer step `step` (0-based)."""
    warmup = max(0, cfg.warmup_steps)
    start, floor = cfg.warmup_start_ratio, cfg.min_lr_ratio

    def warm(step: int) -> float:
        return start + (1.0 - start) * (step + 1) / warmup

    def cosine(step: int) -> float:
        if step < warmup:
            return warm(step)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        # warm-up, stable at the peak, then a linear decay over the last `decay_fraction`
        if step < warmup:
            return warm(step)
        decay_start = total_steps - int(cfg.decay_fraction * total_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress

    def constant(step: int) -> float:
        return warm(step) if step < warmup else 1.0

    return {"cosine": cosine, "wsd": wsd, "constant": constant}[cfg.name]
