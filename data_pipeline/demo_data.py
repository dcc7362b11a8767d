"""Build the demo's corpus, tokenizer and token shards: `python data_pipeline/demo_data.py`."""

import logging

import hydra

from ipt.cli import run
from ipt.config import DemoDataConfig, register, to_object
from ipt.data.demo import build_demo_data

register()


@hydra.main(config_path="../configs", config_name="demo_data", version_base=None)
def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(lambda: build_demo_data(to_object(cfg, DemoDataConfig)))


if __name__ == "__main__":
    main()
