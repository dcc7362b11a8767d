"""Downstream evaluation with lm-evaluation-harness, offline, on named harness tasks or
local YAML tasks (such as those `data_pipeline/rc_tasks.py` writes):

- `evaluate`: a checkpoint of any ZeRO stage, an ipt run or a Hugging Face folder
  (`train/evaluate.py`), with the harness's results JSON and a short table written to `out`:

      python train/evaluate.py checkpoint=runs/demo tasks=[heldout_mc_sciq] \
          include_path=data/demo/rc_tasks out=runs/demo/eval

- `DownstreamEval`: the live weights during training (the `eval` config group).

The model goes to the harness loaded (`HFLM(pretrained=model)`), so nothing is written or
downloaded, and the harness batches the requests itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ipt import quiet
from ipt.config import ConfigError, EvalConfig, EvaluateConfig
from ipt.health import Solo

log = logging.getLogger(__name__)


def load_model(path: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, what was loaded) from an HF folder, an ipt run folder (its export
    `hf/`, else its latest checkpoint), a checkpoint, or a `checkpoints/` folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipt.data import tokenizer as tok
    from ipt.export import load_checkpoint, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint={path} does not exist")
    if (p / "hf" / "config.json").exists() and not (p / "config.json").exists():
        p = p / "hf"
    if (p / "config.json").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise ConfigError(f"checkpoint={path} has no usable tokenizer ({e})") from e
        hf: Any = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        if len(tokenizer) > hf.config.vocab_size:
            raise ConfigError(f"checkpoint={path}: its tokenizer has {len(tokenizer)} tokens, "
                              f"the model only {hf.config.vocab_size}: they do not match")
        return hf.eval(), tokenizer, f"Hugging Face folder {p}"
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    try:
        ckpt = resolve_checkpoint(root)
    except Exception as e:  # noqa: BLE001 - any checkpoint problem is the user's input
        raise ConfigError(f"checkpoint={path} holds no usable checkpoint or Hugging Face "
                          f"model ({e})") from e
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tokenizer_dir = state.get("config", {}).get("tokenizer")
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        raise ConfigError(f"checkpoint {ckpt} names tokenizer {tokenizer_dir!r}, which is not "
                          "there; export it with train/export_hf.py and evaluate the export")
    trained_with, now = state.get("tokenizer_fingerprint"), tok.fingerprint(tokenizer_dir)
    if trained_with and trained_with != now:
        raise ConfigError(f"checkpoint {ckpt} was trained with tokenizer {trained_with}, but "
                          f"{tokenizer_dir} is now {now}: it changed since; evaluate an export, "
                          "which keeps its own tokenizer")
    model, _ = load_checkpoint(ckpt)
    tokenizer = tok.load(tokenizer_dir)
    if model.config.vocab_size != len(tokenizer):
        raise ConfigError(f"checkpoint {ckpt} has a vocabulary of {model.config.vocab_size}, "
                          f"its tokenizer {tokenizer_dir} {len(tokenizer)}: they do not match")
    return model.eval(), tokenizer, f"checkpoint {ckpt}"


def task_manager(include_path: str | None, tasks: list[str] | None = None) -> Any:
    """The harness's task index: local tasks from `include_path`, and its own tasks unless
    every one of `tasks` is local (indexing the harness's thousands of tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"include_path={include_path} is not a folder of task YAML files")
    local = set(local_tasks(include_path)) if include_path else set()
    defaults = not include_path or tasks is None or not set(tasks) <= local
    return TaskManager(include_path=include_path, include_defaults=defaults)


def check_tasks(tasks: list[str], manager: Any, include_path: str | None) -> None:
    if not tasks:
        raise ConfigError("tasks=[] names no task: give harness task names or local ones "
                          "(tasks=[name,...] with include_path=<folder>)")
    unknown = [t for t in tasks if t not in manager.all_subtasks and t not in manager.all_groups]
    if unknown:
        local = sorted(local_tasks(include_path)) if include_path else []
        raise ConfigError(f"unknown task(s) {unknown}; local tasks in include_path: "
                          f"{local or 'none'} (harness tasks: lm-eval ls tasks)")


def local_tasks(include_path: str) -> list[str]:
    """The task names the YAML files of a folder declare."""
    import yaml

    names = []
    for f in sorted(Path(include_path).rglob("*.yaml")):
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.append(doc["task"])
    return names


def require_harness() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"lm-evaluation-harness is not installed ({e}); pip install "
                          "-e '.[eval]'") from e


def harness(model: Any, tokenizer: Any, tasks: list[str], manager: Any,
            cfg: EvaluateConfig | EvalConfig, device: str | torch.device) -> dict[str, Any]:
    """`simple_evaluate` on a loaded model: the harness batches the requests itself
    (`cfg.batch_size`), and a BOS token goes before every context, as in training."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # The harness's progress lines and one warning per truncated request, counted instead;
    # its progress bars show on a terminal only.
    harness_log = logging.getLogger("lm_eval")
    level, truncated = harness_log.level, _Truncations()
    harness_log.setLevel(logging.WARNING)
    noisy = [logging.getLogger(f"lm_eval.{n}") for n in ("models.huggingface", "evaluator")]
    for logger in noisy:
        logger.addFilter(truncated)
    bars = contextlib.nullcontext() if sys.stderr.isatty() else \
        quiet.prints_to_log(log, stderr=True)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device),
                  batch_size=cfg.batch_size, max_length=cfg.max_length or None,
                  add_bos_token=True)
        with bars:
            results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=manager, log_samples=False,
                                      random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    finally:
        harness_log.setLevel(level)
        for logger in noisy:
            logger.removeFilter(truncated)
    if truncated.count:
        log.warning("%d requests were longer than the model's context (%d tokens) and lost "
                    "tokens from the left", truncated.count, lm.max_length)
    if results is None:
        raise RuntimeError("lm-evaluation-harness returned no results")
    return results


class _Truncations(logging.Filter):
    """Counts the harness's per-request truncation warnings, and drops those it gives for
    what ipt does on purpose: a model passed in loaded, a few-shot count set by the call."""

    EXPECTED = ("`pretrained` model kwarg is not of type", "Passed an already-initialized",
                "Overwriting default num_fewshot")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exceeds model's maximum length" in message:
            self.count += 1
            return False
        return not message.startswith(self.EXPECTED)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the harness; writes `out/results.json` and `out/table.md`, returns the results."""
    require_harness()
    if not Path(cfg.checkpoint).exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint} does not exist")
    manager = task_manager(cfg.include_path, list(cfg.tasks))
    tasks = list(cfg.tasks)
    check_tasks(tasks, manager, cfg.include_path)
    model, tokenizer, what = load_model(cfg.checkpoint)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
    log.info("evaluating %s on %s (%d-shot, batch %d)", what, tasks, cfg.num_fewshot,
             cfg.batch_size)
    results = harness(model.to(device), tokenizer, tasks, manager, cfg, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results["results"], cfg.num_fewshot,
                                        chance_levels(cfg.include_path)))
    return results


def chance_levels(include_path: str | None) -> dict[str, float]:
    """Each local task's chance score, where the folder's `summary.json` (written by
    `data_pipeline/rc_tasks.py`) gives it."""
    summary = Path(include_path) / "summary.json" if include_path else None
    if summary is None or not summary.exists():
        return {}
    tasks = json.loads(summary.read_text()).get("tasks", {})
    return {name: t["chance"] for name, t in tasks.items() if "chance" in t}


def table(results: dict[str, dict[str, Any]], shots: int,
          chance: dict[str, float] | None = None) -> str:
    """Markdown: a row per task and metric, with its standard error (and the task's chance
    score, where known)."""
    chance = chance or {}
    rows = ["| task | shots | metric | value | stderr | chance |", "|---|---|---|---|---|---|"]
    for task, metrics in sorted(results.items()):
        for name, filt, value in scores(metrics):
            err = metrics.get(f"{name}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, int | float) else "-"
            level = f"{chance[task]:.2f}" if task in chance else "-"
            rows.append(f"| {task} | {shots} | {name} | {value:.4f} | {err_s} | {level} |")
    return "\n".join(rows) + "\n"


def scores(metrics: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    """(metric, filter, value) for each score of one task's harness results (`acc,none`),
    standard errors and bookkeeping entries left out."""
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if filt and not name.endswith("_stderr") and isinstance(value, int | float):
            yield name, filt, float(value)


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`downstream/<task>/<metric>` for each task's scores: what a run logs to
    metrics.jsonl, wandb and TensorBoard."""
    return {f"downstream/{task}/{name}": value for task, metrics in sorted(results.items())
            for name, _, value in scores(metrics)}


def plain_copy(lm: Any, device: torch.device) -> Any:
    """The causal LM's weights in a new model of the same class, with transformers' own
    attention (SDPA, or eager where the family has none): the harness pads its batches, which ipt's document kernels ignore, and
    the training model's hooks, compiled layers and ZeRO-3 partitions stay out of it. The
    weights must be whole (under ZeRO-3: inside `GatheredParameters`)."""
    config = copy.deepcopy(lm.config)
    # transformers' SDPA where the family allows it; eager for one whose layers ask for what
    # SDPA cannot compute (Gemma 2's soft-cap, GPT-OSS's sinks)
    config._attn_implementation = "sdpa" if type(lm)._supports_sdpa else "eager"  # noqa: SLF001
    dtype = next(lm.parameters()).dtype
    with torch.device(device):
        twin = type(lm)._from_config(config, dtype=dtype)  # noqa: SLF001 - public in effect
    source = dict(lm.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in twin.named_parameters(remove_duplicate=False):
            p.copy_(source[name].detach())
    return twin.eval().requires_grad_(False)


@contextlib.contextmanager
def _random_states() -> Iterator[None]:
    """The harness seeds Python's, NumPy's and torch's generators: put them back after, so
    that rank 0 draws what the other ranks draw."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class DownstreamEval:
    """Downstream tasks on the live weights during training (`eval` config group): every
    `every` steps and at the last step, rank 0 evaluates a copy of the model with
    lm-evaluation-harness and adds `downstream/<task>/<metric>` to the step's metrics.

    Under ZeRO-3 every rank joins the gather of the weights for the copy. The other ranks
    then wait for rank 0 (`ipt.health.Solo`): rank 0's watchdog hears from each forward of
    the harness, and the waiting ranks' from rank 0's, so an evaluation that hangs for real
    still ends the job within `train.hang_timeout_s`. While rank 0 evaluates on the CPU it
    borrows the idle ranks' threads.
    """

    def __init__(self, cfg: EvalConfig, tokenizer: Any, max_steps: int, zero3: bool) -> None:
        require_harness()
        self.cfg, self.tokenizer, self.max_steps, self.zero3 = cfg, tokenizer, max_steps, zero3
        tasks = list(cfg.tasks)
        self.manager = task_manager(cfg.include_path, tasks)
        check_tasks(tasks, self.manager, cfg.include_path)  # before training, on every rank
        self.solo = Solo("downstream evaluation")
        self.seconds, self.runs, self.started = 0.0, 0, time.perf_counter()

    def on_start(self, trainer: Any) -> None:
        self.started = time.perf_counter()
        self.solo.start(trainer.dist.world_size, trainer.watchdog)

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if step == self.max_steps or (self.cfg.every > 0 and step % self.cfg.every == 0):
            metrics.update(self.run(trainer))

    def on_end(self, trainer: Any) -> None:
        if trainer.dist.is_main and self.runs:
            wall = time.perf_counter() - self.started
            log.info("downstream evaluation: %d runs, %.1f s, %.1f%% of the run's %.0f s",
                     self.runs, self.seconds, 100 * self.seconds / wall, wall)

    def run(self, trainer: Any) -> dict[str, float]:
        start = time.perf_counter()
        lm = trainer.engine.module.lm
        twin = None
        with _gathered(lm, self.zero3):
            if trainer.dist.is_main:
                with _random_states():  # building it must not draw on any generator
                    twin = plain_copy(lm, trainer.dist.device)
        if twin is None:
            self.solo.wait(trainer.watchdog)
            return {}
        step = trainer.state.step
        beat = twin.register_forward_pre_hook(lambda *_: trainer.watchdog.beat(step))
        threads = torch.get_num_threads()
        if trainer.dist.device.type == "cpu":  # the node's threads: the other ranks wait
            torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        try:
            with self.solo.work(trainer.watchdog), _random_states(), \
                    quiet.prints_to_log(log, stderr=True):
                results = harness(twin, self.tokenizer, list(self.cfg.tasks), self.manager,
                                  self.cfg, trainer.dist.device)["results"]
        except Exception as e:  # noqa: BLE001 - a failed evaluation must not end the run
            log.exception("downstream evaluation at step %d failed (%s); training goes on",
                          step, type(e).__name__)
            results = {}
        finally:
            torch.set_num_threads(threads)
            beat.remove()
            del twin
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.runs += 1
        wall = time.perf_counter() - self.started
        return {**flat_metrics(results), "downstream/seconds": seconds,
                "downstream/share": self.seconds / wall}


@contextlib.contextmanager
def _gathered(module: torch.nn.Module, zero3: bool) -> Iterator[None]:
    """The whole weights on every rank for the block (ZeRO-3's gather; elsewhere they are)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
