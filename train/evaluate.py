"""Evaluate a checkpoint or a Hugging Face folder with lm-evaluation-harness:
`python train/evaluate.py checkpoint=runs/demo tasks=[rc_mc] include_path=<tasks> out=<dir>`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import EvaluateConfig, register, to_object

register()


def evaluate(cfg: DictConfig) -> None:
    from ipt.evaluate import evaluate as run_harness

    config = to_object(cfg, EvaluateConfig)
    run_harness(config)
    print((Path(config.out) / "table.md").read_text(), end="")


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    run(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
