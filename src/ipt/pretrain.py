"""`pretrain(cfg)`: build everything a run needs from its config, resume, train, export.

Read top to bottom, this is the whole job: ranks, the configured techniques, data, model,
engine, resume, loss, callbacks, loop. It names no technique: each one changes the run
through its hooks (`ipt.technique`), composed here in the registry's order
(`ipt.techniques`). `train/pretrain.py` is a Hydra wrapper around it and the tests call it
the same way.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import OmegaConf

from ipt import attention, checkpoint, quiet
from ipt.callbacks import Checkpointer, Evaluator
from ipt.checkpoint import CheckpointError, TrainerState
from ipt.config import ConfigError, PretrainConfig, validate
from ipt.data import tokenizer as tok
from ipt.data.sampling import Packed, Sampling, TrainData, open_train
from ipt.engine import Dist, build_engine, deepspeed_config, init_distributed
from ipt.export import ExportAtEnd
from ipt.health import AnomalyPolicy, LossAnomalies
from ipt.losses import build_loss
from ipt.model import (
    FusedLM,
    build_model,
    check_unembedding,
    checkpoint_layers,
    compile_layers,
    flops_per_token,
    source_config,
)
from ipt.observe import MetricsLogger, peak_flops
from ipt.schedule import lr_multiplier
from ipt.technique import Flops, Setup, Technique
from ipt.techniques import configured
from ipt.trainer import Stopped, StopRequests, Trainer, TrainerOptions
from ipt.zero3 import is_partitioned, numel

log = logging.getLogger(__name__)


def setup_logging(dist: Dist) -> None:
    """Rank 0 logs progress; other ranks only warnings, each line tagged with its rank."""
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"[%(asctime)s r{dist.rank}] %(levelname)s %(name)s: %(message)s",
                        force=True)
    quiet.route_to_log(logging.getLogger().handlers[0])


def prepare_run_dir(cfg: PretrainConfig, dist: Dist) -> Path:
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".write_test").touch()
            (run_dir / ".write_test").unlink()
        except OSError as e:
            raise ConfigError(f"run_dir={run_dir} is not writable ({e}); "
                              "set run_dir=<a writable folder>") from e
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    return run_dir


def open_data(setup: Setup, techniques: list[Technique]) -> tuple[Sampling, TrainData]:
    """How the run cuts and orders its data (a technique's way, or packed sequences), and
    the training sources opened that way, with what the techniques change in them."""
    found = {t.name: s for t in techniques if (s := t.sampling(setup)) is not None}
    if len(found) > 1:
        raise ConfigError(f"the techniques {', '.join(found)} each cut the data their own "
                          "way, and a run reads it one way; configure one of them")
    sampling = next(iter(found.values())) if found else Packed(setup.cfg)
    data = open_train(setup.cfg, setup.tokenizer_fp, sampling)
    for t in techniques:
        data = t.data(data, sampling, setup)
    return sampling, data


def build_module(lm: Any, techniques: list[Technique], setup: Setup) -> FusedLM:
    """What the engine wraps: the LM with its fused loss, or a technique's version of it."""
    found = {t.name: m for t in techniques if (m := t.model(lm, setup)) is not None}
    if len(found) > 1:
        raise ConfigError(f"the techniques {', '.join(found)} each wrap the model, and the "
                          "engine wraps one module; configure one of them")
    return next(iter(found.values())) if found else FusedLM(lm)


def as_dict(cfg: PretrainConfig) -> dict:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container


def find_resume_point(cfg: PretrainConfig, ckpt_root: Path) -> list[Path]:
    """Checkpoints to try, in order (an explicit path, or every usable one for `auto`)."""
    mode = cfg.train.resume
    if mode == "never":
        return []
    if mode == "auto":
        return checkpoint.usable_checkpoints(ckpt_root)
    path = Path(mode)
    why = checkpoint.problem(path) if path.is_dir() else "it does not exist"
    if why:
        raise CheckpointError(f"train.resume={mode} is not a usable checkpoint: {why}")
    return [path]


def resume(engine, candidates: list[Path], fresh: TrainerState, dist: Dist) -> TrainerState:
    """Load the first candidate every rank can load; a corrupt one is skipped with a warning."""
    for path in candidates:
        saved = checkpoint.read_state(path)
        checkpoint.check_compatible(saved, fresh.model_config, path)
        if saved.data_order and saved.data_order != fresh.data_order:
            raise CheckpointError(
                f"checkpoint {path} was trained on another order of its data ("
                + "; ".join(f"{k}: checkpoint {saved.data_order.get(k)}, config "
                            f"{fresh.data_order.get(k)}" for k in sorted(
                                {*saved.data_order, *fresh.data_order})
                            if saved.data_order.get(k) != fresh.data_order.get(k))
                + "), so its steps cannot continue; keep those settings, or use a new run_dir "
                "or train.resume=never")
        for what in ("data_fingerprint", "tokenizer_fingerprint"):
            if getattr(saved, what) != getattr(fresh, what):
                raise CheckpointError(
                    f"checkpoint {path} has {what}={getattr(saved, what)}, this run has "
                    f"{getattr(fresh, what)}: the data or tokenizer changed, so the sample order "
                    "cannot continue; use a new run_dir or train.resume=never")
        try:
            state = checkpoint.load(engine, path)
            ok = 1
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the older one
            log.warning("skipping checkpoint %s: loading failed (%s: %s)", path,
                        type(e).__name__, e)
            ok = 0
        flag = torch.tensor([ok], device=dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        if flag.item():
            state.world_size = dist.world_size
            if dist.is_main:
                log.info("resumed from %s at step %d (%d samples consumed)", path, state.step,
                         state.consumed_samples)
            return state
    if candidates:
        # A failed load may have changed some of the engine's state: never train on from there.
        raise CheckpointError(f"none of the checkpoints {[str(c) for c in candidates]} could be "
                              "loaded (see the warnings above); fix or remove them, or start over "
                              "with train.resume=never")
    return fresh


def dtype(cfg: PretrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def resolve_precision(cfg: PretrainConfig, dist: Dist) -> None:
    """`train.precision=auto`: bf16 on a GPU that has it, fp32 elsewhere."""
    if cfg.train.precision == "auto":
        gpu = dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
        cfg.train.precision = "bf16" if gpu else "fp32"


def pretrain(cfg: PretrainConfig, callbacks: list | None = None) -> TrainerState:
    """Train; raises `Stopped` (after checkpointing) when a rank got SIGTERM or SIGUSR1.
    `callbacks`: more trainer callbacks, called after ipt's own (`bench/gpu.py` times steps
    with one)."""
    stop_requests = StopRequests().install()  # first: a signal during set-up is not lost
    try:
        return _pretrain(cfg, stop_requests, callbacks or [])
    finally:
        stop_requests.uninstall()


def _pretrain(cfg: PretrainConfig, stop_requests: StopRequests,
              extra_callbacks: list) -> TrainerState:
    # collectives time out a minute after the watchdog would have fired: a backstop for the
    # set-up, before the watchdog runs
    hang = cfg.train.hang_timeout_s
    dist = init_distributed(cfg.train.threads_per_rank, hang + 60 if hang > 0 else 0)
    setup_logging(dist)
    grad_accum = validate(cfg, dist.world_size)
    resolve_precision(cfg, dist)
    run_dir = prepare_run_dir(cfg, dist)
    if dist.is_main:
        file_log = logging.FileHandler(run_dir / "train.log")
        file_log.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(file_log)

    techniques = configured(cfg)
    tokenizer = tok.load(cfg.tokenizer)
    config = source_config(cfg.model, len(tokenizer), tokenizer.bos_token_id,
                           tokenizer.eos_token_id)  # what its layers ask of attention
    kernel = attention.choose(cfg.model.attn_implementation, dist.device, dtype(cfg),
                              model=attention.needs(config))
    setup = Setup(cfg, dist, kernel, dtype(cfg), tok.fingerprint(cfg.tokenizer), len(tokenizer))
    for technique in techniques:
        technique.check(setup)  # before any data or model is read
    sampling, data = open_data(setup, techniques)
    downstream = None
    if cfg.eval.tasks:  # its tasks are checked here, before any model is built
        from ipt.evaluate import DownstreamEval

        downstream = DownstreamEval(cfg.eval, tokenizer, cfg.train.max_steps,
                                    cfg.deepspeed.stage == 3)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    # under ZeRO-3 a checkpoint is loaded partitioned: no rank holds the whole model
    lm = build_model(cfg.model, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                     kernel, zero3=deepspeed_config(cfg, grad_accum))
    if is_partitioned(lm):
        held = sum(p.ds_tensor.numel() for p in lm.parameters())  # type: ignore[attr-defined]
        log.info("model.init_from=%s loaded partitioned (ZeRO-3): this rank holds %s of its "
                 "%s parameters", cfg.model.init_from, f"{held:,}",
                 f"{sum(numel(p) for p in lm.parameters()):,}")
    model = build_module(lm, techniques, setup)
    t = cfg.train
    recomputed = checkpoint_layers(model, t.activation_checkpointing, t.ac_every)
    compiled = compile_layers(model) if t.compile else 0
    if dist.is_main:
        log.info("attention: %s (model.attn_implementation=%s), %s; activation checkpointing "
                 "of %d layers, %d compiled", kernel, cfg.model.attn_implementation,
                 t.precision, recomputed, compiled)
    model_config = lm.config.to_dict()
    for technique in techniques:
        model_config |= technique.model_config()
    fresh = TrainerState(data_fingerprint=f"{data.order.key:016x}",
                         data_order=sampling.settings(), tokenizer_fingerprint=setup.tokenizer_fp,
                         world_size=dist.world_size, model_config=model_config,
                         config=as_dict(cfg))
    candidates = find_resume_point(cfg, run_dir / "checkpoints")
    engine = build_engine(model, cfg, grad_accum, lr_multiplier(cfg.schedule, cfg.train.max_steps))
    if cfg.model.init_from:  # its logits are what the fused loss computes (in the engine: a
        # partitioned model runs a forward there only)
        check_unembedding(lm, f"model.init_from={cfg.model.init_from}")
    state = resume(engine, candidates, fresh, dist)
    state.config = fresh.config

    loss_fn = build_loss(cfg.loss, tokenizer.eos_token_id)
    for technique in techniques:
        loss_fn = technique.loss(loss_fn, state.step, setup)
    def open_batches(at: TrainerState) -> Any:
        return sampling.batches(data, at.consumed_samples, grad_accum, dist.rank,
                                dist.world_size, dist.device.type == "cuda", at.step)

    batches = open_batches(state)
    callbacks: list = []
    if data.valid and cfg.train.eval_every > 0:
        callbacks.append(Evaluator(data.valid, loss_fn, cfg.train.micro_batch_size,
                                   cfg.train.eval_batches, cfg.train.eval_every))
    if downstream is not None:
        callbacks.append(downstream)
    callbacks.append(Checkpointer(run_dir / "checkpoints", cfg.train.checkpoint_every,
                                  cfg.train.keep_last))
    if cfg.train.export_at_end:  # before the logger's end (wandb's sync, the plot): the
        # other ranks wait for the export only
        callbacks.append(ExportAtEnd(run_dir / "checkpoints", run_dir / "hf", cfg.tokenizer))
    if dist.is_main:
        callbacks.append(MetricsLogger(cfg.logger, run_dir, cfg.train.max_steps,
                                       fresh.config, cfg.name))
    callbacks += extra_callbacks

    def rollback(current: TrainerState) -> TrainerState | None:
        found = checkpoint.usable_checkpoints(run_dir / "checkpoints")
        if not found:
            return None
        restored = checkpoint.load(engine, found[0])
        restored.world_size, restored.config = dist.world_size, current.config
        return restored

    anomalies = None if t.on_anomaly == "none" else AnomalyPolicy(
        LossAnomalies(t.spike_sigma, t.spike_window, t.max_anomalies_in_row), t.on_anomaly,
        rollback, t.max_rollbacks, open_batches)
    flops: Flops = functools.partial(flops_per_token, lm)  # of a sequence length
    for technique in techniques:
        flops = technique.flops(flops, lm)
    options = TrainerOptions(
        grad_accum, t.global_batch_size, cfg.data.seq_len, t.max_steps, flops_per_token=flops,
        peak_flops=peak_flops(cfg.logger.peak_flops), stop_after=t.stop_after,
        hang_timeout=t.hang_timeout_s, read_every=cfg.logger.log_every,
        variable_length=sampling.variable_length)
    trainer = Trainer(engine, loss_fn, batches, state, dist, callbacks, options, stop_requests,
                      anomalies)
    if dist.is_main:
        log.info("training %s: %s params, %d ranks, grad accumulation %d, from step %d",
                 cfg.name, f"{sum(numel(p) for p in model.parameters()):,}", dist.world_size,
                 grad_accum, state.step)
    try:
        state = trainer.fit()
    finally:
        trainer.batches.close()  # type: ignore[attr-defined]
    if trainer.stopped is not None:
        raise Stopped(state.step, trainer.stopped, stop_requests.signum)
    if dist.is_main and trainer.finished:
        summary = {"run_dir": str(run_dir), "step": state.step,
                   "checkpoint": str(run_dir / "checkpoints" / checkpoint.tag_for(state.step))}
        if cfg.train.export_at_end:
            summary["hf_export"] = str(run_dir / "hf")
        if cfg.logger.plot:
            summary["loss_plot"] = str(run_dir / "loss.png")
        summary["metrics"] = str(run_dir / "metrics.jsonl")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"\nipt: {cfg.name} finished at step {state.step}\n"
              + "".join(f"  {k:<11} {v}\n" for k, v in summary.items() if k != "step"),
              flush=True)
    return state
