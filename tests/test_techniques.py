"""The technique seam: which techniques a config turns on, that the run names none of them,
that every technique package says what it adds, and that two techniques claiming the one
data sampling are refused by name. (The layers themselves are checked by `make lint`.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ipt import pretrain, technique, techniques
from ipt.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    MixSourceConfig,
    PretrainConfig,
    SelectConfig,
    TeacherConfig,
)
from ipt.decompose.technique import Decomposition, Pieces
from ipt.mtp.technique import MultiToken
from ipt.slm.technique import SmallLM

from .conftest import ROOT

SRC = ROOT / "src" / "ipt"


def config(**groups) -> PretrainConfig:
    return PretrainConfig(tokenizer="unused", **groups)


def kinds(cfg: PretrainConfig) -> list[type]:
    return [type(t) for t in techniques.configured(cfg)]


def test_a_config_turns_on_exactly_its_techniques_in_registry_order():
    assert kinds(config()) == []
    assert kinds(config(loss=LossConfig(name="mtp", heads=3))) == [MultiToken]
    assert kinds(config(teacher=TeacherConfig(path="slm"))) == [SmallLM]
    assert kinds(config(data=DataConfig(select=SelectConfig(fraction=0.5, steps=4)))) \
        == [SmallLM]
    everything = config(loss=LossConfig(name="mtp", heads=2),
                        teacher=TeacherConfig(path="slm"),
                        data=DataConfig(packing="decompose"))
    assert kinds(everything) == [Decomposition, SmallLM, MultiToken]
    assert list(techniques.TECHNIQUES) == [t.name for t in techniques.TECHNIQUES.values()]
    assert techniques.state_prefixes() == ("mtp_heads.",)


def test_the_run_names_no_technique():
    """What issue 18 counted: lines of pretrain.py that mention a technique's config or
    modules. All of them now sit behind the hooks."""
    text = (SRC / "pretrain.py").read_text()
    named = [line for line in text.splitlines()
             if re.search(r"teacher|soft_label|mtp|select|decompos|heads|piece", line)]
    assert named == []
    imported = {node.module for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.ImportFrom) and node.module}
    technique_packages = ("ipt.slm", "ipt.mtp", "ipt.decompose", "ipt.synth")
    assert not {m for m in imported if m.startswith(technique_packages)}


@pytest.mark.parametrize("package", ["slm", "mtp", "decompose", "synth"])
def test_each_technique_package_says_what_it_adds_its_config_group_and_its_files(package):
    doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text())) or ""
    assert "What it adds" in doc and "Config group" in doc and "Files:" in doc, doc
    listed = set(re.findall(r"`(\w+\.py)`", doc))
    present = {p.name for p in (SRC / package).glob("*.py")} - {"__init__.py"}
    assert present <= listed, f"files the docstring does not name: {present - listed}"


def test_two_techniques_that_each_cut_the_data_are_refused_by_name():
    """A second technique bringing its own sampling next to Dataset Decomposition: the run
    refuses before reading any data (there is none here), naming both."""

    class OtherPieces(technique.Technique):
        name = "other_pieces"

        def sampling(self, setup):
            return Pieces(setup.cfg)

    cfg = config(data=DataConfig(packing="decompose", sources={
        "missing": MixSourceConfig(path="/nonexistent")}))
    setup = technique.Setup(cfg, None, "sdpa", None, "no tokenizer", 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="decompose, other_pieces each cut the data"):
        pretrain.open_data(setup, [*techniques.configured(cfg), OtherPieces()])


def test_every_hook_of_the_seam_defaults_to_no_change():
    base = technique.Technique()
    marker = object()
    assert base.sampling(marker) is None  # type: ignore[arg-type]
    assert base.data(marker, marker, marker) is marker  # type: ignore[arg-type]
    assert base.model(marker, marker) is None  # type: ignore[arg-type]
    assert base.model_config() == {}
    assert base.flops(marker, marker) is marker  # type: ignore[arg-type]
    assert base.loss(marker, 0, marker) is marker  # type: ignore[arg-type]
    assert base.export({}, None, Path("unused"), {}) is None
