"""Loader throughput against the trainer's consumption: the data-wait fraction when each
micro-batch's compute takes a tenth of the demo's (as on a fast accelerator).

The demo's loader (2-source mixture, best-fit packing, document masking) feeds a loop whose
"step" is a sleep of the given length: once on its background thread (the default), once
with a worker process as well. Sleeping leaves the CPU to
the loader, as an accelerator would. Reported: the time spent waiting for batches over the
total.
"""

from __future__ import annotations

import time
from pathlib import Path

from ipt.data.loader import Concat, MixtureOrder, PackedShards, train_loader
from ipt.data.shards import ShardSet


def wait_fraction(loader, compute: float, micro_batches: int) -> float:
    next(loader)  # start-up is not steady state
    waited = 0.0
    start = time.perf_counter()
    for _ in range(micro_batches):
        t = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t
        time.sleep(compute)
    return waited / (time.perf_counter() - start)


def run(data: Path, demo_step_s: float, micro_batches: int = 400) -> dict:
    parts = [PackedShards(ShardSet(data / "shards" / name / "train"), 256)
             for name in ("docstrings", "packages")]
    order = MixtureOrder([len(p) for p in parts], [0.75, 0.25], 0, "bench")
    compute = demo_step_s / 4 / 10  # per micro-batch (4 per demo step), 10x faster
    result = {"benchmark": "loader_data_wait_10x_faster_step", "fake_compute_s": compute}
    for workers in (0, 1):
        loader = train_loader(Concat(parts), order, 0, 32, 8, 0, 2, num_workers=workers)
        name = "thread" if workers == 0 else "1_worker_process"
        result[f"data_wait_fraction_{name}"] = wait_fraction(loader, compute, micro_batches)
    return result
