"""The device's two ceilings, measured: a bf16 GEMM's rate and the copy bandwidth.

    python bench/gpu_ceiling.py --out OUT_DIR/ceiling.json          # about 20 s on a GPU
    python bench/gpu_ceiling.py --out OUT_DIR/ceiling.json --quick  # a CPU smoke run

MFU against a datasheet peak says how far a run is from a number no code reaches; against
the GEMM rate this card actually sustains (`gemm_ceiling_share` in bench/gpu.py's records)
it says how far the trainer is from its own matmuls. The GEMM is 8192^3 in bf16 on random
data (zeros run faster), repeated for `--seconds`, timed with CUDA events in batches of 10;
the copy is a device-to-device copy of 2 GiB, counting the bytes read and written; the host
copy is pinned host memory to the device, what the loader's transfers get.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

GPU = torch.cuda.is_available()


def timed(fn, repeat: int) -> float:
    """Seconds per call of `fn`, over `repeat` calls after a warm-up."""
    fn()
    if GPU:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def gemm(n: int, seconds: float) -> dict[str, float]:
    dtype = torch.bfloat16 if GPU else torch.float32
    device = "cuda" if GPU else "cpu"
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    rates = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        per_call = timed(lambda: torch.mm(a, b, out=out), 10)
        rates.append(2 * n**3 / per_call / 1e12)
    return {"gemm_n": n, "gemm_dtype": str(dtype)[6:], "gemm_tflops_median":
            statistics.median(rates), "gemm_tflops_max": max(rates), "gemm_batches": len(rates)}


def copies(nbytes: int) -> dict[str, float]:
    device = "cuda" if GPU else "cpu"
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    d2d = timed(lambda: dst.copy_(src), 10)
    out = {"copy_bytes": nbytes, "copy_gb_per_s": 2 * nbytes / d2d / 1e9}
    if GPU:
        host = torch.randn(nbytes // 4).pin_memory()
        h2d = timed(lambda: src.copy_(host, non_blocking=True), 5)
        out["host_to_device_gb_per_s"] = nbytes / h2d / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="small sizes, for a CPU")
    args = p.parse_args()
    if not GPU and not args.quick:
        raise SystemExit("bench/gpu_ceiling.py needs a CUDA GPU (on a CPU, --quick)")
    n, nbytes, seconds = (512, 64 << 20, 0.5) if args.quick else (8192, 2 << 30, args.seconds)
    record = {"device": torch.cuda.get_device_name() if GPU else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              **gemm(n, seconds), **copies(nbytes)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
