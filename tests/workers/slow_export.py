"""`train/pretrain.py` on a file system that is slow to take the exported model: with
`SLOW_EXPORT=trickle` the weights file reaches the disk in 20 chunks over `SLOW_EXPORT_S`
seconds; with `SLOW_EXPORT=stuck` the write never returns and writes nothing more.

    python tests/workers/slow_export.py [overrides]
"""

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from transformers import PreTrainedModel

from ipt.cli import run
from ipt.config import register, to_object
from ipt.pretrain import pretrain
from ipt.sweep import for_job

save_pretrained = PreTrainedModel.save_pretrained


def slowly(model: PreTrainedModel, out: str | Path, *args, **kwargs) -> None:
    save_pretrained(model, out, *args, **kwargs)
    if os.environ["SLOW_EXPORT"] == "stuck":
        time.sleep(3600)
    weights = Path(out) / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    chunk = -(-len(data) // 20)
    with weights.open("wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(float(os.environ["SLOW_EXPORT_S"]) / 20)


PreTrainedModel.save_pretrained = slowly
register()


@hydra.main(config_path="../../configs", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run(lambda: pretrain(to_object(for_job(cfg))))


if __name__ == "__main__":
    main()
