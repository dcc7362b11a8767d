"""`pretrain(cfg)`: build everything a run needs from its config, resume, train, export.

Read top to bottom, this is the whole job: ranks, data, model, engine, resume, callbacks, loop.
`train/pretrain.py` is a Hydra wrapper around it and the tests call it the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ipt import attention, checkpoint, quiet
from ipt.checkpoint import CheckpointError, TrainerState
from ipt.config import ConfigError, PretrainConfig, max_len, validate
from ipt.data import tokenizer as tok
from ipt.data.decompose import (
    DecomposedOrder,
    DecomposedShards,
    EarlyPhase,
    PieceBatches,
    piece_ids,
)
from ipt.data.loader import Concat, MixtureOrder, PackedShards, load, train_loader
from ipt.data.shards import ShardSet
from ipt.engine import Dist, build_engine, init_distributed
from ipt.export import ExportAtEnd
from ipt.health import AnomalyPolicy, LossAnomalies
from ipt.losses import Loss, build_loss
from ipt.model import FusedLM, build_model, checkpoint_layers, compile_layers, flops_per_token
from ipt.mtp.heads import attach
from ipt.observe import MetricsLogger, peak_flops
from ipt.schedule import lr_multiplier
from ipt.slm import select
from ipt.slm.kd import DistillationLoss, kd_weight
from ipt.slm.select import SelectedOrder, selected_order
from ipt.trainer import Checkpointer, Evaluator, Stopped, StopRequests, Trainer

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


def open_shards(key: str, path: Path, tokenizer_fp: str, cfg: PretrainConfig) -> ShardSet:
    shards = ShardSet(path)
    if shards.tokenizer_fingerprint != tokenizer_fp:
        raise ConfigError(f"{key}={path} was tokenized with tokenizer "
                          f"{shards.tokenizer_fingerprint}, but tokenizer={cfg.tokenizer} is "
                          f"{tokenizer_fp}; re-run the prepare stage or point at the right one")
    return shards


def open_split(key: str, path: Path, tokenizer_fp: str, cfg: PretrainConfig) -> PackedShards:
    """One split of a source in packed sequences. (Validation under Dataset Decomposition
    too: best-fit sequences of seq_len, one fixed measure whatever the curriculum.)"""
    d = cfg.data
    packing = "bestfit" if d.packing == "decompose" else d.packing
    return PackedShards(open_shards(key, path, tokenizer_fp, cfg), d.seq_len, packing,
                        d.doc_masking)


Order = MixtureOrder | SelectedOrder | DecomposedOrder | EarlyPhase


def open_data(cfg: PretrainConfig, tokenizer_fp: str) -> tuple[Concat, Order,
                                                                dict[str, PackedShards]]:
    """The mixture of training sources in its global order, and each source's validation set."""
    names, dirs, valid = [], [], {}
    train: list[Any] = []
    d = cfg.data
    decomposed = d.packing == "decompose"
    for name, source in d.sources.items():
        key = f"data.sources.{name}.path"
        names.append(name)
        dirs.append(Path(source.path))
        if decomposed:
            shards = open_shards(key, Path(source.path) / "train", tokenizer_fp, cfg)
            train.append(DecomposedShards(shards, d.decompose.min_len, max_len(d)))
        else:
            train.append(open_split(key, Path(source.path) / "train", tokenizer_fp, cfg))
        held_out = Path(source.path) / "valid"
        if held_out.is_dir() and any(held_out.glob("*.json")):
            valid[name] = open_split(key, held_out, tokenizer_fp, cfg)
    weights = [cfg.data.sources[n].weight for n in names]
    fingerprint = hashlib.sha256(repr([(n, p.fingerprint, w) for n, p, w in
                                       zip(names, train, weights, strict=True)]).encode())
    fp = fingerprint.hexdigest()[:16]
    sel = cfg.data.select
    steps = sel.steps if sel.steps is not None else cfg.teacher.kd_steps
    order: Order
    if decomposed:
        order = decomposed_order(cfg, train, names, dirs, weights, fp)
    else:
        order = MixtureOrder([len(p) for p in train], weights, cfg.data.seed, fp,
                             cfg.data.max_repeat, names)
        if sel.fraction is not None:
            order = selected_order(order, train, dirs, names, weights, sel, cfg.data.seed,
                                   steps * cfg.train.global_batch_size, cfg.data.max_repeat)
    if sel.fraction is not None:
        log.info("data selection: the first %d steps draw from the %s %.0f%% of each source "
                 "by %s", steps, sel.mode, 100 * sel.fraction, sel.column)
    for name, part in zip(names, train, strict=True):
        weight = cfg.data.sources[name].weight
        if isinstance(part, DecomposedShards):
            log.info("source %s: %d pieces of %s tokens, %.1f%% of its tokens in none "
                     "(tails under data.decompose.min_len), weight %s", name, len(part),
                     "/".join(map(str, part.lengths[::-1])), 100 * part.dropped_share, weight)
        else:
            log.info("source %s: %d sequences (%.1f%% filled), weight %s", name, len(part),
                     100 * part.fill, weight)
    return Concat(train), order, valid


def decomposed_order(cfg: PretrainConfig, parts: list[DecomposedShards], names: list[str],
                     dirs: list[Path], weights: list[float],
                     fingerprint: str) -> DecomposedOrder | EarlyPhase:
    """Dataset Decomposition's steps; with data selection, its first steps from the
    selected pieces only."""
    d = cfg.data
    order = functools.partial(
        DecomposedOrder, weights=weights, tokens_per_step=cfg.train.global_batch_size * d.seq_len,
        curriculum=d.decompose.curriculum, cycles=d.decompose.cycles, seed=d.seed,
        max_repeat=d.max_repeat, names=names)
    full = order(piece_ids(parts), fingerprint=fingerprint)
    log.info("Dataset Decomposition: %d steps per epoch, curriculum %s x %d; %.1f%% of the "
             "pieces' tokens are left out of each epoch (whole steps only: a bucket's last "
             "partial step, and the remainders of its cycles)", full.epoch_steps,
             d.decompose.curriculum, d.decompose.cycles, 100 * full.left_out)
    sel = cfg.data.select
    if sel.fraction is None:
        return full
    steps = sel.steps if sel.steps is not None else cfg.teacher.kd_steps
    chosen = select.selections(full.key, parts, dirs, names, sel)
    early = order(piece_ids(parts, chosen),
                  fingerprint=f"{full.key:x}:{select.digest(chosen)}:{steps}")
    return EarlyPhase(early, full, steps)


def data_order(cfg: PretrainConfig) -> dict[str, Any]:
    """What the sample order depends on besides the data: the packing, and under Dataset
    Decomposition the settings its steps are made with."""
    d = cfg.data
    if d.packing != "decompose":
        return {"packing": d.packing}
    return {"packing": d.packing, "data.decompose.min_len": d.decompose.min_len,
            "data.decompose.max_len": max_len(d), "data.decompose.curriculum":
            d.decompose.curriculum, "data.decompose.cycles": d.decompose.cycles,
            "tokens per step": cfg.train.global_batch_size * d.seq_len, "data.seed": d.seed}


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
                f"checkpoint {path} was trained on another order of pieces ("
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


def distillation(cfg: PretrainConfig, dist: Dist, step: int, base: Loss,
                 vocab_size: int, kernel: str) -> DistillationLoss:
    """The KD loss; the teacher is loaded only if the run resumes before the KD phase ends
    (and never for offline soft labels, which the loader brings)."""
    from ipt.slm import teacher

    k = cfg.teacher
    if k.soft_labels:
        log.info("offline KD from the stored soft labels for steps < %d (%s switch)",
                 k.kd_steps, k.switch)
        return DistillationLoss(None, k, base, vocab_size)
    pending = any(kd_weight(k, s) > 0 for s in range(step, k.kd_steps + k.decay_steps))
    zero3 = cfg.train.micro_batch_size if cfg.deepspeed.stage == 3 else None
    # the student's kernel: it runs the precision, and the teacher needs no backward
    model = teacher.load(k, dist.device, dtype(cfg), zero3, kernel) if pending else None
    if model is not None:
        log.info("teacher %s%s: KD for steps < %d (%s switch)", k.path,
                 ", sharded with ZeRO-3" if zero3 else "", k.kd_steps, k.switch)
    return DistillationLoss(model, k, base, vocab_size)


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
    kernel = attention.choose(cfg.model.attn_implementation, dist.device, dtype(cfg))
    run_dir = prepare_run_dir(cfg, dist)
    if dist.is_main:
        file_log = logging.FileHandler(run_dir / "train.log")
        file_log.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(file_log)

    if cfg.teacher.path is not None and not cfg.teacher.soft_labels:
        from ipt.slm import teacher

        teacher.check(cfg.teacher, cfg.tokenizer)  # before any model is built
    tokenizer_fp = tok.fingerprint(cfg.tokenizer)
    train_set: Dataset
    train_set, order, valid_sets = open_data(cfg, tokenizer_fp)
    tokenizer = tok.load(cfg.tokenizer)
    downstream = None
    if cfg.eval.tasks:  # its tasks are checked here, before any model is built
        from ipt.evaluate import DownstreamEval

        downstream = DownstreamEval(cfg.eval, tokenizer, cfg.train.max_steps,
                                    cfg.deepspeed.stage == 3)
    soft_until = None  # offline KD: the loader adds soft labels to the samples before this
    if cfg.teacher.soft_labels:
        from ipt.slm import soft_labels

        train_set = soft_labels.for_run(
            train_set, list(cfg.data.sources), [Path(s.path) for s in cfg.data.sources.values()],
            tokenizer_fp, len(tokenizer), cfg.teacher.path)
        soft_until = (cfg.teacher.kd_steps + cfg.teacher.decay_steps) \
            * cfg.train.global_batch_size

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    lm = build_model(cfg.model, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                     kernel)
    extra_heads = cfg.loss.heads - 1 if cfg.loss.name == "mtp" else 0
    head_params = None
    # The engine wraps the LM with its fused unembedding and loss (`ipt.mtp.heads`), with
    # the extra heads of multi-token prediction or none.
    model: FusedLM
    if extra_heads:
        mtp_model = attach(lm, extra_heads, cfg.model.init_from, cfg.loss.head_type)
        head_params = sum(p.numel() for p in mtp_model.mtp_heads[0].parameters())
        model = mtp_model
    else:
        model = FusedLM(lm)
    t = cfg.train
    recomputed = checkpoint_layers(model, t.activation_checkpointing, t.ac_every)
    compiled = compile_layers(model) if t.compile else 0
    if dist.is_main:
        log.info("attention: %s (model.attn_implementation=%s), %s; activation checkpointing "
                 "of %d layers, %d compiled", kernel, cfg.model.attn_implementation,
                 t.precision, recomputed, compiled)
    fresh = TrainerState(data_fingerprint=f"{order.key:016x}", data_order=data_order(cfg),
                         tokenizer_fingerprint=tokenizer_fp, world_size=dist.world_size,
                         model_config={**lm.config.to_dict(), "mtp_heads": extra_heads,
                                       "mtp_head_type": cfg.loss.head_type if extra_heads
                                       else None},
                         config=as_dict(cfg))
    candidates = find_resume_point(cfg, run_dir / "checkpoints")
    engine = build_engine(model, cfg, grad_accum, lr_multiplier(cfg.schedule, cfg.train.max_steps))
    state = resume(engine, candidates, fresh, dist)
    state.config = fresh.config

    loss_fn = build_loss(cfg.loss, tokenizer.eos_token_id)
    if cfg.teacher.enabled:
        loss_fn = distillation(cfg, dist, state.step, loss_fn, len(tokenizer), kernel)
    pin = dist.device.type == "cuda"
    if isinstance(order, DecomposedOrder | EarlyPhase):  # a step's pieces, by steps consumed
        steps_done = state.consumed_samples // cfg.train.global_batch_size
        batches = load(train_set, PieceBatches(order, steps_done, grad_accum, dist.rank,
                                               dist.world_size), cfg.data.num_workers, pin)
    else:
        batches = train_loader(train_set, order, state.consumed_samples,
                               cfg.train.global_batch_size, cfg.train.micro_batch_size,
                               dist.rank, dist.world_size, cfg.data.num_workers,
                               pin_memory=pin, soft_until=soft_until)
    callbacks: list = []
    if valid_sets and cfg.train.eval_every > 0:
        callbacks.append(Evaluator(valid_sets, loss_fn, cfg.train.micro_batch_size,
                                   cfg.train.eval_batches, cfg.train.eval_every))
    if downstream is not None:
        callbacks.append(downstream)
    callbacks.append(Checkpointer(run_dir / "checkpoints", cfg.train.checkpoint_every,
                                  cfg.train.keep_last))
    if dist.is_main:
        callbacks.append(MetricsLogger(cfg.logger, run_dir, cfg.train.max_steps,
                                       fresh.config, cfg.name))
    if cfg.train.export_at_end:
        callbacks.append(ExportAtEnd(run_dir / "checkpoints", run_dir / "hf", cfg.tokenizer))
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
        rollback, t.max_rollbacks)
    flops = functools.partial(flops_per_token, lm, extra_heads=extra_heads,
                              head_params=head_params)  # of a sequence length
    trainer = Trainer(engine, loss_fn, batches, state, dist, grad_accum,
                      cfg.train.global_batch_size, cfg.data.seq_len, cfg.train.max_steps,
                      callbacks, flops, peak_flops(cfg.logger.peak_flops), cfg.train.stop_after,
                      stop_requests, cfg.train.hang_timeout_s, anomalies, cfg.logger.log_every,
                      variable_length=cfg.data.packing == "decompose")
    if dist.is_main:
        log.info("training %s: %s params, %d ranks, grad accumulation %d, from step %d",
                 cfg.name, f"{sum(p.numel() for p in model.parameters()):,}", dist.world_size,
                 grad_accum, state.step)
    try:
        state = trainer.fit()
    finally:
        batches.close()
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
