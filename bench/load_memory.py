"""Loading a released checkpoint under ZeRO-3: the peak host memory of each rank, ipt's
partitioned load beside the load it replaced, in the same run.

    .venv/bin/python bench/load_memory.py [--sizes s,m,l] [--ranks 2] [--folders DIR]

Three Llama-shaped checkpoints (about 60M, 230M and 950M parameters, saved in bf16 as released
checkpoints are, written once and kept in `--folders`) are each loaded on `--ranks` ranks under
torchrun (gloo), as `train/pretrain.py` loads `model.init_from` with `deepspeed.stage=3`:
the causal LM, then the DeepSpeed engine with its AdamW. Two arms:

- `every rank` (before issue 38): each rank builds the whole model in fp32 with
  `from_pretrained`, and DeepSpeed partitions it when the engine is made;
- `partitioned` (`ipt.zero3.partitioned`): transformers' DeepSpeed integration builds the
  model under `deepspeed.zero.Init`, each parameter partitioned as it is made, and rank 0
  alone reads the checkpoint, copying it into the partitions a module at a time.

Each rank reports, above what it held before the load (torch, DeepSpeed and transformers
imported, the ranks joined): the anonymous memory it holds once the model is loaded
(`loaded_anon_gb`), its peak during the load (`load_peak_anon_gb`, RssAnon sampled every 10 ms)
and after the engine is made (`peak_anon_gb`, AdamW's states included); its peak resident
memory (`load_peak_rss_gb`, VmHWM, which also counts the checkpoint's mapped file pages), and
the load's seconds. Each figure is the larger rank's; `ratio_*` is partitioned / every rank.

`make bench ARGS=load-memory` runs it with the defaults (about 4 GB of disk, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FOLDERS = Path(tempfile.gettempdir()) / "ipt-load-memory"  # kept between runs
# name: (hidden, layers, intermediate, heads); vocabulary 32,000 (Llama 2's)
SIZES = {"s": (512, 8, 1536, 8), "m": (1024, 12, 3072, 16), "l": (2048, 16, 5632, 16)}
VOCAB = 32000
ARMS = ("every rank", "partitioned")


def folder(name: str, root: Path) -> Path:
    """A random Llama of size `name`, saved in bf16 (reused when already there)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = root / name
    if (out / "config.json").exists():
        return out
    hidden, layers, inter, heads = SIZES[name]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out.with_name(out.name + ".tmp"), safe_serialization=True)
    out.with_name(out.name + ".tmp").rename(out)
    return out


def parameters(path: Path) -> int:
    """The parameters a saved folder holds, read off its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is no dict
                total += _numel(st.get_slice(key).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """The largest RssAnon seen, sampled every 10 ms on a thread."""

    def __init__(self) -> None:
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon"))

    def read(self) -> int:
        self.peak = max(self.peak, _status("RssAnon"))
        return self.peak


def worker(path: str, arm: str, out: str) -> None:
    """One rank (under torchrun): load `path` as `arm` does, then make the engine."""
    import deepspeed
    import torch

    from ipt.config import ModelConfig
    from ipt.engine import init_distributed
    from ipt.model import FusedLM, build_model

    peak = PeakAnon()
    dist = init_distributed(threads_per_rank=1, timeout_s=600)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                 "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                 "steps_per_print": 1 << 30}
    base = _status("RssAnon")  # torch, DeepSpeed and transformers imported, ranks joined
    start = time.perf_counter()
    lm = build_model(ModelConfig(name="load", init_from=path), VOCAB, kernel="sdpa",
                     zero3=ds_config if arm == "partitioned" else None)
    loaded = time.perf_counter()
    row: dict[str, Any] = {"rank": dist.rank, "load_s": loaded - start,
                           "base_anon_gb": base / 1e9,
                           "loaded_anon_gb": (_status("RssAnon") - base) / 1e9,
                           "load_peak_anon_gb": (peak.read() - base) / 1e9,
                           "load_peak_rss_gb": _status("VmHWM") / 1e9}
    model = FusedLM(lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    row |= {"engine_s": time.perf_counter() - loaded, "peak_rss_gb": _status("VmHWM") / 1e9,
            "peak_anon_gb": (peak.read() - base) / 1e9}
    Path(out).with_suffix(f".{dist.rank}.json").write_text(json.dumps(row))


def measure(path: Path, arm: str, ranks: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", __file__, "--worker", str(path), arm, str(out)]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(ranks)]


def run(sizes: list[str] | None = None, ranks: int = 2,
        root: Path = FOLDERS) -> list[dict[str, Any]]:
    results = []
    for name in sizes or list(SIZES):
        path = folder(name, root)
        row: dict[str, Any] = {"benchmark": f"load under ZeRO-3, {name} model, {ranks} ranks",
                               "checkpoint_gb": sum(f.stat().st_size for f in path.iterdir())
                               / 1e9}
        row["parameters_m"] = parameters(path) / 1e6
        for arm in ARMS:
            ranks_rows = measure(path, arm, ranks)
            key = arm.replace(" ", "_")
            for field in ("loaded_anon_gb", "load_peak_anon_gb", "peak_anon_gb",
                          "load_peak_rss_gb", "load_s"):
                row[f"{key}_{field}"] = max(r[field] for r in ranks_rows)  # the larger rank
        for field in ("loaded_anon_gb", "load_peak_anon_gb", "peak_anon_gb"):
            row[f"ratio_{field}"] = row[f"partitioned_{field}"] / row[f"every_rank_{field}"]
        results.append(row)
    return results


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--folders", type=Path, default=FOLDERS)
    a = p.parse_args()
    for r in run(a.sizes.split(","), a.ranks, a.folders):
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
