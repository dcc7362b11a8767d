"""Score packed sequences with a small LM: `python data_pipeline/score.py [overrides]`."""

import json
import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import ScoreConfig, register, to_object
from ipt.slm.score import score

register()


@hydra.main(config_path="../configs", config_name="score", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(lambda: score(to_object(cfg, ScoreConfig))), indent=1))


if __name__ == "__main__":
    main()
