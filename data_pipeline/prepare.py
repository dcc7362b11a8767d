"""Tokenize raw sources into token shards: `python data_pipeline/prepare.py [overrides]`."""

import json
import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import PrepareConfig, register, to_object
from ipt.data.prepare import prepare

register()


@hydra.main(config_path="../configs", config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summaries = run(lambda: prepare(to_object(cfg, PrepareConfig)))
    print(json.dumps({name: {k: v for k, v in s.items() if k != "source"}
                      for name, s in summaries.items()}, indent=1))


if __name__ == "__main__":
    main()
