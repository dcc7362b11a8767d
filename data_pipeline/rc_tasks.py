"""Held-out documents -> local lm-evaluation-harness tasks: `python data_pipeline/rc_tasks.py`."""

import json
import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import RCTasksConfig, register, to_object
from ipt.synth.rc_tasks import build

register()


@hydra.main(config_path="../configs", config_name="rc_tasks", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(lambda: build(to_object(cfg, RCTasksConfig)))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
