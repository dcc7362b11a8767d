"""Run health: a watchdog for hung ranks, and what to do about loss anomalies.

`HangWatchdog` ends a rank that makes no progress (a dead or hung peer blocks every
collective). `LossAnomalies` flags a step whose loss is not finite or spikes; the trainer then
skips that step's update (`SkippableAdamW`), stops, or rolls back to the last checkpoint,
as `train.on_anomaly` says.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose `step()` does nothing while `skip` is set.

    Under every ZeRO stage DeepSpeed ends an optimizer step by calling this optimizer on the
    rank's (flat, fp32) partitions, once per parameter group under ZeRO-1/2; skipping those
    calls leaves weights and moments exactly as they were, while DeepSpeed's own bookkeeping
    (gradient buffers, zeroing, the copy back to the model's weights) runs as usual. The
    trainer sets `skip` around one engine step and clears it after.
    """

    skip = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


class AnomalyError(RuntimeError):
    """Training stopped on a loss anomaly (`train.on_anomaly=stop`, or too many in a row)."""


class LossAnomalies:
    """A non-finite loss, or a spike: more than `sigma` standard deviations above the mean of
    the last `window` normal steps, once 20 of them are known. Anomalous steps do not enter
    the window."""

    MIN_HISTORY = 20

    def __init__(self, sigma: float, window: int, max_in_row: int) -> None:
        self.sigma, self.max_in_row = sigma, max_in_row
        self.recent: deque[float] = deque(maxlen=window)
        self.in_row = 0

    def check(self, loss: float, watched: float) -> str | None:
        """Why this step is anomalous, or None. `watched` is the loss spikes are judged on
        (the plain cross-entropy, which a KD or MTP schedule does not shift)."""
        why = None
        if not math.isfinite(loss):
            why = f"the loss is {loss}"
        elif self.sigma > 0 and len(self.recent) >= min(self.MIN_HISTORY, self.recent.maxlen or 1):
            n = len(self.recent)
            mean = sum(self.recent) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / n)
            if watched > mean + self.sigma * std:
                why = (f"loss spike: {watched:.4f} is {(watched - mean) / std:.1f} standard "
                       f"deviations above the mean of the last {n} steps ({mean:.4f}; "
                       f"train.spike_sigma={self.sigma:g})")
        if why is None:
            self.recent.append(watched)
            return None
        return self.flag(why)

    def clear(self) -> None:
        """The step was normal after all: the count of anomalies in a row starts over."""
        self.in_row = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run judges its next steps as the
        uninterrupted run would."""
        return {"recent": list(self.recent), "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
        self.in_row = int(state.get("in_row", 0))

    def flag(self, why: str) -> str:
        """Count an anomalous step (also one found otherwise: a non-finite gradient norm)."""
        self.in_row += 1
        return why

    def diverged(self, why: str) -> AnomalyError | None:
        """The error to end the run with, once there are too many anomalies in a row."""
        if self.in_row <= self.max_in_row:
            return None
        return AnomalyError(f"{why}, the {self.in_row}th anomalous step in a row "
                            f"(train.max_anomalies_in_row={self.max_in_row}): training has "
                            "diverged; resume from an earlier checkpoint with a lower learning "
                            "rate, or look at the data")


@dataclass
class AnomalyPolicy:
    """What the trainer does on an anomalous step (`train.on_anomaly`). `rollback` loads the
    newest checkpoint into the engine and returns its state (None when there is none yet);
    after `max_rollbacks` of them in one run the next anomaly ends it."""

    detector: LossAnomalies
    action: str
    rollback: Callable[[Any], Any] | None = None
    max_rollbacks: int = 5


# A hung job ends with this status (torchrun then stops the other ranks).
EXIT_HUNG = 3


class HangWatchdog:
    """Ends the process when no step finishes for `timeout` seconds.

    A peer that died or hangs blocks every collective of the others, and gloo/NCCL may wait
    far longer (or forever) before noticing. A background thread checks the time since the
    last `beat()`; past the limit it logs what happened, dumps every thread's stack (where
    this rank was waiting) and exits with `EXIT_HUNG`, so the job ends instead of hanging.
    """

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        self.step = 0
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, step: int) -> None:
        if self.timeout > 0:
            self.beat(step)
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self._last = step, time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(self.timeout / 4, 10.0)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self._expire(idle)

    def _expire(self, idle: float) -> None:
        import faulthandler
        import os
        import sys

        print(f"ipt: rank {self.rank}: no progress for {idle:.0f} s after step {self.step} "
              f"(train.hang_timeout_s={self.timeout:g}). Another rank has most likely died or "
              "hung, and this one waits for it in a collective; its stacks follow. Ending the "
              "job: the same command resumes from the last checkpoint. If steps (with evaluation and "
              "checkpointing) can take this long, raise train.hang_timeout_s.",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
