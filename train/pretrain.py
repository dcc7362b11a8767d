"""Pre-train a causal LM: `python train/pretrain.py [overrides]` (or under torchrun / srun)."""

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import register, to_object
from ipt.pretrain import pretrain
from ipt.sweep import for_job

register()


@hydra.main(config_path="../configs", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run(lambda: pretrain(to_object(for_job(cfg))))


if __name__ == "__main__":
    main()
