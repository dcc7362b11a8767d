"""`make bench`: every benchmark, side by side with its baseline in the same run.

Results are printed as a table and written to bench/results/results.json; docs/benchmarks.md
records them with the machine they ran on.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ipt.config import DemoDataConfig  # noqa: E402
from ipt.data.demo import build_demo_data  # noqa: E402


def demo_step_seconds() -> float:
    """The demo's median step time, from its last run; 1.1 s (measured here) without one."""
    metrics = HERE.parent / "runs" / "demo" / "metrics.jsonl"
    if not metrics.exists():
        return 1.1
    from ipt.observe import read_metrics

    times = sorted(r["step_time_s"] for r in read_metrics(metrics))
    return times[len(times) // 2]


def main(argv: list[str]) -> None:
    only = set(argv)
    data = build_demo_data(DemoDataConfig(out=str(HERE.parent / "data" / "demo")))
    results = []
    if not only or "trainer" in only:
        import trainer_vs_torch

        results.append(trainer_vs_torch.run(data, stage=1, threads=2))
    if not only or "scaling" in only:
        import scaling

        results.append(scaling.run(data))
    if not only or "prepare" in only:
        import prepare_throughput

        results.extend(prepare_throughput.run(data))
    if not only or "loader" in only:
        import loader_wait

        results.append(loader_wait.run(data, demo_step_seconds()))
    if not only or "synth" in only:
        import synth_throughput

        results.extend(synth_throughput.run(data))
    if "synth-vllm" in only:  # only when named: it needs vLLM's virtualenv (make vllm)
        import synth_throughput

        results.extend(synth_throughput.run_vllm(data))
    if not only or "kd" in only:
        import kd_cost

        results.extend(kd_cost.run())
    if not only or "mtp" in only:
        import mtp_cost

        results.extend(mtp_cost.run())
    if not only or "eval" in only:
        import eval_cost

        results.append(eval_cost.run(data))
    if not only or "decompose" in only:
        import decompose

        results.append(decompose.run(data))
    if "load-memory" in only:  # only when named: it writes about 4 GB of checkpoints
        import load_memory

        results.extend(load_memory.run())
    if "loader-scale" in only:  # only when named: it writes about 10 GB of corpora
        import loader_scale

        results.extend(loader_scale.run())
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
               "platform": platform.platform(), "gpu": torch.cuda.is_available()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "results": results},
                                                 indent=1))
    for r in results:
        print(f"\n{r['benchmark']}")
        for k, v in r.items():
            if k != "benchmark":
                print(f"  {k:<36} {v:.4g}" if isinstance(v, float) else f"  {k:<36} {v}")


if __name__ == "__main__":
    main(sys.argv[1:])
