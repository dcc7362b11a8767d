"""Downstream evaluation with lm-evaluation-harness: a checkpoint of any ZeRO stage, or a
Hugging Face folder, on named harness tasks or local YAML tasks, offline.

    python train/evaluate.py checkpoint=runs/demo/checkpoints tasks=[rc_mc] \
        include_path=data/demo/eval_tasks out=runs/demo/eval

The model goes to the harness as a loaded `transformers` module (`HFLM(pretrained=model)`),
so nothing is written or downloaded; the harness batches the requests itself. `out` gets the
harness's results JSON (`results.json`) and a short table (`table.md`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ipt.config import ConfigError, EvaluateConfig

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
    model, _ = load_checkpoint(ckpt)
    tokenizer = tok.load(tokenizer_dir)
    if model.config.vocab_size != len(tokenizer):
        raise ConfigError(f"checkpoint {ckpt} has a vocabulary of {model.config.vocab_size}, "
                          f"its tokenizer {tokenizer_dir} {len(tokenizer)}: they do not match")
    return model.eval(), tokenizer, f"checkpoint {ckpt}"


def task_manager(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"include_path={include_path} is not a folder of task YAML files")
    return TaskManager(include_path=include_path) if include_path else TaskManager()


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


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the harness; writes `out/results.json` and `out/table.md`, returns the results."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ConfigError(f"lm-evaluation-harness is not installed ({e}); pip install "
                          "-e '.[eval]'") from e
    if not Path(cfg.checkpoint).exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint} does not exist")
    manager = task_manager(cfg.include_path)
    tasks = list(cfg.tasks)
    check_tasks(tasks, manager, cfg.include_path)
    model, tokenizer, what = load_model(cfg.checkpoint)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
    log.info("evaluating %s on %s (%d-shot, batch %d)", what, tasks, cfg.num_fewshot,
             cfg.batch_size)
    lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, device=device,
              batch_size=cfg.batch_size, max_length=cfg.max_length or None,
              add_bos_token=True)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot,
                              limit=cfg.limit, task_manager=manager, log_samples=False,
                              random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                              torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    if results is None:
        raise RuntimeError("lm-evaluation-harness returned no results")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results["results"], cfg.num_fewshot))
    return results


def table(results: dict[str, dict[str, Any]], shots: int) -> str:
    """Markdown: a row per task and metric, with its standard error."""
    rows = ["| task | shots | metric | value | stderr |", "|---|---|---|---|---|"]
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr") \
                    or not isinstance(value, int | float):
                continue
            name, filt = key.split(",", 1)
            err = metrics.get(f"{name}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, int | float) else "-"
            rows.append(f"| {task} | {shots} | {name} | {value:.4f} | {err_s} |")
    return "\n".join(rows) + "\n"
