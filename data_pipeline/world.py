"""A synthetic world of people, their biographies and questions: `python data_pipeline/world.py`."""

import json
import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import WorldConfig, register, to_object
from ipt.synth.world import build

register()


@hydra.main(config_path="../configs", config_name="world", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(lambda: build(to_object(cfg, WorldConfig)))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
