"""The GPU benchmark: ipt's training path on one GPU, in one process, inside a time budget.

    python bench/gpu.py --data gpu-kit/data/gpubench --out OUT_DIR            # one H100/H200
    python bench/gpu.py --data data/demo --out OUT_DIR --quick                # a CPU smoke run

Normally `bench/gpu_session.sh` runs it (after the kit's install, the import check and the
GEMM ceiling); see docs/gpu.md. `--data` is a prepared corpus with a 32,000-token tokenizer
(`make gpu-kit` builds one). Each measurement is a fresh run of ipt's own `pretrain`
(DeepSpeed engine, loader, losses, callbacks) or of a bare PyTorch loop over the same model
and batches (`gpu_measure.py`). Each record is appended to OUT_DIR/records.jsonl as it
finishes, so a kill loses only the measurement in flight; OUT_DIR/summary.md is the table.

The plan runs in order of what it decides (`PLAN`): the masking parity of the kernels `auto`
would pick; 1b at 4096 in bf16 with document masking, eager then compiled; the bare loop; a
profile; ZeRO-0; the naive loss; then, with the faster of eager and compiled, the bracket
without document masking and the candidate speed-ups, each a switch beside the default; then
350m, Dataset Decomposition, KD, MTP and activation checkpointing. Each measurement has an
expected cost, scaled by how the finished ones compared with theirs; one that would not fit
what is left of `--budget-s` is skipped and recorded as skipped, and a hard limit
(`--budget-s` + `--grace-s`) ends the process, recording what was in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_measure as m  # noqa: E402

from ipt import attention  # noqa: E402


@dataclass
class Measurement:
    name: str
    cost_s: float  # expected wall time on an H100 (on a CPU, scaled by --quick's factor)
    run: Callable[[], dict[str, Any] | None]


class Records:
    """records.jsonl, one line per measurement as it finishes (or is skipped), with the
    environment in every line."""

    def __init__(self, out: Path, env: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.env, self.all = out / "records.jsonl", env, []
        self.path.write_text("")

    def add(self, rec: dict[str, Any]) -> dict[str, Any]:
        rec = {**rec, **self.env}
        self.all.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def get(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.all if r["name"] == name and "tokens_per_s" in r), None)


class Budget:
    """What is left of the time budget, the expected cost of a measurement scaled by how the
    finished ones compared with theirs, and a hard limit that ends the process."""

    def __init__(self, seconds: float, grace: float, scale: float,
                 on_expiry: Callable[[], None]) -> None:
        self.start, self.seconds, self.scale = time.perf_counter(), seconds, scale
        self.ratios: list[float] = []
        self.timer = threading.Timer(seconds + grace, on_expiry)
        self.timer.daemon = True
        self.timer.start()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def expected(self, cost_s: float) -> float:
        ratio = max(self.ratios) if self.ratios else 1.0  # the worst seen: better skip than overrun
        return cost_s * self.scale * ratio

    def finished(self, cost_s: float, wall_s: float) -> None:
        self.ratios.append(wall_s / (cost_s * self.scale))


def plan(args: argparse.Namespace, records: Records) -> list[Measurement]:
    seq = 256 if args.quick else 4096
    extra = [w for w in args.extra.split(",") if w]
    out: list[Measurement] = []
    for kernel in attention.KERNELS:
        for dtype in (torch.bfloat16, torch.float32) if m.GPU else (torch.float32,):
            asked = kernel == "flex" and "flex" in extra or dtype == torch.float32 and \
                "fp32" in extra
            picked = kernel != "flex" and (dtype == torch.bfloat16 or not m.GPU)
            if asked or picked:
                out.append(Measurement(f"parity-{kernel}-{str(dtype)[6:]}", 8,
                                       lambda k=kernel, d=dtype: parity(k, d)))

    def trainer(name: str, cost: float, model: str = "1b", at: int = seq,
                **opts: Any) -> Measurement:
        return Measurement(name, cost, lambda: m.trainer_run(
            args, name, model, at, {**best(records), **opts}))

    out += [
        Measurement("1b-eager", 45, lambda: m.trainer_run(args, "1b-eager", "1b", seq, {})),
        Measurement("1b-compiled", 110, lambda: m.trainer_run(
            args, "1b-compiled", "1b", seq, {"train.compile": True})),
        Measurement("1b-bare", 60, lambda: m.bare_run(args, "1b", seq, best(records))),
        Measurement("1b-profile", 40, lambda: m.profile(args, seq, best(records))),
        trainer("1b-zero0", 50, **{"deepspeed.stage": 0}),
        trainer("1b-naive-loss", 50, **{"loss.memory_efficient": False}),
        trainer("1b-no-doc-masking", 50, **{"data.doc_masking": False}),
        # the candidate speed-ups, each beside the default it would replace
        trainer("1b-micro-batch-8", 50, **{"train.micro_batch_size": 2 * args.micro_batch,
                                           "train.global_batch_size": 2 * args.micro_batch
                                           * max(1, args.accum // 2)}),
        trainer("1b-loss-chunk-4096", 50, **{"loss.chunk_size": 4096}),
        trainer("1b-fused-adamw", 50, **{"optim.fused": True}),
        trainer("1b-device-skip", 50, **{"optim.fused": True, "optim.device_skip": True}),
        Measurement("1b-varlen-repeat-kv", 50, lambda: repeated_kv(args, seq, best(records))),
        trainer("350m", 35, "350m", 128 if args.quick else 2048),
    ]
    out += decomposition(args, seq, trainer)
    out += [
        Measurement("1b-kd", 60, lambda: kd(args, seq, best(records))),
        trainer("1b-mtp4", 60, **{"loss": "mtp", "loss.heads": 4}),
        trainer("1b-ac-full", 55, **{"train.activation_checkpointing": "full"}),
        trainer("1b-ac-selective", 55, **{"train.activation_checkpointing": "selective"}),
    ]
    return out


def best(records: Records) -> dict[str, Any]:
    """The options of the faster of 1b eager and compiled (eager until both are known, and
    always in a --quick run, where compiling each later run on a CPU would be most of it)."""
    eager, compiled = records.get("1b-eager"), records.get("1b-compiled")
    if records.env["quick"]:
        return {}
    if compiled and (not eager or compiled["tokens_per_s"] > eager["tokens_per_s"]):
        return {"train.compile": True}
    return {}


def parity(kernel: str, dtype: torch.dtype) -> dict[str, Any]:
    why = attention.why_not(kernel, m.DEVICE, dtype)
    return {"skipped": why} if why else m.parity(kernel, dtype)


def repeated_kv(args: argparse.Namespace, seq: int, opts: dict[str, Any]) -> dict[str, Any]:
    """varlen attention with K/V heads repeated to the query heads' count, beside the default
    that passes fewer K/V heads (where the installed torch can)."""
    if attention.choose("auto", m.DEVICE, m.DTYPE) != "varlen":
        return {"skipped": "auto does not pick varlen here"}
    attention.kernels.VARLEN_GQA = False
    try:
        return m.trainer_run(args, "1b-varlen-repeat-kv", "1b", seq, opts)
    finally:
        attention.kernels.VARLEN_GQA = True


def decomposition(args: argparse.Namespace, seq: int, trainer: Any) -> list[Measurement]:
    """Dataset Decomposition at 1b: pieces of 64 to 2 x seq tokens in the `natural` order (so
    the timed steps sample the epoch's mix of lengths), against best-fit at seq (1b-eager)
    and at 2 x seq with the same tokens per step. Eager: compiling would recompile for each
    new length inside the few timed steps. A micro-batch must hold whole 2 x seq pieces."""
    if args.micro_batch % 2:
        return []
    long, half = 2 * seq, args.micro_batch // 2
    return [
        Measurement("1b-bestfit-2x", 50, lambda: m.trainer_run(
            args, "1b-bestfit-2x", "1b", long, {"train.micro_batch_size": half,
                                                "train.global_batch_size": half * args.accum})),
        Measurement("1b-decompose", 60, lambda: m.trainer_run(
            args, "1b-decompose", "1b", seq, {
                "model.max_seq_len": long, "data.packing": "decompose",
                "data.decompose.min_len": 64, "data.decompose.max_len": long,
                "data.decompose.curriculum": "natural"})),
    ]


def kd(args: argparse.Namespace, seq: int, opts: dict[str, Any]) -> dict[str, Any]:
    student = m.compose(args, Path(args.work) / "probe", "1b", seq, {}).model
    return m.trainer_run(args, "1b-kd", "1b", seq, {
        **opts, "teacher.path": m.teacher_folder(args, student), "teacher.kd_steps": 1000})


def ratios(records: Records) -> None:
    """Ratios between records of one run: trainer to bare loop, each switch and technique to
    the default it stands beside."""
    base = records.get("1b-compiled") if best(records) else records.get("1b-eager")
    bare = records.get("1b-bare")
    if base is None:
        return
    if bare:
        base["bare_ratio"] = base["tokens_per_s"] / bare["tokens_per_s"]
    for rec in records.all:
        if rec is not base and "tokens_per_s" in rec and rec["name"].startswith("1b-"):
            rec["ratio_to_default"] = rec["tokens_per_s"] / base["tokens_per_s"]
            if "flops_per_token" in rec:
                rec["flop_ratio_to_default"] = rec["flops_per_token"] / base["flops_per_token"]
    dd, eager, wide = (records.get(n) for n in ("1b-decompose", "1b-eager", "1b-bestfit-2x"))
    for other, key in ((eager, "ratio_to_bestfit"), (wide, "ratio_to_bestfit_2x")):
        if dd and other:  # eager, like the decomposed run
            dd[key] = dd["tokens_per_s"] / other["tokens_per_s"]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    return {"device": torch.cuda.get_device_name() if m.GPU else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "zero_stage": args.zero, "quick": args.quick}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="gpu-kit/data/gpubench")
    p.add_argument("--out", required=True, help="the folder records.jsonl and summary.md go to")
    p.add_argument("--work", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke run, on a CPU too")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--measure", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--grace-s", type=float, default=20.0,
                   help="past the budget, the hard limit: the process ends")
    p.add_argument("--gemm-tflops", type=float, default=None,
                   help="the measured bf16 GEMM rate (bench/gpu_ceiling.py), for MFU's 4th form")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, where ipt.observe's table lacks it")
    p.add_argument("--only", default="", help="comma-separated name prefixes to run")
    p.add_argument("--extra", default="", help="parity runs auto never needs: flex, fp32")
    args = p.parse_args()
    if not m.GPU and not args.quick:
        sys.exit("bench/gpu.py needs a CUDA GPU (on a CPU, --quick runs a smoke test)")
    args.work = args.work or tempfile.mkdtemp(prefix="ipt-gpu-bench-")
    args.gemm_flops = args.gemm_tflops * 1e12 if args.gemm_tflops else None
    args.peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    os.environ.setdefault("OMP_NUM_THREADS", "8")
    records = Records(Path(args.out), environment(args))
    in_flight: dict[str, Any] = {}

    def expire() -> None:
        name = in_flight.get("name", "?")
        limit = args.budget_s + args.grace_s
        records.add({"name": name, "error": f"ended by the hard limit, {limit:.0f} s after "
                     "the start, while running"})
        write_summary(records, Path(args.out))
        print(f"bench/gpu.py: the hard limit ended {name}", flush=True)
        os._exit(124)

    budget = Budget(args.budget_s, args.grace_s, 1.0, expire)
    wanted = [w for w in args.only.split(",") if w]
    for step in plan(args, records):
        if wanted and not any(step.name.startswith(w) for w in wanted):
            continue
        expected = budget.expected(step.cost_s)
        if expected > budget.left():
            records.add({"name": step.name, "skipped": f"expected {expected:.0f} s, "
                         f"{max(budget.left(), 0):.0f} s of the budget left"})
            continue
        in_flight["name"] = step.name
        t = time.perf_counter()
        try:
            rec = step.run() or {}
        except Exception as e:  # noqa: BLE001 - recorded, and the rest still runs
            rec = {"error": f"{type(e).__name__}: {e}"[:2000]}
            m.release()
        wall = time.perf_counter() - t
        if "skipped" not in rec:
            budget.finished(step.cost_s, wall)
        rec = {"name": step.name, **rec, "wall_s": round(wall, 1),
               "expected_s": round(expected, 1)}
        if m.GPU:  # what the run left allocated: memory a later run cannot have
            rec["leftover_gb"] = torch.cuda.memory_allocated() / 2**30
        print(json.dumps(records.add(rec)), flush=True)
    budget.timer.cancel()
    ratios(records)
    (Path(args.out) / "records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records.all))
    write_summary(records, Path(args.out))
    print(f"bench/gpu.py: {len(records.all)} records in "
          f"{time.perf_counter() - budget.start:.0f} s -> {args.out}")


def write_summary(records: Records, out: Path) -> None:
    """summary.md: one row per record, the figures that decide things."""

    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) else "-"

    rows = ["| name | tokens/s | MFU | MFU 6N | MFU executed | GEMM share | ratio | peak GB "
            "| syncs | recompiles | breaks | wall s | note |", "|" + "---|" * 13]
    for r in records.all:
        note = r.get("skipped") or r.get("error") or (
            f"max diff {r['max_abs_logit_diff']:.2g} (tol {r['tolerance']})"
            if "max_abs_logit_diff" in r else "")
        if r.get("compiled_in_timed_window"):
            note += " compiled inside the timed window"
        ratio = r.get("bare_ratio", r.get("ratio_to_default"))
        rows.append(f"| {r['name']} | {f(r.get('tokens_per_s'), ',.0f')} | "
                    f"{f(r.get('mfu'), '.1%')} | {f(r.get('mfu_6n'), '.1%')} | "
                    f"{f(r.get('mfu_executed'), '.1%')} | {f(r.get('gemm_ceiling_share'), '.1%')}"
                    f" | {f(ratio, '.3f')} | {f(r.get('peak_mem_gb'), '.1f')} | "
                    f"{f(r.get('host_syncs_per_step'), 'd')} | {f(r.get('recompiles'), 'd')} | "
                    f"{f(r.get('graph_breaks'), 'd')} | {f(r.get('wall_s'), '.0f')} | "
                    f"{str(note)[:120]} |")
    env = records.env
    (out / "summary.md").write_text(f"{env['device']}, torch {env['torch']}, transformers "
                                    f"{env['transformers']}, {env['date']}\n\n"
                                    + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
