"""The measurements `bench/gpu.py` runs: ipt's trainer, a bare PyTorch loop over the same
model and batches, a profile, and the kernels' masking parity. Each returns one record (a
dict); the plan, the budget and the writing of records are gpu.py's.

Timing. Steps 1..warmup are not timed. Each of the next `measure` steps ends with a device
sync and a host clock read, so every record has per-step times and their spread; the
trainer synchronises once per step anyway (its anomaly check reads the loss), so this adds
no wait a real run does not have. Host syncs are counted in one more step after the timed
ones, under CUDA's sync debug mode, so the counting costs the timed steps nothing.

FLOPs, four ways (`flops` in each record):
- `mfu`: the trainer's count, 6N + 12 L d s per token (N with the unembedding, attention
  over the whole row, no causal halving), as torchtitan, OLMo-core and llm-foundry count;
- `mfu_6n`: the matmuls alone, 6N;
- `mfu_executed`: 6N plus attention as it runs under document masking, causal within each
  document: 12 L d sum(n (n + 1) / 2) per micro-batch over its documents' lengths n (from
  `cu_seqlens`), divided by its tokens;
- `gemm_ceiling_share`: the conventional FLOP/s over the bf16 GEMM rate measured on this
  device (`bench/gpu_ceiling.py`), where one was given.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
PRECISION = "bf16" if GPU else "fp32"  # the CPU runs only the --quick smoke test
DTYPE = torch.bfloat16 if GPU else torch.float32
ROOT = Path(__file__).resolve().parents[1]


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def release() -> None:
    """Free what a finished measurement left, and forget its compiled graphs: each
    measurement compiles afresh (from inductor's disk cache where it can), so none runs into
    Dynamo's recompile limit because of an earlier one."""
    torch._dynamo.reset()
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def peak_mem_gb() -> float:
    from ipt.observe import peak_memory_gb

    return peak_memory_gb()


class CompileLog:
    """Dynamo's counters over a measurement: recompiles (with their reasons), graph breaks
    and unique graphs; `mark()` and `changed()` tell whether a window saw a compile."""

    def __init__(self) -> None:
        from torch._dynamo import utils

        self.utils = utils
        utils.counters.clear()
        utils.guard_failures.clear()
        self._mark = 0

    def frames(self) -> int:
        return int(self.utils.counters["frames"].get("total", 0))

    def mark(self) -> None:
        self._mark = self.frames()

    def changed(self) -> bool:
        return self.frames() != self._mark

    def record(self) -> dict[str, Any]:
        c = self.utils.counters
        breaks = {**c["graph_break"], **c["unimplemented"]}
        reasons = [r for failures in self.utils.guard_failures.values() for r in failures]
        return {"unique_graphs": int(c["stats"].get("unique_graphs", 0)),
                "recompiles": len(reasons),
                "recompile_reasons": [r.splitlines()[0][:200] for r in reasons[:5]],
                "graph_breaks": sum(breaks.values()),
                "graph_break_reasons": [r.splitlines()[0][:200] for r in list(breaks)[:5]]}


def attention_keys(batch: dict[str, Any]) -> int:
    """Query-key pairs attention computes in a micro-batch under document masking: causal
    within each document, sum(n (n + 1) / 2) over its lengths."""
    n = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).double()
    return int((n * (n + 1) / 2).sum())


class StepClock:
    """Trainer callback: times each measured step, counts the host syncs of the step after
    them, and adds up what the FLOP counts need."""

    def __init__(self, warmup: int, measure: int, compiles: CompileLog) -> None:
        self.warmup, self.measure, self.compiles = warmup, measure, compiles
        self.times: list[float] = []
        self.syncs: int | None = None
        self.flops = self.keys = 0.0
        self.lengths: list[int] = []  # each timed step's sequence length
        self.variable = False  # Dataset Decomposition: steps of several lengths
        self._caught: Any = None
        self._keys_now = 0
        self._last = 0.0

    @property
    def steps(self) -> int:  # what the run must do: warm-up, timed, and the sync count
        return self.warmup + self.measure + 1

    def on_start(self, trainer: Any) -> None:
        self.tokens_per_step = trainer.global_batch * trainer.seq_len
        self.seq_len = trainer.seq_len
        self.dims = trainer.engine.module.config
        inner = trainer.batches

        def tapped() -> Any:  # the trainer draws a step's micro-batches during that step
            for batch in inner:
                self._keys_now += attention_keys(batch)
                yield batch

        trainer.batches = tapped()

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        timed = self.warmup < step <= self.warmup + self.measure
        if timed or step == self.warmup:
            sync()
            now = time.perf_counter()
            if timed:
                self.times.append(now - self._last)
                self.keys += self._keys_now
                self.variable |= "seq_len" in metrics
                self.lengths.append(int(metrics.get("seq_len", self.seq_len)))
            self._last = now
        if step == self.warmup:
            self.flops = -trainer.flops_done
            self.compiles.mark()
            if GPU:
                torch.cuda.reset_peak_memory_stats()
        if step == self.warmup + self.measure:
            self.flops += trainer.flops_done  # the timed steps' (each at its own length)
            self.compiled_in_window = self.compiles.changed()
            self._count_syncs(start=True)
        elif step == self.warmup + self.measure + 1:
            self._count_syncs(start=False)
        self._keys_now = 0

    def _count_syncs(self, start: bool) -> None:
        if not GPU:
            return
        if start:
            self._caught = warnings.catch_warnings(record=True)
            self._seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return
        torch.cuda.set_sync_debug_mode("default")
        self.syncs = sum("synchroniz" in str(w.message) for w in self._seen)
        self._caught.__exit__(None, None, None)

    def on_end(self, trainer: Any) -> None:
        pass

    def result(self, peak: float | None, gemm_flops: float | None) -> dict[str, Any]:
        seconds = sum(self.times)
        tokens = self.tokens_per_step * self.measure
        c = self.dims
        per_key = 12 * c.num_hidden_layers * c.hidden_size  # attention FLOPs per query-key pair
        # the trainer's count less its attention term (every token over its whole row): 6N,
        # with any extra heads' matmuls
        six_n = self.flops - per_key * self.tokens_per_step * sum(self.lengths)
        executed = six_n + per_key * self.keys
        rate = self.flops / seconds

        def share(flops: float, of: float | None) -> float | None:
            return flops / seconds / of if of else None

        return {"tokens_per_s": tokens / seconds, "step_time_s": seconds / self.measure,
                "step_time_spread_s": {"min": min(self.times), "median": statistics.median(
                    self.times), "max": max(self.times), "stdev": statistics.pstdev(self.times)},
                "timed_steps": self.measure, "mfu": share(self.flops, peak),
                "mfu_6n": share(six_n, peak), "mfu_executed": share(executed, peak),
                "gemm_ceiling_share": rate / gemm_flops if gemm_flops else None,
                "flops_per_token": self.flops / tokens,
                "executed_attention_share": (executed - six_n) / max(self.flops - six_n, 1.0),
                "peak_mem_gb": peak_mem_gb(), "host_syncs_per_step": self.syncs,
                "compiled_in_timed_window": self.compiled_in_window,
                **({"step_lengths": self.lengths} if self.variable else {})}


# --- runs --------------------------------------------------------------------------------


QUICK_MODEL = {"model.num_layers": 2, "model.hidden_size": 128, "model.intermediate_size": 384,
               "model.num_heads": 4, "model.num_kv_heads": 2}


def overrides(args: Any, run_dir: Path, model: str, seq: int,
              extra: dict[str, Any]) -> list[str]:
    """A benchmark run's config: `model` at `seq`, bf16 on a GPU, nothing but training (no
    evaluation, checkpoint or export), steps enough for the clock."""
    o = {"run_dir": str(run_dir), "name": run_dir.name, "data.root": args.data,
         "model": model, "model.max_seq_len": seq, "data.seq_len": seq,
         "train.precision": PRECISION, "train.micro_batch_size": args.micro_batch,
         "train.global_batch_size": args.micro_batch * args.accum,
         "train.max_steps": max(1000, args.warmup + args.measure + 1),
         "train.stop_after": args.warmup + args.measure + 1,
         "train.eval_every": 0, "train.checkpoint_every": 0, "train.export_at_end": False,
         "train.hang_timeout_s": 0, "deepspeed.stage": args.zero, "data.max_repeat": 1000,
         "logger.plot": False, "logger.progress_bar": "never", "logger.log_every": 1000,
         "logger.peak_flops": args.peak_flops}
    if args.quick:
        o |= QUICK_MODEL
    o |= extra
    return [f"{k}={'null' if v is None else v}" for k, v in o.items()]


def compose(args: Any, run_dir: Path, model: str, seq: int, extra: dict[str, Any]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ipt.config import register, to_object

    register()
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return to_object(hydra_compose("pretrain", overrides=overrides(args, run_dir, model,
                                                                       seq, extra)))


def trainer_run(args: Any, name: str, model: str, seq: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """ipt's own `pretrain` (DeepSpeed engine, loader, losses, callbacks), timed."""
    from ipt import attention
    from ipt.observe import peak_flops
    from ipt.pretrain import pretrain

    cfg = compose(args, Path(args.work) / name, model, seq, extra)
    compiles = CompileLog()
    clock = StepClock(args.warmup, args.measure, compiles)
    pretrain(cfg, callbacks=[clock])
    out = {"kind": "trainer", "model": model, "seq_len": seq, "precision": PRECISION,
           "attention": attention.choose(cfg.model.attn_implementation, DEVICE, DTYPE),
           "compile": cfg.train.compile,
           "activation_checkpointing": cfg.train.activation_checkpointing,
           "micro_batch": cfg.train.micro_batch_size,
           "global_batch": cfg.train.global_batch_size, "overrides": extra,
           **clock.result(peak_flops(cfg.logger.peak_flops), args.gemm_flops),
           **compiles.record()}
    release()
    return out


def bare_run(args: Any, model_name: str, seq: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The same model, kernel, loss and batches in a plain loop, as one would write it by
    hand: autocast bf16 over fp32 weights (every GEMM of the fused loss in bf16 too), fused
    AdamW, gradient clipping; no DeepSpeed, no trainer. Timed like the trainer's steps."""
    from ipt import attention
    from ipt.data import tokenizer as tok
    from ipt.data.loader import to_device, train_loader
    from ipt.data.sampling import Packed, open_train
    from ipt.losses import build_loss
    from ipt.model import FusedLM, build_model, compile_layers, flops_per_token
    from ipt.observe import peak_flops

    cfg = compose(args, Path(args.work) / "bare", model_name, seq, extra)
    tokenizer = tok.load(cfg.tokenizer)
    data = open_train(cfg, tok.fingerprint(cfg.tokenizer), Packed(cfg))
    kernel = attention.choose(cfg.model.attn_implementation, DEVICE, DTYPE)
    torch.manual_seed(0)
    lm = build_model(cfg.model, len(tokenizer), kernel=kernel)
    model = FusedLM(lm).to(DEVICE)
    compiles = CompileLog()
    if cfg.train.compile:
        compile_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=GPU)
    loss_fn = build_loss(cfg.loss, tokenizer.eos_token_id)
    t = cfg.train
    accum = t.global_batch_size // t.micro_batch_size
    assert data.dataset is not None
    batches = train_loader(data.dataset, data.order, 0, t.global_batch_size,
                           t.micro_batch_size, 0, 1, pin_memory=GPU)
    times: list[float] = []
    last = 0.0
    try:
        for step in range(args.warmup + args.measure):
            if step == args.warmup:
                sync()
                compiles.mark()
                if GPU:
                    torch.cuda.reset_peak_memory_stats()
                last = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            total = sum(int((b["labels"] != -100).sum()) for b in micro)
            for host in micro:
                batch = to_device(host, DEVICE)
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=GPU):
                    out = loss_fn(model, batch, step, [total / accum])
                out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= args.warmup:
                sync()
                now = time.perf_counter()
                times.append(now - last)
                last = now
    finally:
        batches.close()
    seconds = sum(times)
    tps = t.global_batch_size * seq * args.measure / seconds
    fpt = flops_per_token(lm, seq)
    peak = peak_flops(cfg.logger.peak_flops)
    in_window = compiles.changed()
    del model, lm, opt
    release()
    return {"kind": "bare", "model": model_name, "seq_len": seq,
            "precision": "bf16 autocast" if GPU else "fp32",
            "attention": kernel, "compile": t.compile, "activation_checkpointing": "none",
            "micro_batch": t.micro_batch_size, "global_batch": t.global_batch_size,
            "overrides": extra, "tokens_per_s": tps, "step_time_s": seconds / args.measure,
            "step_time_spread_s": {"min": min(times), "median": statistics.median(times),
                                   "max": max(times), "stdev": statistics.pstdev(times)},
            "timed_steps": args.measure, "mfu": fpt * tps / peak if peak else None,
            "peak_mem_gb": peak_mem_gb(), "compiled_in_timed_window": in_window,
            **compiles.record()}


def profile(args: Any, seq: int, opts: dict[str, Any]) -> dict[str, Any]:
    """GPU time by kernel over two steps of the best 1b run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ipt.pretrain import pretrain

    class Profiled:
        def on_start(self, trainer: Any) -> None:
            pass

        def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
            if metrics["step"] == args.warmup:
                self.prof = torch_profile(activities=[ProfilerActivity.CUDA if GPU
                                                      else ProfilerActivity.CPU])
                self.prof.__enter__()
            elif metrics["step"] == args.warmup + 2:
                sync()
                self.prof.__exit__(None, None, None)

        def on_end(self, trainer: Any) -> None:
            pass

    cfg = compose(args, Path(args.work) / "profile", "1b", seq, opts)
    cfg.train.stop_after = args.warmup + 2
    clock = Profiled()
    pretrain(cfg, callbacks=[clock])
    events = clock.prof.key_averages()

    def busy(e: Any) -> float:
        return float(e.device_time_total if GPU else e.self_cpu_time_total)

    total = sum(busy(e) for e in events) or 1.0
    top = sorted(events, key=lambda e: -busy(e))[:15]
    release()
    return {"kind": "profile", "model": "1b", "seq_len": seq, "overrides": opts,
            "top_kernels": [{"name": e.key[:90], "share": round(busy(e) / total, 4),
                             "calls": e.count} for e in top]}


def parity(kernel: str, dtype: torch.dtype) -> dict[str, Any]:
    """Packed micro-batches against each document alone, with a backward: a Llama, and a
    Mistral with a sliding window of 16 tokens (the larger difference is the one reported)."""
    from ipt import attention

    full = attention.parity_error(kernel, DEVICE, dtype, grad=True)
    window = attention.parity_error(kernel, DEVICE, dtype, grad=True, window=16)
    return {"kind": "parity", "attention": kernel, "precision": str(dtype)[6:],
            "max_abs_logit_diff": max(full, window), "full_attention_diff": full,
            "sliding_window_diff": window,
            "tolerance": 0.05 if dtype == torch.bfloat16 else 1e-3}


def teacher_folder(args: Any, student: Any) -> str:
    """A random teacher a quarter of the student's size, saved with the corpus' tokenizer."""
    from ipt.config import ModelConfig
    from ipt.data import tokenizer as tok
    from ipt.model import build_model

    tokenizer = tok.load(Path(args.data) / "tokenizer")
    m = student
    shape = ModelConfig(name="teacher", hidden_size=m.hidden_size // 2,
                        intermediate_size=m.intermediate_size // 2, num_layers=m.num_layers,
                        num_heads=max(1, m.num_heads // 2),
                        num_kv_heads=max(1, m.num_kv_heads // 2), max_seq_len=m.max_seq_len)
    torch.manual_seed(1)
    teacher = build_model(shape, len(tokenizer))
    out = Path(args.work) / "teacher"
    teacher.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
