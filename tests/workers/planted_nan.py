"""`train/pretrain.py` with a NaN loss planted once: every forward of the step with index
`PLANT_NAN_AT` (0-based) gives NaN embeddings, until the run has rolled back from it.

    PLANT_NAN_AT=5 python tests/workers/planted_nan.py [overrides]
"""

import os
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import register, to_object
from ipt.pretrain import pretrain
from ipt.sweep import for_job


class PlantNaN:
    """A trainer callback that hooks the embedding at the start."""

    def __init__(self, step: int) -> None:
        self.step, self.trainer, self.rolled_back = step, None, False

    def on_start(self, trainer: Any) -> None:
        self.trainer = trainer
        trainer.engine.module.lm.get_input_embeddings().register_forward_hook(self.plant)

    def plant(self, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if self.trainer.state.step == self.step and not self.rolled_back and out.requires_grad:
            return out * float("nan")
        return None

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.rolled_back |= "rolled_back_to" in metrics

    def on_end(self, trainer: Any) -> None:
        pass


register()


@hydra.main(config_path="../../configs", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run(lambda: pretrain(to_object(for_job(cfg)), [PlantNaN(int(os.environ["PLANT_NAN_AT"]))]))


if __name__ == "__main__":
    main()
