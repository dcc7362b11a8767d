"""Run health: a watchdog for hung ranks, and what to do about loss anomalies.

`HangWatchdog` ends a rank that makes no progress (a dead or hung peer blocks every
collective). `LossAnomalies` flags a step whose loss is not finite or spikes; the trainer then
skips that step's update (`SkippableAdamW`), stops, or rolls back to the last checkpoint,
as `train.on_anomaly` says.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose `step()` does nothing while `skip` is set, and that can skip a non-finite
    update on the device (`device_skip`).

    Under every ZeRO stage DeepSpeed ends an optimizer step by calling this optimizer on the
    rank's (flat, fp32) partitions, once per parameter group under ZeRO-1/2; skipping those
    calls leaves weights and moments exactly as they were, while DeepSpeed's own bookkeeping
    (gradient buffers, zeroing, the copy back to the model's weights) runs as usual. The
    trainer sets `skip` around one engine step and clears it after.

    `skip` is decided on the host, from the loss. A non-finite gradient is known only on the
    device, after the backward: DeepSpeed finds it by reading the gradient norm on the host
    (a sync inside `engine.step()`). With `device_skip`, each call instead takes the step's
    global gradient norm (`norm_source`, DeepSpeed's; or, where DeepSpeed hands over the
    whole gradient and computes none, as at ZeRO-0 in fp32, its own) and gives the fused
    kernel two device tensors, as `torch.amp.GradScaler` does: `found_inf` (the norm is not
    finite: weights, moments and the step count are left as they were) and `grad_scale`
    (the gradients are divided by it: clipping to `clip`). The norm is global, the same in
    every call and on every rank, so the groups and ranks skip or clip together.
    """

    skip = False

    def __init__(self, params: Any, *, device_skip: bool = False, clip: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if device_skip and not self.defaults["fused"]:
            raise ValueError("device_skip needs fused=True: only the fused kernel takes "
                             "found_inf")
        self.device_skip, self.clip = device_skip, clip
        # the step's global gradient norm, from the DeepSpeed wrapper that calls this step
        # (set by `ipt.engine.build_engine`); None: the gradients handed over are all of it
        self.norm_source: Callable[[], torch.Tensor | float | None] | None = None
        self.grad_norm: torch.Tensor | None = None  # the last step's, on the device

    @torch.no_grad()
    def step(self, closure=None):
        if self.device_skip:
            self._judge_on_device()
        if self.skip:
            return None
        return super().step(closure)

    def restore_implementation(self) -> None:
        """Put back this optimizer's kernel choice after a checkpoint load.

        Loading takes the saved parameter groups whole (`Optimizer.load_state_dict`, and
        DeepSpeed's universal load copies their keys), `fused` and `foreach` included, and the
        step counts come where the saving run kept them: on the device for fused, on the host
        for foreach. A run resumed with another `optim.fused` would run the saved kernel."""
        fused = bool(self.defaults["fused"])
        for group in self.param_groups:
            group.update(fused=fused, foreach=not fused)
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    step = torch.as_tensor(state["step"], dtype=torch.float32)
                    state["step"] = step.to(p.device if fused else "cpu")

    def _judge_on_device(self) -> None:
        """Set `found_inf` and `grad_scale`, which `AdamW.step` hands the fused kernel."""
        norm = self.grad_norm = self._global_norm()
        self.found_inf = (~torch.isfinite(norm) | (norm < 0)).float()
        # DeepSpeed's own clipping factor: the gradients are divided by it
        self.grad_scale = (torch.clamp((norm + 1e-6) / self.clip, min=1.0)
                           if self.clip > 0 else None)

    def _global_norm(self) -> torch.Tensor:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.norm_source is None:
            grads = [p.grad for p in params]
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        norm = self.norm_source()
        if norm is None:
            raise RuntimeError("device_skip needs DeepSpeed's gradient norm, which "
                               "zero_optimization.compute_grad_norm=false turns off")
        if isinstance(norm, torch.Tensor):
            return norm.float()
        # a wrapper that checked the norm on the host already: filled in by a kernel, since
        # a copy from the host waits for the device
        return torch.full((), float(norm), device=params[0].device)


class AnomalyError(RuntimeError):
    """Training stopped on a loss anomaly (`train.on_anomaly=stop`, or too many in a row)."""


class LossAnomalies:
    """A non-finite loss, or a spike: more than `sigma` standard deviations above the mean of
    the last `window` normal steps of the same sequence length, once 20 of them are known.
    Anomalous steps do not enter the window.

    The loss depends on the step's length: a short sequence's tokens see less context. Under
    Dataset Decomposition a step's length changes with the curriculum, and a window that mixed
    lengths would take every return of short steps after a stretch of long ones for a spike.
    Each length therefore has its own window, and a step is judged against its own length's
    steps only (a length seen fewer than 20 times is judged for non-finite losses only).
    """

    MIN_HISTORY = 20

    def __init__(self, sigma: float, window: int, max_in_row: int) -> None:
        self.sigma, self.window, self.max_in_row = sigma, window, max_in_row
        self.recent: dict[int, deque[float]] = {}  # per sequence length
        self.in_row = 0

    def check(self, loss: float, watched: float, length: int = 0) -> str | None:
        """Why this step is anomalous, or None. `watched` is the loss spikes are judged on
        (the plain cross-entropy, which a KD or MTP schedule does not shift); `length` the
        step's sequence length."""
        recent = self.recent.setdefault(length, deque(maxlen=self.window))
        why = None
        if not math.isfinite(loss):
            why = f"the loss is {loss}"
        elif self.sigma > 0 and len(recent) >= min(self.MIN_HISTORY, self.window):
            n = len(recent)
            mean = sum(recent) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in recent) / n)
            if watched > mean + self.sigma * std and std > 0:
                of = f"{length}-token " if len(self.recent) > 1 else ""
                why = (f"loss spike: {watched:.4f} is {(watched - mean) / std:.1f} standard "
                       f"deviations above the mean of the last {n} {of}steps ({mean:.4f}; "
                       f"train.spike_sigma={self.sigma:g})")
        if why is None:
            recent.append(watched)
            return None
        return self.flag(why)

    def clear(self) -> None:
        """The step was normal after all: the count of anomalies in a row starts over."""
        self.in_row = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run judges its next steps as the
        uninterrupted run would."""
        return {"by_length": {str(n): list(r) for n, r in self.recent.items()},
                "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = {int(n): deque(r, maxlen=self.window)
                       for n, r in state.get("by_length", {}).items()}
        if "recent" in state:  # saved before windows were kept per length: one for all
            self.recent[0] = deque(state["recent"], maxlen=self.window)
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
    after `max_rollbacks` of them in one run the next anomaly ends it. `reopen` gives the
    micro-batches from a rolled-back state on (its step is the checkpoint's, its samples
    those after the anomaly's), so that what the loader adds by step (soft labels) follows
    the step."""

    detector: LossAnomalies
    action: str
    rollback: Callable[[Any], Any] | None = None
    max_rollbacks: int = 5
    reopen: Callable[[Any], Any] | None = None


# A hung job ends with this status (torchrun then stops the other ranks).
EXIT_HUNG = 3


class HangWatchdog:
    """Ends the process when no step finishes for `timeout` seconds.

    A peer that died or hangs blocks every collective of the others, and gloo/NCCL may wait
    far longer (or forever) before noticing. A background thread checks the time since the
    last `beat()`; past the limit it logs what happened, dumps every thread's stack (where
    this rank was waiting) and exits with `EXIT_HUNG`, so the job ends instead of hanging.
    The message and stacks go to the process's stderr file descriptor, whatever `sys.stderr`
    is at the time (a harness's output is captured while it runs).
    """

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        self.step = 0
        self.doing: str | None = None  # what this rank is busy with, for the message
        self.relay: Callable[[], None] | None = None  # also called on every beat (`Solo`)
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
        if self.relay is not None:
            self.relay()

    def stop(self) -> None:
        self._done.set()

    @contextlib.contextmanager
    def while_files_move(self) -> Iterator[None]:
        """Count this process's reads and writes of storage in the block as progress
        (Linux's /proc/self/io; elsewhere nothing more is counted): a checkpoint or an export
        that takes longer than the timeout goes on, one stuck on its file system still ends."""
        if self.timeout <= 0:
            yield
            return
        done = threading.Event()
        every = min(1.0, self.timeout / 8)

        def watch() -> None:
            files = _IoBytes()
            while files.total is not None and not done.wait(every):
                if files.moved():
                    self.beat(self.step)

        thread = threading.Thread(target=watch, name="file-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _check_every(self) -> float:
        return min(self.timeout / 4, 10.0)

    def _watch(self) -> None:
        while not self._done.wait(self._check_every()):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                self._expire(idle)

    def _expire(self, idle: float) -> None:
        import faulthandler

        where = f" in {self.doing}" if self.doing else ""
        message = (
            f"ipt: rank {self.rank}: no progress for {idle:.0f} s{where} after step "
            f"{self.step} (train.hang_timeout_s={self.timeout:g}). Another rank has most likely "
            "died or hung, and this one waits for it in a collective (or this one hangs); its "
            "stacks follow. Ending the job: the same command resumes from the last checkpoint. "
            "If steps (with evaluation and checkpointing) can take this long, raise "
            "train.hang_timeout_s.\n")
        try:
            os.write(STDERR_FD, message.encode())
            faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
            if self.doing:
                # ranks waiting on one another's solo work (`Solo`) see the same stall, and
                # their watchdogs fire within a check and a relayed beat of this one: wait
                # that long before ending the job, so that the launcher, which stops every
                # rank once one exits, does not stop them before they report
                time.sleep(self._check_every() + 1.0)
        finally:
            os._exit(EXIT_HUNG)


STDERR_FD = 2


class Solo:
    """Rank 0 works alone (a downstream evaluation, the export) while the other ranks wait.

    A waiting rank cannot tell a slow rank 0 from a hung one, and must not beat its watchdog
    blindly, or a hung rank 0 would hold the job for as long as the wait allows. So while
    rank 0 works, its beats (and, on Linux, any progress of its file reads and writes:
    loading a checkpoint, writing shards) move a counter in the job's store, at most once a
    second; a waiting rank beats its watchdog only when the counter has moved. If rank 0
    hangs, every rank's watchdog ends it within `train.hang_timeout_s`, rank 0's with its
    stacks. The wait is on a gloo group of its own: no device time, and no collective timeout
    shorter than the work may take.

    Every rank creates it in `start` (a collective), in the same order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.group: Any = None
        self.store: Any = None
        self.key = f"ipt/solo/{name}"
        self.every = 1.0  # seconds between relayed beats (shorter for a short hang timeout)

    def start(self, world_size: int, watchdog: HangWatchdog) -> None:
        if world_size > 1:
            from datetime import timedelta

            import torch.distributed as tdist
            from torch.distributed import distributed_c10d

            self.group = tdist.new_group(backend="gloo", timeout=timedelta(days=1))
            self.store = distributed_c10d._get_default_store()  # noqa: SLF001
        if watchdog.timeout > 0:
            self.every = min(1.0, watchdog.timeout / 8)

    @contextlib.contextmanager
    def work(self, watchdog: HangWatchdog) -> Iterator[None]:
        """Rank 0's side: the block's beats (and file progress) reach the waiting ranks;
        they go on when it ends."""
        last = [0.0]

        def relay() -> None:
            now = time.monotonic()
            if self.store is not None and now - last[0] >= self.every:
                last[0] = now
                self.store.add(self.key, 1)

        watchdog.relay, watchdog.doing = relay, f"rank 0's {self.name}"
        try:
            with watchdog.while_files_move():
                yield
        finally:
            watchdog.relay, watchdog.doing = None, None
            watchdog.beat(watchdog.step)
            if self.group is not None:
                import torch.distributed as tdist

                tdist.barrier(group=self.group)

    def wait(self, watchdog: HangWatchdog) -> None:
        """The other ranks' side: until rank 0's work ends, beating while it moves."""
        if self.group is None:
            return
        import torch.distributed as tdist

        watchdog.doing = f"waiting for rank 0's {self.name}"
        seen = self.store.add(self.key, 0)
        done = tdist.barrier(group=self.group, async_op=True)
        while not done.is_completed():
            try:
                moved = self.store.add(self.key, 0)
            except RuntimeError as e:  # the store lives in rank 0's process: it ended
                raise RuntimeError(
                    f"rank {tdist.get_rank()}: rank 0 ended while this rank was {watchdog.doing} "
                    f"({type(e).__name__}: {str(e)[:200]})") from e
            if moved != seen:
                seen = moved
                watchdog.beat(watchdog.step)
            time.sleep(min(0.2, self.every))
        done.wait()
        watchdog.doing = None
        watchdog.beat(watchdog.step)


class _IoBytes:
    """Bytes this process has had read from and written to storage (`/proc/self/io`'s
    read_bytes and write_bytes: files, not sockets, pipes or the page cache); `total` is None
    where the system does not say."""

    PATH = "/proc/self/io"

    def __init__(self) -> None:
        self.total = self._read()

    def moved(self) -> bool:
        last, self.total = self.total, self._read()
        return self.total is not None and last is not None and self.total > last

    def _read(self) -> int | None:
        try:
            with open(self.PATH, "rb") as f:
                fields = dict(line.split(b": ") for line in f.read().splitlines())
        except OSError:
            return None
        return int(fields[b"read_bytes"]) + int(fields[b"write_bytes"])
