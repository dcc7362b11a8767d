"""The training loop: micro-batches into the DeepSpeed engine, one optimizer step at a time.

The loop knows nothing about specific losses, checkpoints or logging sinks: each of those is a
callback with `on_start`, `on_step` and `on_end`, called in order on every rank (a callback
that only rank 0 needs checks the rank itself). Callbacks may add entries to a step's metrics
(validation adds `val_loss`) before later ones log them.

A run stops early, cleanly, when any rank gets SIGTERM or SIGUSR1 (`StopRequests`): the ranks
agree on it at the end of a step (inside the all-reduce they already do for the metrics), the
callbacks' `on_end` runs (the checkpointer saves that step), and `fit` returns with
`trainer.stopped` set; `Trainer.finished` says the run reached `max_steps`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from ipt.checkpoint import TrainerState
from ipt.data.loader import to_device
from ipt.engine import Dist
from ipt.health import AnomalyError, AnomalyPolicy, HangWatchdog, SkippableAdamW
from ipt.losses import Loss
from ipt.observe import peak_memory_gb

log = logging.getLogger(__name__)


class StopRequests:
    """Records SIGTERM, SIGUSR1 and SIGUSR2 instead of dying: the trainer stops at the next step
    boundary.

    SLURM sends one of them before a time limit (`--signal=USR1@<seconds>`; submitit uses
    USR2) or a preemption; torchrun forwards SIGTERM. The handler only notes the signal;
    everything else happens in the training loop, between steps. A handler that was there
    before (submitit's, which requeues the job) is put back afterwards and called once the
    checkpoint is written (`ipt.cli.run`).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received, self.signum = signal.Signals(signum).name, signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Stopped(Exception):  # noqa: N818 - not an error: the run was asked to stop
    """The run stopped at a step boundary on a signal, after checkpointing that step."""

    def __init__(self, step: int, reason: str, signum: int | None) -> None:
        super().__init__(f"stopped at step {step} ({reason}); the checkpoint of step {step} is "
                         "written, and running the same command again resumes from it")
        self.step, self.reason, self.signum = step, reason, signum


class Callback(Protocol):
    def on_start(self, trainer: Trainer) -> None: ...
    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...


@dataclass
class TrainerOptions:
    """How the loop runs: the shape of a step, when it ends, and what it measures."""

    grad_accum: int  # micro-batches per rank per step
    global_batch: int  # sequences per step, all ranks together
    seq_len: int
    max_steps: int
    # training FLOPs per token at a sequence length (`ipt.model.flops_per_token`), for MFU
    flops_per_token: Callable[[int], float] | None = None
    peak_flops: float | None = None  # of one device, for MFU
    stop_after: int | None = None  # stop (checkpointed) after this many steps in this process
    hang_timeout: float = 0.0  # seconds a step may take before the watchdog ends the run
    # Without anomaly handling, the step's metrics (and stop requests) are read on the host
    # every `read_every` steps only; with it, every step (its check needs the loss).
    read_every: int = 1
    variable_length: bool = False  # steps of different sequence lengths: log each one's


class Trainer:
    def __init__(self, engine: Any, loss_fn: Loss,
                 batches: Iterator[dict[str, torch.Tensor]], state: TrainerState, dist: Dist,
                 callbacks: list[Any], options: TrainerOptions,
                 stop_requests: StopRequests | None = None,
                 anomalies: AnomalyPolicy | None = None) -> None:
        o = options
        self.engine, self.loss_fn, self.batches = engine, loss_fn, batches
        self.state, self.dist, self.callbacks = state, dist, callbacks
        self.grad_accum, self.global_batch, self.seq_len = o.grad_accum, o.global_batch, o.seq_len
        self.max_steps = o.max_steps
        # FLOPs of every step so far: with Dataset Decomposition each step has its own length
        self.flops_per_token, self.peak_flops = o.flops_per_token, o.peak_flops
        self.flops_done = 0.0
        self.variable_length = o.variable_length
        self.stop_after = o.stop_after
        self.stop_requests = stop_requests or StopRequests()
        self.watchdog = HangWatchdog(o.hang_timeout, dist.rank)
        self.anomalies = anomalies
        self.read_every = 1 if anomalies is not None else max(1, o.read_every)
        self.optimizer = engine.basic_optimizer
        if anomalies is not None and not isinstance(self.optimizer, SkippableAdamW):
            raise TypeError("loss anomaly handling needs the engine built with SkippableAdamW")
        # optim.device_skip: the optimizer skips a non-finite step on the device, and the
        # trainer learns of it with the next step's read instead of reading the norm at once
        self.device_skip = bool(getattr(self.optimizer, "device_skip", False))
        # (step, gradient norm) of the last step whose update was attempted and whose norm is
        # not yet judged
        self._unjudged: tuple[int, Any] | None = None
        self._last_sync: tuple[float, int, float] | None = None  # (time, step, flops) at the last read
        self.finished = False  # reached max_steps
        self.stopped: str | None = None  # why the run stopped early (every rank agrees)
        self.failed: Exception | None = None  # raised after the step's callbacks

    def fit(self) -> TrainerState:
        if self.anomalies is not None:
            self.anomalies.detector.load_state_dict(self.state.health)
        self.watchdog.start(self.state.step)
        try:
            return self._fit()
        finally:
            self.watchdog.stop()

    def _fit(self) -> TrainerState:
        for cb in self.callbacks:
            cb.on_start(self)
        steps_here = 0
        while self.state.step < self.max_steps and self.stopped is None:
            metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step(self, metrics)
            if self.failed is not None:
                raise self.failed
            self.watchdog.beat(self.state.step)
            steps_here += 1
            if self.stop_after is not None and steps_here >= self.stop_after:
                return self.state  # as if the process died here: no final checkpoint
        self.finished = self.stopped is None
        if self.stopped is not None and self.dist.is_main:
            log.warning("stopping at step %d: %s; checkpointing it", self.state.step,
                        self.stopped)
        for cb in self.callbacks:
            cb.on_end(self)
            self.watchdog.beat(self.state.step)  # a final checkpoint or export is progress
        return self.state

    def _norm(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """Each loss term's target count over the whole step (every micro-batch of every
        rank), per micro-batch: what a micro-batch's sums are divided by, so that the
        engine's average over them is a mean over the step's tokens (`ipt.losses`)."""
        counts = torch.tensor([self.loss_fn.count_targets(b) for b in micro_batches],
                              dtype=torch.float64).sum(0)
        if self.dist.world_size > 1:
            counts = counts.to(self.dist.device)
            tdist.all_reduce(counts)
        share = self.grad_accum * self.dist.world_size
        return [max(c, 1.0) / share for c in counts.tolist()]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: `grad_accum` micro-batches through forward and backward."""
        self.engine.train()
        lr = self.engine.get_lr()[0]  # the rate this step uses; the schedule advances in it
        start = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(self.grad_accum)]
        waited = time.perf_counter() - start
        norm = self._norm(micro_batches)  # counted on the host, before the batches move
        length = int(micro_batches[0]["input_ids"].shape[-1])
        totals: dict[str, Any] = {}
        anomaly = None
        earlier = None  # the verdict on the previous step's gradient, read with this step's
        read = self.anomalies is not None or (self.state.step + 1) % self.read_every == 0 \
            or self.state.step + 1 >= self.max_steps
        for micro, host_batch in enumerate(micro_batches):
            batch = to_device(host_batch, self.dist.device)
            out = self.loss_fn(self.engine, batch, self.state.step, norm)
            for k, v in (("loss", out.loss.detach()), *out.metrics.items()):
                totals[k] = totals[k] + v if k in totals else v  # on the device: no sync
            if micro == self.grad_accum - 1:
                # the step's loss is known before its last backward, on every rank alike:
                # an anomalous step can still be kept from updating the weights
                means = self._step_means(totals, read, self._carried())
                synced = time.perf_counter() if read else None
                earlier = self._judge_carried(means.pop("_unjudged", None))
                anomaly = self._check(means, earlier, length)
            self.engine.backward(out.loss)
            self.engine.step()
        skipped = self.optimizer.skip
        self.optimizer.skip = False
        elapsed = time.perf_counter() - start
        self.state.step += 1
        self.state.consumed_samples += self.global_batch
        tokens = self.global_batch * self.seq_len  # as many at every length
        self.state.tokens_seen += tokens
        flops = tokens * self.flops_per_token(length) if self.flops_per_token else 0.0
        self.flops_done += flops
        tokens_per_s, flops_per_s = self._throughput(tokens, flops, elapsed, synced)
        grad_norm = self._grad_norm()
        own = None  # the verdict on this step's gradient, where it is read now
        if not skipped and self.anomalies is not None:  # its update was attempted
            self._unjudged = (self.state.step, grad_norm)
            if self._judge_now(grad_norm):
                grad_norm = None if grad_norm is None else float(grad_norm)
                own = self._judge_gradient(grad_norm)
        elif read and not self.device_skip and isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        metrics: dict[str, Any] = {
            "step": self.state.step,
            **({"seq_len": length} if self.variable_length else {}),
            **means,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.state.tokens_seen,
            "consumed_samples": self.state.consumed_samples,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            "data_wait": waited / elapsed,
            "peak_mem_gb": peak_memory_gb(),
        }
        if self.peak_flops and self.flops_per_token and flops_per_s is not None:
            metrics["mfu"] = flops_per_s / (self.peak_flops * self.dist.world_size)
        # the update of a step whose gradient is not finite was skipped (by DeepSpeed, or on the
        # device); the action still applies
        why = "; ".join(w for w in (earlier, anomaly, own) if w is not None)
        if why:
            metrics["anomaly"] = why
            self._handle(why, metrics, skipped or own is not None)
        if self.anomalies is not None:  # kept with the next checkpoint
            self.state.health = self.anomalies.detector.state_dict()
        return metrics

    def _throughput(self, tokens: int, flops: float, elapsed: float,
                    synced: float | None) -> tuple[float | None, float | None]:
        """Tokens and training FLOPs per second. The host's clock says how long a step took
        only where it waited for the device: at a read, the rates over the steps since the
        last read (the first time, this step's); between reads, None (the host runs ahead of
        the device)."""
        last = self._last_sync
        if synced is not None:
            self._last_sync = (synced, self.state.step, self.flops_done)
        if synced is None and self.read_every > 1:
            return None, None
        if synced is None or last is None or self.read_every == 1:
            return tokens / elapsed, flops / elapsed
        seconds = synced - last[0]
        return tokens * (self.state.step - last[1]) / seconds, \
            (self.flops_done - last[2]) / seconds

    def _step_means(self, totals: dict[str, Any], read: bool,
                    carried: torch.Tensor | None = None) -> dict[str, Any]:
        """The step's metrics averaged over micro-batches and ranks, in one tensor on the
        device. `read`: bring them to the host (a sync) and act on a stop request; otherwise
        they stay 0-d device tensors, for the logger to read with others later. `carried`
        (the previous step's gradient norm, the same on every rank) is read along with them,
        as `_unjudged`."""
        # the stop request rides along with the metrics' all-reduce: no extra collective
        names = [*totals, "_stop"]
        flag = float(self.stop_requests.received is not None)
        t = torch.stack([_on_device(v, self.dist.device)
                         for v in [*totals.values(), flag * self.grad_accum]]) / self.grad_accum
        if self.dist.world_size > 1:
            tdist.all_reduce(t)
            t /= self.dist.world_size
        if not read:
            return dict(zip(names[:-1], t[:-1].unbind(), strict=True))
        if carried is not None:
            names.append("_unjudged")
            t = torch.cat([t, carried.reshape(1).to(t)])
        means = dict(zip(names, t.tolist(), strict=True))
        if means.pop("_stop") > 0:
            self.stopped = (f"{self.stop_requests.received} received" if
                            self.stop_requests.received else "a signal reached another rank")
        return means

    def _check(self, means: dict[str, float], earlier: str | None, length: int) -> str | None:
        """This step's loss verdict. Its update is skipped on an anomaly, and also, unless
        the action is to go on, after the previous step's gradient turned out not finite.
        With steps of several lengths, each is judged against steps of its own length."""
        if self.anomalies is None:
            return None
        why = self.anomalies.detector.check(means["loss"], means.get("ce", means["loss"]),
                                            length if self.variable_length else 0)
        if why is not None or (earlier is not None and self.anomalies.action != "skip"):
            self.optimizer.skip = True  # whatever the action: no update from this batch
        return why

    def _grad_norm(self) -> Any:
        """The step's gradient norm: DeepSpeed's (a device tensor, or inf where DeepSpeed
        skipped the step itself), or, where DeepSpeed computes none (ZeRO-0 in fp32), the one
        the optimizer judged with `optim.device_skip` (else None)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.device_skip:
            return self.optimizer.grad_norm
        return norm

    def _judge_now(self, grad_norm: Any) -> bool:
        """Read this step's gradient norm at once (a sync after the step): always, unless the
        optimizer skips on the device; then only at the run's last step or a stop, which no
        later read follows, or where it is known on the host already."""
        return not self.device_skip or not isinstance(grad_norm, torch.Tensor) \
            or self.state.step >= self.max_steps or self.stopped is not None

    def _carried(self) -> torch.Tensor | None:
        """The gradient norm left to judge, to be read with this step's metrics."""
        return None if self._unjudged is None else self._unjudged[1]

    def _judge_carried(self, norm: float | None) -> str | None:
        """The verdict on the previous step's gradient, read with this step's metrics."""
        if self._unjudged is None:
            return None
        step = self._unjudged[0]
        return self._judge_gradient(norm, f" at step {step}, whose update was skipped on "
                                          "the device")

    def _judge_gradient(self, norm: float | None, where: str = "") -> str | None:
        """Judge the step in `_unjudged`, whose loss was normal, by its gradient norm."""
        assert self.anomalies is not None
        self._unjudged = None
        if norm is None or math.isfinite(norm):
            self.anomalies.detector.clear()  # a normal step: the count in a row starts over
            return None
        return self.anomalies.detector.flag(f"the gradient norm is {norm}{where}")

    def _handle(self, why: str, metrics: dict[str, Any], skipped: bool) -> None:
        """After an anomalous step (its update skipped, or, when only an earlier step's
        gradient was not finite, perhaps applied: `skipped`): go on, stop, or roll back."""
        policy = self.anomalies
        assert policy is not None
        step = self.state.step
        self.failed = policy.detector.diverged(why)  # raised once the step is logged
        if self.failed is not None:
            return
        if policy.action == "stop":
            self.failed = AnomalyError(f"step {step}: {why}; stopping (train.on_anomaly=stop) without "
                               "applying it. The last checkpoint is intact: resume from it, "
                               "perhaps with train.on_anomaly=skip or rollback")
            return
        if policy.action == "rollback" and policy.rollback is not None:
            if self.state.rollbacks >= policy.max_rollbacks:
                self.failed = AnomalyError(
                    f"step {step}: {why}, after {self.state.rollbacks} rollbacks in this run "
                    f"(train.max_rollbacks={policy.max_rollbacks}): rolling back does not get "
                    "past it; resume from an earlier checkpoint with a lower learning rate, or "
                    "look at the data")
                return
            with self.watchdog.while_files_move():  # reading a checkpoint is progress
                restored = policy.rollback(self.state)
            if restored is not None:
                if self.dist.is_main:
                    log.warning("step %d: %s; rolled back to the checkpoint of step %d, "
                                "skipping the %d samples since", step, why, restored.step,
                                self.state.consumed_samples - restored.consumed_samples)
                restored.consumed_samples = self.state.consumed_samples  # the data moves on
                restored.tokens_seen = self.state.tokens_seen
                restored.rollbacks = self.state.rollbacks + 1
                self.state = restored
                if policy.reopen is not None:
                    self.batches.close()  # type: ignore[attr-defined]
                    self.batches = policy.reopen(restored)
                metrics["rolled_back_to"] = restored.step  # its checkpoint is not rewritten
                return
        if self.dist.is_main:
            log.warning("step %d: %s%s", step, why, "; its update is skipped" if skipped else "")



def _on_device(value: Any, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor on `device`: a Python number is filled in by a kernel, since a
    copy from the host (`torch.tensor(x, device=...)`) waits for the device."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=device)
