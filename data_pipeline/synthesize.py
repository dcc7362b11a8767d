"""Augment raw documents with instruction-response pairs: `python data_pipeline/synthesize.py`."""

import json
import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import SynthesizeConfig, register, to_object
from ipt.synth.stage import synthesize

register()


@hydra.main(config_path="../configs", config_name="synthesize", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(lambda: synthesize(to_object(cfg, SynthesizeConfig)))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
