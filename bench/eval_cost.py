"""What downstream evaluation during training costs (`make bench ARGS=eval`).

The demo's pre-training recipe (`experiment=demo`, at 150 steps: 2 CPU ranks, ZeRO-1) on the
demo's raw shards, without evaluation and with `eval=heldout` (3 held-out tasks, 64 examples
each, every 50 steps), one run after the other in the same benchmark. The tasks come from
the documents the shards hold out (`data_pipeline/rc_tasks.py`). Reported: the ratio of the
runs' wall times, and the evaluation's own seconds and share of the run with it. The demo
adds KD and MTP to this recipe, so its steps are slower and the share there is smaller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rc_tasks(data: Path, out: Path) -> Path:
    settings = json.loads((data / "shards" / "docstrings" / "settings.json").read_text())
    subprocess.run([sys.executable, str(ROOT / "data_pipeline" / "rc_tasks.py"),
                    f"source.path={data}/raw/docstrings.jsonl", "source.id_field=id",
                    f"valid_fraction={settings['valid_fraction']}", "max_chars=700",
                    f"out={out}"], check=True, capture_output=True, cwd=ROOT)
    return out


def train(data: Path, run_dir: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train" / "pretrain.py"), "experiment=demo", f"data.root={data}",
           f"run_dir={run_dir}", "train.max_steps=150", "train.eval_every=50", "eval.every=50",
           "train.threads_per_rank=1", "logger.progress_bar=never",
           "logger.plot=false", "train.export_at_end=false", "train.checkpoint_every=0",
           *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    from ipt.observe import read_metrics

    return seconds, read_metrics(run_dir / "metrics.jsonl")[-1]


def run(data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tasks = rc_tasks(data, Path(tmp) / "tasks")
        plain, _ = train(data, Path(tmp) / "plain", [])
        with_eval, last = train(data, Path(tmp) / "eval",
                                ["eval=heldout", f"eval.include_path={tasks}"])
    evaluated = sum(v for k, v in last.items() if k == "downstream/seconds")
    return {"benchmark": "downstream evaluation during training (demo recipe, eval=heldout)",
            "baseline": "the same run without evaluation",
            "run_s": round(plain, 1), "run_with_eval_s": round(with_eval, 1),
            "ratio": round(with_eval / plain, 3),
            "last_eval_s": round(evaluated, 2),
            "eval_share_of_run": round(last["downstream/share"], 4),
            "scores_at_end": {k.removeprefix("downstream/"): v for k, v in last.items()
                              if k.startswith("downstream/") and k.count("/") == 2}}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    from ipt.config import DemoDataConfig
    from ipt.data.demo import build_demo_data

    print(json.dumps(run(build_demo_data(DemoDataConfig(out=str(ROOT / "data" / "demo")))),
                     indent=1))
