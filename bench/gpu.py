"""The GPU benchmark: ipt's training path on one GPU, in one command.

    python bench/gpu.py --data data/gpubench            # one H100: under 8 minutes
    python bench/gpu.py --data data/gpubench --quick    # small models: a smoke run

`--data` is a prepared corpus with a 32,000-token tokenizer (real packed text; make it with
`python data_pipeline/demo_data.py out=data/gpubench max_docs=40000 vocab_size=32000`). In
one process, each measurement a fresh run of ipt's own `pretrain` (DeepSpeed engine, loader,
losses, callbacks), it writes one record per measurement to `--out`:

- parity: for every attention kernel the GPU can run, packed micro-batches against each
  document alone (`ipt.attention.parity_error`), with a backward;
- 1b at 4096, bf16, document masking: eager, compiled, with activation checkpointing (full
  and selective), and with the naive (full-logit) loss: tokens/s, MFU, peak memory;
- bare: the same model, kernel, batch and loss in a bare PyTorch loop (autocast bf16, fp32
  weights, fused AdamW), and the trainer's ratio to it; the trainer again under ZeRO-0, to
  see what ZeRO-1's machinery costs on one GPU;
- 350m at 2048;
- Dataset Decomposition: 1b on pieces of 64 to 8192 tokens (4096 tokens per sequence slot),
  against best-fit at 4096 and at 8192 with the same tokens per step;
- kd and mtp: online KD from a teacher a quarter of the student's size, and 4-head MTP,
  as step-time ratios to next-token beside their FLOP ratios;
- profile: where the best 1b step spends its GPU time, by kernel.

MFU counts 6N + 12 L d s FLOPs per token (no causal halving) against the device's dense bf16
peak (`ipt.observe.PEAK_FLOPS`). Host syncs per step are counted with CUDA's sync debug mode.
A deadline (`--budget-s`) skips what would not finish, saying so in the record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ipt import attention  # noqa: E402
from ipt.observe import peak_flops  # noqa: E402


class StepClock:
    """Trainer callback: synchronises at the start and end of the measured steps only, and
    counts the host syncs of one measured step."""

    def __init__(self, warmup: int, measure: int) -> None:
        self.warmup, self.measure = warmup, measure
        self.t0 = self.t1 = 0.0
        self.syncs: int | None = None
        self._caught: Any = None

    def on_start(self, trainer: Any) -> None:
        self.tokens_per_step = trainer.global_batch * trainer.seq_len
        self.flops = 0.0
        self.lengths: list[int] = []  # each measured step's, under Dataset Decomposition

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if self.warmup < step <= self.warmup + self.measure and "seq_len" in metrics:
            self.lengths.append(int(metrics["seq_len"]))
        if step == self.warmup:
            sync()
            self.t0 = time.perf_counter()
            self.flops = -trainer.flops_done
            if GPU:
                torch.cuda.reset_peak_memory_stats()
                self._caught = warnings.catch_warnings(record=True)
                self.records = self._caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif step == self.warmup + 1 and self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs = sum("synchroniz" in str(w.message) for w in self.records)
            self._caught.__exit__(None, None, None)
            self._caught = None
        if step == self.warmup + self.measure:
            sync()
            self.t1 = time.perf_counter()
            self.flops += trainer.flops_done  # the measured steps' (each at its own length)

    def on_end(self, trainer: Any) -> None:
        pass

    def result(self) -> dict[str, Any]:
        seconds = self.t1 - self.t0
        tokens = self.tokens_per_step * self.measure
        peak = peak_flops(None)
        return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / self.measure,
                "mfu": self.flops / seconds / peak if peak else None,
                "flops_per_token": self.flops / tokens,
                "peak_mem_gb": peak_mem_gb(), "host_syncs_per_step": self.syncs,
                **({"step_lengths": self.lengths} if self.lengths else {})}


GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PRECISION = "bf16" if GPU else "fp32"  # the CPU runs only the --quick smoke test
DTYPE = torch.bfloat16 if GPU else torch.float32


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def peak_mem_gb() -> float:
    from ipt.observe import peak_memory_gb

    return peak_memory_gb()


def overrides(args: argparse.Namespace, run_dir: Path, model: str, seq: int,
              extra: dict[str, Any]) -> list[str]:
    o = {"run_dir": str(run_dir), "name": run_dir.name, "data.root": args.data,
         "model": model, "model.max_seq_len": seq, "data.seq_len": seq,
         "train.precision": PRECISION, "train.micro_batch_size": args.micro_batch,
         "train.global_batch_size": args.micro_batch * args.accum,
         "train.max_steps": 1000, "train.stop_after": args.warmup + args.measure,
         "train.eval_every": 0, "train.checkpoint_every": 0, "train.export_at_end": False,
         "train.hang_timeout_s": 0, "deepspeed.stage": args.zero, "data.max_repeat": 1000,
         "logger.plot": False, "logger.progress_bar": "never", "logger.log_every": 1000}
    if args.quick:
        o |= {"model.num_layers": 2, "model.hidden_size": 512, "model.intermediate_size": 1536,
              "model.num_heads": 8, "model.num_kv_heads": 4}
    o |= extra
    return [f"{k}={v}" for k, v in o.items()]


def compose(args: argparse.Namespace, run_dir: Path, model: str, seq: int,
            extra: dict[str, Any]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ipt.config import register, to_object

    register()
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return to_object(hydra_compose("pretrain", overrides=overrides(args, run_dir, model,
                                                                       seq, extra)))


def trainer_run(args: argparse.Namespace, name: str, model: str, seq: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    from ipt.pretrain import pretrain

    cfg = compose(args, Path(args.work) / name, model, seq, extra)
    clock = StepClock(args.warmup, args.measure)
    pretrain(cfg, callbacks=[clock])
    out = {"kind": "trainer", "model": model, "seq_len": seq, "precision": PRECISION,
           "attention": attention.choose(cfg.model.attn_implementation, DEVICE, DTYPE),
           "compile": cfg.train.compile,
           "activation_checkpointing": cfg.train.activation_checkpointing,
           "micro_batch": cfg.train.micro_batch_size,
           "global_batch": cfg.train.global_batch_size, **extra, **clock.result()}
    release()
    return out


def release() -> None:
    import gc

    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def bare_run(args: argparse.Namespace, model_name: str, seq: int,
             extra: dict[str, Any]) -> dict[str, Any]:
    """The same model, kernel, loss and batches in a plain loop: autocast bf16 over fp32
    weights, fused AdamW, gradient clipping; no DeepSpeed, no trainer."""
    from ipt.data import tokenizer as tok
    from ipt.data.loader import to_device, train_loader
    from ipt.data.sampling import Packed, open_train
    from ipt.losses import build_loss
    from ipt.model import FusedLM, build_model, compile_layers, flops_per_token

    cfg = compose(args, Path(args.work) / "bare", model_name, seq, extra)
    dev = DEVICE
    tokenizer = tok.load(cfg.tokenizer)
    data = open_train(cfg, tok.fingerprint(cfg.tokenizer), Packed(cfg))
    kernel = attention.choose(cfg.model.attn_implementation, dev, DTYPE)
    torch.manual_seed(0)
    lm = build_model(cfg.model, len(tokenizer), kernel=kernel)
    model = FusedLM(lm).to(dev)
    if cfg.train.compile:
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=GPU)
    loss_fn = build_loss(cfg.loss, tokenizer.eos_token_id)
    t = cfg.train
    accum = t.global_batch_size // t.micro_batch_size
    assert data.dataset is not None
    batches = train_loader(data.dataset, data.order, 0, t.global_batch_size,
                           t.micro_batch_size, 0, 1, pin_memory=GPU)
    t0 = 0.0
    try:
        for step in range(args.warmup + args.measure):
            if step == args.warmup:
                sync()
                if GPU:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            total = sum(int((b["labels"] != -100).sum()) for b in micro)
            for host in micro:
                batch = to_device(host, dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=GPU):
                    out = loss_fn(model, batch, step, [total / accum])
                out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - t0
    finally:
        batches.close()
    tps = t.global_batch_size * seq * args.measure / elapsed
    fpt = flops_per_token(lm, seq)
    peak = peak_flops(None)
    del model, lm, opt
    release()
    return {"kind": "bare", "model": model_name, "seq_len": seq,
            "precision": "bf16 autocast" if GPU else "fp32",
            "attention": kernel, "compile": t.compile, "activation_checkpointing": "none",
            "micro_batch": t.micro_batch_size, "global_batch": t.global_batch_size,
            "tokens_per_s": tps, "mfu": fpt * tps / peak if peak else None,
            "peak_mem_gb": peak_mem_gb()}


def teacher_folder(args: argparse.Namespace, student: Any) -> str:
    """A random teacher a quarter of the student's size, saved with the corpus' tokenizer."""
    from ipt.config import ModelConfig
    from ipt.data import tokenizer as tok
    from ipt.model import build_model

    tokenizer = tok.load(Path(args.data) / "tokenizer")
    m = student
    shape = ModelConfig(name="teacher", hidden_size=m.hidden_size // 2,
                        intermediate_size=m.intermediate_size // 2, num_layers=m.num_layers,
                        num_heads=max(1, m.num_heads // 2), num_kv_heads=max(
                            1, m.num_kv_heads // 2), max_seq_len=m.max_seq_len)
    torch.manual_seed(1)
    teacher = build_model(shape, len(tokenizer))
    out = Path(args.work) / "teacher"
    teacher.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/gpubench")
    p.add_argument("--out", default="bench/results/gpu.json")
    p.add_argument("--work", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="2-layer models: a smoke run")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--measure", type=int, default=6)
    p.add_argument("--budget-s", type=float, default=450.0)
    p.add_argument("--only", default="", help="comma-separated name prefixes to run "
                   "(e.g. parity,1b-compiled,1b-bare); default: all")
    args = p.parse_args()
    if not GPU and not args.quick:
        sys.exit("bench/gpu.py needs a CUDA GPU (on a CPU, --quick runs a smoke test)")
    args.work = args.work or tempfile.mkdtemp(prefix="ipt-gpu-bench-")
    os.environ.setdefault("OMP_NUM_THREADS", "8")
    start = time.perf_counter()
    import transformers

    env = {"device": torch.cuda.get_device_name() if GPU else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d"), "zero_stage": args.zero}
    records: list[dict[str, Any]] = []

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1))

    wanted = [w for w in args.only.split(",") if w]

    def measure(name: str, fn: Any, *fn_args: Any) -> dict[str, Any] | None:
        if wanted and not any(name.startswith(w) for w in wanted):
            return None
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            records.append({"name": name, **env, "skipped": f"{left:.0f} s of the budget left"})
            save()
            return None
        t = time.perf_counter()
        try:
            rec = fn(*fn_args)
        except Exception as e:  # noqa: BLE001 - recorded, and the rest still runs
            rec = {"error": f"{type(e).__name__}: {e}"[:2000]}
            release()
        rec = {"name": name, **env, **rec, "wall_s": round(time.perf_counter() - t, 1)}
        if GPU:  # what the run left allocated: memory a later run cannot have
            rec["leftover_gb"] = torch.cuda.memory_allocated() / 2**30
        records.append(rec)
        save()
        print(json.dumps(rec), flush=True)
        return rec

    dev = DEVICE
    for kernel in attention.KERNELS:
        for dtype in (torch.bfloat16, torch.float32) if GPU else (torch.float32,):
            why = attention.why_not(kernel, dev, dtype)
            name = f"parity-{kernel}-{str(dtype)[6:]}"
            if why is not None:
                records.append({"name": name, **env, "skipped": why})
                continue
            measure(name, lambda k=kernel, d=dtype: {
                "kind": "parity", "attention": k, "precision": str(d)[6:],
                "max_abs_logit_diff": attention.parity_error(k, dev, d, grad=True),
                "tolerance": 0.05 if d == torch.bfloat16 else 1e-3})

    seq = 4096 if not args.quick else 1024
    eager = measure("1b-eager", trainer_run, args, "1b-eager", "1b", seq, {})
    compiled = measure("1b-compiled", trainer_run, args, "1b-compiled", "1b", seq,
                       {"train.compile": True})
    best = max((r for r in (eager, compiled) if r and "tokens_per_s" in r),
               key=lambda r: r["tokens_per_s"], default=None)
    best_opts = {"train.compile": True} if best is compiled else {}
    bare = measure("1b-bare", bare_run, args, "1b", seq, best_opts)
    if best and bare and "tokens_per_s" in bare:
        best["bare_ratio"] = best["tokens_per_s"] / bare["tokens_per_s"]
        bare["bare_ratio"] = 1.0
        save()
    # in order of importance: what the budget cuts comes last
    measure("350m", trainer_run, args, "350m", "350m", 2048 if not args.quick else 512,
            best_opts)
    decomposition(args, measure, seq, eager)
    student = compose(args, Path(args.work) / "probe", "1b", seq, {}).model
    if args.quick:
        student.num_layers, student.hidden_size, student.intermediate_size = 2, 512, 1536
        student.num_heads, student.num_kv_heads = 8, 4
    kd = measure("1b-kd", lambda: trainer_run(args, "1b-kd", "1b", seq, {
        **best_opts, "teacher.path": teacher_folder(args, student), "teacher.kd_steps": 1000}))
    mtp = measure("1b-mtp4", trainer_run, args, "1b-mtp4", "1b", seq,
                  {**best_opts, "loss": "mtp", "loss.heads": 4})
    if best:
        for rec in (kd, mtp):
            if rec and "step_time_s" in rec:
                rec["step_time_ratio"] = rec["step_time_s"] / best["step_time_s"]
                rec["flop_ratio"] = rec["flops_per_token"] / best["flops_per_token"]
        measure("1b-profile", profile, args, seq, best_opts)
    # DeepSpeed's cost on one GPU: the same run without ZeRO's partitioning hooks
    measure("1b-zero0", trainer_run, args, "1b-zero0", "1b", seq,
            {**best_opts, "deepspeed.stage": 0})
    for mode in ("full", "selective"):
        measure(f"1b-ac-{mode}", trainer_run, args, f"1b-ac-{mode}", "1b", seq,
                {**best_opts, "train.activation_checkpointing": mode})
    measure("1b-naive-loss", trainer_run, args, "1b-naive", "1b", seq,
            {**best_opts, "loss.memory_efficient": False})
    save()
    print(f"bench/gpu.py: {len(records)} records in {time.perf_counter() - start:.0f} s -> "
          f"{args.out}")


def decomposition(args: argparse.Namespace, measure: Any, seq: int,
                  packed: dict[str, Any] | None) -> None:
    """Dataset Decomposition at 1b: pieces of 64 to 2 x seq tokens (a 4096-token step's
    micro-batch holds two 8192-token pieces, or many short ones), in the `natural` order, so
    the measured steps sample the epoch's mix of lengths; against best-fit at seq (`packed`,
    the eager run) and at 2 x seq with the same tokens per micro-batch and step. Eager:
    compiling would recompile for each new length inside the few measured steps."""
    long = 2 * seq
    if args.micro_batch % 2:  # a micro-batch must hold whole pieces of 2 x seq tokens
        print("bench/gpu.py: Dataset Decomposition skipped: --micro-batch must be even")
        return
    half = args.micro_batch // 2
    wide = measure("1b-bestfit-2x", trainer_run, args, "1b-bestfit-2x", "1b", long, {
        "train.micro_batch_size": half, "train.global_batch_size": half * args.accum})
    dd = measure("1b-decompose", trainer_run, args, "1b-decompose", "1b", seq, {
        "model.max_seq_len": long, "data.packing": "decompose", "data.decompose.min_len": 64,
        "data.decompose.max_len": long, "data.decompose.curriculum": "natural"})
    if dd and "tokens_per_s" in dd:
        for base, key in ((packed, f"ratio_to_bestfit_{seq}"), (wide, f"ratio_to_bestfit_{long}")):
            if base and "tokens_per_s" in base:
                dd[key] = dd["tokens_per_s"] / base["tokens_per_s"]


def profile(args: argparse.Namespace, seq: int, opts: dict[str, Any]) -> dict[str, Any]:
    """GPU time by kernel over two steps of the best 1b run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    class Profiled(StepClock):
        def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
            if metrics["step"] == self.warmup:
                self.prof = torch_profile(activities=[ProfilerActivity.CUDA if GPU
                                                      else ProfilerActivity.CPU])
                self.prof.__enter__()
            elif metrics["step"] == self.warmup + 2:
                sync()
                self.prof.__exit__(None, None, None)

    from ipt.pretrain import pretrain

    cfg = compose(args, Path(args.work) / "profile", "1b", seq, opts)
    cfg.train.stop_after = args.warmup + 2
    clock = Profiled(args.warmup, 2)
    pretrain(cfg, callbacks=[clock])
    events = clock.prof.key_averages()

    def busy(e: Any) -> float:
        return float(e.device_time_total if GPU else e.self_cpu_time_total)

    total = sum(busy(e) for e in events) or 1.0
    top = sorted(events, key=lambda e: -busy(e))[:15]
    release()
    return {"kind": "profile", "model": "1b", "seq_len": seq,
            "top_kernels": [{"name": e.key[:90], "share": round(busy(e) / total, 4),
                             "calls": e.count} for e in top]}


if __name__ == "__main__":
    main()
