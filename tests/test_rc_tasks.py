"""Reading-comprehension tasks from held-out documents: never trained on, answers that are
spans, distractors from the same document, a prompt format training never uses, and tasks
the harness runs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from ipt.config import ConfigError, EvaluateConfig, RCTasksConfig, SourceConfig, SynthesizeConfig
from ipt.data import pairs as fmt
from ipt.data import sources as src
from ipt.data import templates
from ipt.data.prepare import is_valid_doc
from ipt.synth import rules
from ipt.synth.rc_tasks import FORMATS, TASK_NAMES, TEXT_TASK, build
from ipt.synth.stage import synthesize

HELD_OUT = 0.3  # a large share, so the small test corpus gives enough examples


def source(data_dir: Path) -> SourceConfig:
    return SourceConfig(name="docstrings", path=str(data_dir / "raw" / "docstrings.jsonl"),
                        id_field="id")


@pytest.fixture(scope="module")
def tasks(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rc")
    return out, build(RCTasksConfig(source=source(data_dir), out=str(out),
                                    valid_fraction=HELD_OUT))


def rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def test_every_document_is_accounted_for_and_only_held_out_ones_are_used(data_dir, tasks):
    out, summary = tasks
    n_docs = len((data_dir / "raw" / "docstrings.jsonl").read_text().splitlines())
    assert summary["docs"] == sum(summary["fate"].values()) == n_docs
    held_out = sum(v for k, v in summary["fate"].items() if k != "trained_on")
    assert 0.2 * n_docs < held_out < 0.4 * n_docs
    mc, boolq = rows(out, "mc"), rows(out, "boolq")
    assert len(mc) >= 30 and len(boolq) >= 20
    assert all(is_valid_doc(r["doc_id"], HELD_OUT) for r in mc + boolq)
    assert summary["tasks"]["heldout_mc_sciq"] == {"examples": len(mc), "kind": "mc",
                                                    "format": "sciq", "chance": 0.25}
    assert 0.3 < summary["yes_share"] < 0.7


def test_answers_are_spans_and_distractors_come_from_the_same_document(tasks):
    out, _ = tasks
    for r in rows(out, "mc"):
        context = " ".join(r["context"].split())
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["choices"][r["label"]] == r["answer"]
        for choice in r["choices"]:
            assert choice in context  # copying a span of the context is not enough
        for wrong in r["choices"][:r["label"]] + r["choices"][r["label"] + 1:]:
            assert wrong not in r["question"] and r["answer"] not in wrong
    for r in rows(out, "boolq"):
        sentence = r["question"].split('"')[1]
        assert sentence in r["context"] and r["label"] in (0, 1)


def test_the_unseen_prompt_format_appears_in_no_training_template():
    training = "".join(inspect.getsource(m) for m in (templates, rules, fmt))
    unseen = FORMATS["unseen"]
    cues = [unseen.split("{{")[0], unseen.split("}}")[1].split("{{")[0].strip(),
            unseen.split("}}")[-1].strip()]
    assert cues == ["Passage: ", "Query about the passage:", "Reply:"]
    for cue in cues:
        assert cue.strip() not in training


def test_held_out_documents_are_never_synthesized(data_dir, tmp_path):
    cfg = SynthesizeConfig(source=source(data_dir), out=str(tmp_path / "synth"),
                           valid_fraction=HELD_OUT, progress_bar="never")
    summary = synthesize(cfg)
    records = [json.loads(line) for f in (tmp_path / "synth" / "shards").glob("*.jsonl")
               for line in f.read_text().splitlines()]
    held = {r["id"] for r in records if is_valid_doc(r["id"], HELD_OUT)}
    assert held and summary["held_out"] == len(held)
    assert all(r["status"] == "held_out" and not r["pairs"] for r in records if r["id"] in held)
    assert not any(r.get("prev") in held for r in records)  # nor chained before another
    assert summary["ok"] > 0


@pytest.fixture(scope="module")
def repeats(data_dir, tmp_path_factory) -> tuple[SourceConfig, Path, Path]:
    """Every document twice under its id (a page crawled twice), synthesized and asked about."""
    out = tmp_path_factory.mktemp("repeats")
    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:150]
    (out / "in.jsonl").write_text("\n".join(lines + lines) + "\n")
    spec = SourceConfig(name="docstrings", path=str(out / "in.jsonl"), id_field="id")
    synthesize(SynthesizeConfig(source=spec, out=str(out / "synth"), valid_fraction=HELD_OUT,
                                progress_bar="never"))
    build(RCTasksConfig(source=spec, out=str(out / "rc"), valid_fraction=HELD_OUT))
    return spec, out / "synth", out / "rc"


def synthesized(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_every_stage_holds_out_the_copies_of_a_repeated_id_together(repeats):
    spec, synth_out, rc_out = repeats
    held = [r for r in synthesized(synth_out) if r["status"] == "held_out"]
    assert held and all(is_valid_doc(r.get("input_id", r["id"]), HELD_OUT) for r in held)
    assert {r.get("input_id") for r in held} - {None}  # copies are among them
    # the tasks' documents are those very ones, named as the synthesize stage names them
    assert [r["id"] for r in rows(rc_out, "text")] == [r["id"] for r in held]


def test_no_held_out_task_is_about_a_text_trained_on_when_ids_repeat(repeats):
    spec, synth_out, rc_out = repeats
    # trained on: what the synthesize stage did not hold out, and what the prepare stage
    # keeps for training from the source itself
    trained = {r["text"] for r in synthesized(synth_out) if r["status"] != "held_out"}
    trained |= {d.text for d in src.read(spec)
                if isinstance(d, src.Doc) and not is_valid_doc(d.id, HELD_OUT)}
    asked = {r["text"] for r in rows(rc_out, "text")}
    assert asked and not asked & trained


def test_the_prepared_synthesize_output_trains_on_no_held_out_text_when_ids_repeat(repeats):
    _, synth_out, rc_out = repeats
    prepared = src.read(SourceConfig(name="docstrings_ipt", path=str(synth_out)))
    # what the prepare stage trains on: the documents it does not hold out (`write_group`)
    trained = [d.text for d in prepared if not is_valid_doc(d.id, HELD_OUT)]
    asked = [r["text"] for r in rows(rc_out, "text")]
    assert asked and not [t for t in asked if any(t in text for text in trained)]


def test_a_source_without_usable_held_out_documents_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="no held-out document"):
        build(RCTasksConfig(source=source(data_dir), out=str(tmp_path), valid_fraction=0.3,
                            max_chars=10))
    with pytest.raises(ConfigError, match="valid_fraction=0"):
        build(RCTasksConfig(source=source(data_dir), out=str(tmp_path), valid_fraction=0))


@pytest.mark.slow
def test_the_harness_runs_every_task(tiny_lm, tasks, tmp_path):
    pytest.importorskip("lm_eval")
    from ipt.evaluate import evaluate

    out, summary = tasks
    results = evaluate(EvaluateConfig(checkpoint=str(tiny_lm), tasks=[*TASK_NAMES, TEXT_TASK],
                                      include_path=str(out), out=str(tmp_path), limit=3,
                                      batch_size=8))["results"]
    assert sorted(results) == sorted([*TASK_NAMES, TEXT_TASK])
    for name in TASK_NAMES:
        metric = "exact_match,strip" if "_em_" in name else "acc,none"
        assert 0 <= results[name][metric] <= 1, results[name]
    # a random model over 512 tokens: about 9 bits per token, 2 to 3 bytes per token
    assert 1 < results[TEXT_TASK]["bits_per_byte,none"] < 10
    assert summary["tasks"][TEXT_TASK]["examples"] == sum(  # every held-out document
        v for k, v in summary["fate"].items() if k.startswith("held_out") or k == "used")
