"""ipt's own trainer callbacks: validation loss, and checkpoints (`ipt.trainer.Callback`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch.utils.data import Dataset

from ipt import checkpoint
from ipt.data.loader import eval_batches, stack, to_device, unstack
from ipt.losses import IGNORE, Loss

if TYPE_CHECKING:
    from ipt.trainer import Trainer


class Evaluator:
    """Validation loss of each source (`val_loss/<source>`) and of all together
    (`val_loss`, token-weighted), on a fixed subset, every `every` steps and at the end."""

    def __init__(self, datasets: Mapping[str, Dataset], loss_fn: Loss,
                 micro_batch: int, num_batches: int, every: int) -> None:
        self.datasets, self.loss_fn, self.every = datasets, loss_fn, every
        self.micro_batch, self.num_batches = micro_batch, num_batches

    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if metrics["step"] % self.every == 0 or metrics["step"] == trainer.max_steps:
            metrics.update(self.evaluate(trainer))

    def on_end(self, trainer: Trainer) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        trainer.engine.eval()
        d = trainer.dist
        sums = torch.zeros(len(self.datasets), 2, dtype=torch.float64, device=d.device)
        for row, dataset in enumerate(self.datasets.values()):
            for idx in eval_batches(dataset, self.micro_batch, d.rank, d.world_size,
                                    self.num_batches):
                batch = to_device(unstack(stack([dataset[i] for i in idx or [0]])), d.device)
                if not idx:  # this rank's share ran out: a forward all ranks join, counting nothing
                    batch["labels"].fill_(IGNORE)
                out = self.loss_fn(trainer.engine, batch, trainer.state.step)
                sums[row, 0] += out.loss.detach() * out.tokens
                sums[row, 1] += out.tokens
        if d.world_size > 1:
            tdist.all_reduce(sums)
        trainer.engine.train()
        result = {"val_loss": float(sums[:, 0].sum() / sums[:, 1].sum())}
        if len(self.datasets) > 1:
            result.update({f"val_loss/{name}": float(sums[i, 0] / sums[i, 1])
                           for i, name in enumerate(self.datasets)})
        return result


class Checkpointer:
    """Saves every `every` steps and at the end of the run (collective)."""

    def __init__(self, root: Path, every: int, keep_last: int) -> None:
        self.root, self.every, self.keep_last = root, every, keep_last
        self.last_saved = -1

    def on_start(self, trainer: Trainer) -> None:
        self.last_saved = trainer.state.step

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if "rolled_back_to" in metrics:  # the step is that of the checkpoint just restored
            self.last_saved = trainer.state.step
        elif self.every > 0 and trainer.state.step % self.every == 0:
            self.save(trainer)

    def on_end(self, trainer: Trainer) -> None:
        if self.last_saved != trainer.state.step:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        with trainer.watchdog.while_files_move():  # however long the file system takes
            checkpoint.save(trainer.engine, self.root, trainer.state, self.keep_last)
        self.last_saved = trainer.state.step
