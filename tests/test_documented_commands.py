"""Every command line in README.md and docs/ that runs a `train/` or `data_pipeline/` entry
point (directly, or through `launch/torchrun.sh`, `launch/slurm.sbatch` or
`launch/synthesize.sbatch`) composes against the real config tree and passes the typed
schema: a documented command that stops composing fails here, not in a user's terminal."""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ipt.config import register, to_object

from .conftest import ROOT

register()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"(?:^|[\s/])((?:train|data_pipeline)/\w+\.py)(?=\s|$)")
# launch/synthesize.sbatch <model> <overrides>: the stage, with what the script adds
SYNTH_JOB = re.compile(r"(?:^|[\s/])launch/synthesize\.sbatch(?=\s|$)")


@dataclass
class Command:
    where: str  # file:line
    script: str
    args: list[str]

    def __str__(self) -> str:
        return f"{self.where}: {self.script} {' '.join(self.args)}"


def documented_commands() -> list[Command]:
    """Command lines inside ```bash blocks (the untagged ones hold diagrams), continuation
    lines joined; `...` (more arguments of the reader's choosing) and comments dropped."""
    found = []
    for doc in DOCS:
        fenced, shell, pending, start = False, False, "", 0
        for n, line in enumerate(doc.read_text().splitlines(), start=1):
            if line.lstrip().startswith("```"):
                fenced, pending = not fenced, ""
                shell = fenced and line.strip()[3:] in ("bash", "sh", "shell")
                continue
            if not shell:
                continue
            start = start if pending else n
            pending = f"{pending} {line.strip()}" if pending else line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            text, pending = pending, ""
            m = SCRIPT.search(text)
            if m:
                args = [a for a in shlex.split(text[m.end():], comments=True) if a != "..."]
                found.append(Command(f"{doc.relative_to(ROOT)}:{start}", m.group(1), args))
            elif m := SYNTH_JOB.search(text):
                model, *args = [a for a in shlex.split(text[m.end():], comments=True)
                                if a != "..."]
                found.append(Command(f"{doc.relative_to(ROOT)}:{start}",
                                     "data_pipeline/synthesize.py",
                                     ["synth=openai", "synth.url=http://127.0.0.1:8000/v1",
                                      "synth.model=synth", f"synth.tokenizer={model}",
                                      "worker_index=0", "num_workers=2", *args]))
    return found


def config_name(script: str) -> str | None:
    """The config an entry point composes, read off its source (None: the script parses its
    own arguments)."""
    name = re.search(r'config_name="(\w+)"', (ROOT / script).read_text())
    return name.group(1) if name else None


def sweep_points(args: list[str]) -> list[list[str]]:
    """The jobs of a `-m` sweep (one per point of the comma lists), or the one job."""
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if len(overrides) == len(args):
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    scripts = {c.script for c in COMMANDS}
    assert {"train/pretrain.py", "train/finetune.py", "train/export_hf.py", "train/sample.py",
            "train/evaluate.py", "data_pipeline/rc_tasks.py",
            "data_pipeline/prepare.py", "data_pipeline/synthesize.py",
            "data_pipeline/tokenizer.py", "data_pipeline/score.py"} <= scripts


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_composes(command: Command):
    name = config_name(command.script)
    if name is None:  # train/sample.py: key=value arguments of its own
        module = ast.parse((ROOT / command.script).read_text())
        keys = next(ast.literal_eval(n.value) for n in ast.walk(module)
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "KEYS")
        assert {a.split("=", 1)[0] for a in command.args} <= set(keys), command
        return
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        for job in sweep_points(command.args):
            cfg = compose(name, overrides=job)
            to_object(cfg, OmegaConf.get_type(cfg))  # the schema its defaults start from
