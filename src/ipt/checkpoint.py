"""Checkpoints: DeepSpeed's sharded model and optimizer state plus ipt's trainer state.

Layout of `<run>/checkpoints/step_00000100/`:
  DeepSpeed's files (`mp_rank_*`, `zero_pp_rank_*`; one per rank under ZeRO)
  `rng_rank{r}.pt`       the RNG states of rank r
  `hf_config/`           the model's `transformers` config, for export without the run config
  `trainer_state.json`   step, consumed samples, fingerprints, resolved config, world size
  `manifest.json`        every file of the checkpoint with its size
  `COMPLETE`             written last, by rank 0, after every rank finished writing

A checkpoint counts only with `COMPLETE` and a manifest whose files are all there with the
right sizes, so a write cut short by a crash is never picked. `latest` (a one-line file) is
replaced atomically after that; `find_latest` does not trust it, it scans.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

PREFIX = "step_"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed, over all ranks
    tokens_seen: int = 0
    data_fingerprint: str = ""
    # the settings the sample order depends on beyond the data (the packing, and Dataset
    # Decomposition's), so that a resume with other ones is refused with the reason
    data_order: dict[str, Any] = field(default_factory=dict)
    tokenizer_fingerprint: str = ""
    world_size: int = 1
    model_config: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # the loss-anomaly detector's window and count in a row (`ipt.health`), and the
    # rollbacks this run has made
    health: dict[str, Any] = field(default_factory=dict)
    rollbacks: int = 0


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, root: Path, state: TrainerState, keep_last: int) -> Path:
    """Write a checkpoint collectively (every rank calls this) and publish it atomically."""
    rank = tdist.get_rank()
    tag = tag_for(state.step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted write of the same step
    tdist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    tdist.barrier()  # every rank's files are on disk past this point
    if rank == 0:
        engine.module.config.save_pretrained(path / "hf_config")
        _atomic_write(path / "trainer_state.json", json.dumps(state.__dict__, indent=1))
        files = {str(p.relative_to(path)): p.stat().st_size
                 for p in sorted(path.rglob("*")) if p.is_file()}
        _atomic_write(path / "manifest.json", json.dumps(files, indent=1))
        _atomic_write(path / MARKER, tag + "\n")
        _atomic_write(root / "latest", tag + "\n")
        _prune(root, keep_last)
    tdist.barrier()
    return path


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = [p for p in _candidates(root) if (p / MARKER).exists()]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  key=lambda p: p.name, reverse=True)


def problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint, or None when it is."""
    if not (path / MARKER).exists():
        return "no COMPLETE marker: its write was interrupted"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable metadata ({e})"
    for name, size in manifest.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def usable_checkpoints(root: Path) -> list[Path]:
    """Complete, intact checkpoints under `root`, newest first; warns about the others."""
    good = []
    for path in _candidates(root):
        why = problem(path)
        if why is None:
            good.append(path)
        else:
            log.warning("skipping checkpoint %s: %s", path, why)
    return good


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def check_compatible(saved: TrainerState, model_config: dict[str, Any], path: Path) -> None:
    """Refuse to resume into a different architecture, naming the fields that differ."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "mtp_heads",
            "mtp_head_type")
    # extra multi-token heads (loss.heads - 1) and their type; older runs had none
    default = {"mtp_heads": 0, "mtp_head_type": None}
    diff = [f"{k}: checkpoint {saved.model_config.get(k, default.get(k))} vs config "
            f"{model_config.get(k, default.get(k))}" for k in keys
            if saved.model_config.get(k, default.get(k)) != model_config.get(k, default.get(k))]
    if diff:
        raise CheckpointError(f"checkpoint {path} was made with another model config ("
                              + "; ".join(diff) + "); use a new run_dir or train.resume=never")


UNIVERSAL = "universal"


def to_universal(path: Path) -> Path:
    """DeepSpeed's world-size-independent form of a checkpoint, made once and kept inside it.

    ZeRO partitions optimizer state by rank; a run resumed on another number of ranks loads
    this form instead (DeepSpeed's `ds_to_universal`, run by one rank).
    """
    out = path / UNIVERSAL
    if (out / MARKER).exists():
        return out
    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(path), "--output_folder", str(tmp), "--num_extract_workers", "1",
           "--num_merge_workers", "1", "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"converting {path} for a new world size failed:\n"
                              f"{proc.stderr[-3000:]}")
    (tmp / MARKER).write_text("universal\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert_on_rank0(path: Path) -> None:
    """Rank 0 converts `path` to the universal form; every rank learns how that went, so a
    failure (a checkpoint without optimizer-state files, a full disk, the converter out of
    memory) is one clear error everywhere at once, not a barrier the others wait in until
    the collective timeout."""
    error = None
    if tdist.get_rank() == 0:
        try:
            to_universal(path)
        except Exception as e:  # noqa: BLE001 - whatever it was, every rank must hear of it
            error = f"{type(e).__name__}: {e}"
    outcome = [error]
    tdist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(f"{path} was saved on another number of ranks and could not be "
                              f"converted for {tdist.get_world_size()} (on rank 0: {outcome[0]})")


def load(engine: Any, path: Path) -> TrainerState:
    """Load model, optimizer, schedule and this rank's RNG from `path` (collective).

    A checkpoint saved on another number of ranks is converted to DeepSpeed's universal form
    first (once; the conversion is kept inside it) and loaded from that. The choice is made
    for each load, so a run that changed world size loads its own later checkpoints, and a
    rollback to one of them, the ordinary way.
    """
    state = read_state(path)
    universal = state.world_size != tdist.get_world_size()
    if universal:
        _convert_on_rank0(path)
    # DeepSpeed reads this setting at each load_checkpoint, not when the engine is built.
    engine._config.load_universal_checkpoint = universal
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    if universal:
        # ZeRO-3's universal load copies group 0's settings onto every group, which would put
        # weight decay on the no-decay group: the groups keep the settings they were built with.
        for group, kept in zip(groups, hyper, strict=True):
            group.update(kept)
        # It also gives every group's state one shared `step` tensor, which AdamW would then
        # advance once per group per step.
        for param_state in scheduler.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
    # The groups' lr is the restored schedule's (some load paths leave the step-0 value).
    for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    rng = path / f"rng_rank{tdist.get_rank()}.pt"
    if state.world_size == tdist.get_world_size() and rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return state
