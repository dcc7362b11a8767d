"""Export a checkpoint to a Hugging Face folder:
`python train/export_hf.py checkpoint=runs/demo/checkpoints out=runs/demo/hf-export`."""

import json

import hydra
from omegaconf import DictConfig

from ipt.cli import run
from ipt.config import register
from ipt.export import export_hf, resolve_checkpoint

register()


def export(checkpoint: str, out: str) -> None:
    ckpt = resolve_checkpoint(checkpoint)
    tokenizer = json.loads((ckpt / "trainer_state.json").read_text())["config"]["tokenizer"]
    print(export_hf(ckpt, out, tokenizer))


@hydra.main(config_path="../configs", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    run(lambda: export(cfg.checkpoint, cfg.out))


if __name__ == "__main__":
    main()
