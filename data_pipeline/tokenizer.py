"""Train a sentencepiece tokenizer on raw sources: `python data_pipeline/tokenizer.py [...]`."""

import logging

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import TokenizerConfig, register, to_object
from ipt.data.tokenizer import train_from_sources

register()


@hydra.main(config_path="../configs", config_name="tokenizer", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(run(lambda: train_from_sources(to_object(cfg, TokenizerConfig))))


if __name__ == "__main__":
    main()
