"""The synthetic world of `data_pipeline/world.py`: deterministic, every fact stated and asked
as it is, no test-half question trained on, and tasks that score right answers 1 and wrong
ones 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ipt.config import PrepareConfig, SourceConfig, WorldConfig
from ipt.data.prepare import prepare
from ipt.data.shards import ShardSet
from ipt.data.tokenizer import load
from ipt.synth import world

from .conftest import run_entry


def build(out: Path, **options) -> dict:
    return world.build(WorldConfig(out=str(out), **{"people": 60, **options}))


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix != ".yaml"}  # the tasks name their own folder


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_world_is_a_function_of_its_seed(tmp_path):
    build(tmp_path / "a", paraphrases=2, permute=True)
    build(tmp_path / "b", paraphrases=2, permute=True)
    build(tmp_path / "c", paraphrases=2, permute=True, seed=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a")["biographies.jsonl"] != files(tmp_path / "c")["biographies.jsonl"]


@pytest.mark.parametrize("options", [{}, {"paraphrases": 3, "permute": True},
                                     {"fullname": True}])
def test_every_biography_states_every_attribute_and_every_answer_is_one(tmp_path, options):
    summary = build(tmp_path, **options)
    people = world.people(WorldConfig(out="", people=60))
    assert len({p.name for p in people}) == 60  # unique names
    bios = jsonl(tmp_path / "biographies.jsonl")
    assert len(bios) == summary["biographies"] == 60 * options.get("paraphrases", 1)
    by_id = {p.id: p for p in people}
    for b in bios:
        person = by_id[b["person"]]
        assert all(v in b["text"] for v in person.attributes.values())
        assert b["text"].startswith(person.name) or person.name in b["text"].split(".")[0]
        sentences = b["text"].rstrip(".").split(". ")
        assert len(sentences) == 6
        named = [person.name in s for s in sentences]
        assert all(named) if options.get("fullname") else named.count(True) == 1
    questions = jsonl(tmp_path / "tasks" / "world_train.jsonl") + \
        jsonl(tmp_path / "tasks" / "world_test.jsonl")
    assert len(questions) == 6 * 60
    assert all(q["answer"] == by_id[q["person"]].attributes[q["attribute"]] for q in questions)
    assert summary["train"]["people"] + summary["test"]["people"] == 60
    assert {p.split for p in people} == {"train", "test"}


def test_paraphrases_draw_their_templates_anew(tmp_path):
    build(tmp_path, paraphrases=4)
    bios = jsonl(tmp_path / "biographies.jsonl")
    for i in range(0, len(bios), 4):
        assert len({b["text"] for b in bios[i:i + 4]}) > 1
    assert all(len(world.templates(a)) >= 30 for a in world.ATTRIBUTES)


def test_no_test_half_question_reaches_a_training_shard(data_dir, tmp_path):
    """Through the prepare stage: every train-half question is in the training tokens, and
    no test-half question is."""
    summary = build(tmp_path / "world")
    prepare(PrepareConfig(
        sources={"bios": SourceConfig(path=str(tmp_path / "world" / "biographies.jsonl"),
                                      id_field="id"),
                 "qa": SourceConfig(path=str(tmp_path / "world" / "qa"), format="synth"),
                 "tuning": SourceConfig(path=str(tmp_path / "world" / "tuning"),
                                        format="synth_tuning")},
        tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "shards"),
        valid_fraction=0.0, workers=1, progress_bar="never"))
    tok = load(str(data_dir / "tokenizer"))
    text = ""
    for name in ("bios", "qa", "tuning"):
        for shard in ShardSet(tmp_path / "shards" / name / "train").shards:
            text += tok.decode(np.asarray(shard.tokens).tolist())
    train = jsonl(tmp_path / "world" / "tasks" / "world_train.jsonl")
    test = jsonl(tmp_path / "world" / "tasks" / "world_test.jsonl")
    assert len(train) == summary["qa_training_pairs"]
    assert all(q["question"] in text for q in train)
    assert not any(q["question"] in text for q in test)


def test_the_synthesizer_is_tuned_on_every_train_half_biography_with_all_its_questions(
        tmp_path):
    summary = build(tmp_path, paraphrases=2)
    people = {p.id: p for p in world.people(WorldConfig(out="", people=60))}
    rows = jsonl(tmp_path / "tuning" / "shards" / "shard_00000.jsonl")
    bios = {b["id"]: b for b in jsonl(tmp_path / "biographies.jsonl")}
    assert len(rows) == summary["tuning_biographies"] == 2 * summary["train"]["people"]
    for r in rows:
        person = people[bios[r["id"]]["person"]]
        assert person.split == "train" and r["text"] == bios[r["id"]]["text"]
        assert [(p["instruction"], p["response"]) for p in r["pairs"]] == \
            [(q, a) for _, q, a in world.questions(person)]


def test_a_synthesizer_can_be_tuned_on_people_outside_the_world(tmp_path):
    summary = build(tmp_path / "inside")
    build(tmp_path / "outside", paraphrases=2, tuning_people=30)
    assert jsonl(tmp_path / "inside" / "biographies.jsonl") == \
        jsonl(tmp_path / "outside" / "biographies.jsonl")[::2]  # the same 60 people
    cfg = WorldConfig(out="", people=60, paraphrases=2)
    everyone = world.people(cfg, 90)
    assert everyone[:60] == world.people(cfg)
    rows = jsonl(tmp_path / "outside" / "tuning" / "shards" / "shard_00000.jsonl")
    assert len(rows) == 2 * 30 and summary["tuning_biographies"] == summary["train"]["people"]
    names = {p.name for p in everyone[:60]}
    for r, (p, k) in zip(rows, [(p, k) for p in everyone[60:] for k in range(2)], strict=True):
        assert r["id"] == f"{p.id}/{k}" and r["text"] == world.biography(p, k, cfg)
        assert p.name not in names and p.name in r["text"]
        assert [(x["instruction"], x["response"]) for x in r["pairs"]] == \
            [(q, a) for _, q, a in world.questions(p)]


def test_a_synthesis_is_scored_against_the_world_per_half(tmp_path):
    """The oracle's own tuning data scores 1; answers swapped between people score 0; a
    biography with nothing parsed lowers the parse rate only."""
    build(tmp_path / "world", paraphrases=2)
    rows = jsonl(tmp_path / "world" / "tuning" / "shards" / "shard_00000.jsonl")
    test = [p for p in world.people(WorldConfig(out="", people=60)) if p.split == "test"]
    wrong = [{"id": f"{p.id}/0", "status": "ok", "text": "", "pairs": [
        {"instruction": q, "response": other.attributes["major"]}
        for _, q, _ in world.questions(p)[3:4]]}
        for p, other in zip(test, test[1:], strict=False)
        if p.attributes["major"] != other.attributes["major"]]
    empty = {"id": f"{test[0].id}/1", "status": "no_pairs", "text": "", "pairs": []}
    shards = tmp_path / "synth" / "shards"
    shards.mkdir(parents=True)
    (shards / "shard_00000.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*rows, *wrong, empty]))
    scores = world.score_synthesis(tmp_path / "world", tmp_path / "synth")
    assert scores["train"] == {"biographies": len(rows), "parsed": len(rows),
                               "pairs": 6 * len(rows), "faithful": 6 * len(rows),
                               "parse_rate": 1.0, "faithfulness": 1.0}
    assert scores["test"] == {"biographies": len(wrong) + 1, "parsed": len(wrong),
                              "pairs": len(wrong), "faithful": 0,
                              "parse_rate": round(len(wrong) / (len(wrong) + 1), 4),
                              "faithfulness": 0.0}
    (shards / "shard_00001.jsonl").write_text(json.dumps({**empty, "id": "q000001/0"}) + "\n")
    with pytest.raises(ValueError, match="'q000001/0' is not a biography of the world"):
        world.score_synthesis(tmp_path / "world", tmp_path / "synth")


def test_the_tasks_score_right_answers_one_and_wrong_ones_zero(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    build(tmp_path)
    task = get_task_dict(["world_test"], TaskManager(include_path=str(tmp_path / "tasks"),
                                                     include_defaults=False))["world_test"]
    docs = list(task.test_docs())
    assert docs
    right = [task.process_results(d, [d["answer"]])["exact_match"] for d in docs]
    wrong = [task.process_results(d, [d["answer"] + " 7"])["exact_match"] for d in docs]
    assert right == [1.0] * len(docs) and wrong == [0.0] * len(docs)


def test_the_example_is_a_test_half_question_with_its_answer(tmp_path):
    build(tmp_path)
    test = {q["question"]: q["answer"] for q in jsonl(tmp_path / "tasks" / "world_test.jsonl")}
    prompt = (tmp_path / "example" / "prompt.txt").read_text()
    question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
    assert prompt == world.PROMPT.format(question=question)
    assert test[question] == (tmp_path / "example" / "answer.txt").read_text().strip()


def test_the_stage_runs_from_its_command_line(tmp_path):
    proc = run_entry("data_pipeline/world.py", [f"out={tmp_path}", "people=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["people"] == 10


@pytest.mark.slow
def test_the_whole_path_from_world_to_scores(data_dir, tmp_path):
    """world -> prepare -> pretrain (biographies and the train half's questions) -> export ->
    the harness on both halves."""
    pytest.importorskip("lm_eval")
    from .conftest import run_pretrain, tiny_overrides

    build(tmp_path / "world", people=40)
    prepare(PrepareConfig(
        sources={"bios": SourceConfig(path=str(tmp_path / "world" / "biographies.jsonl"),
                                      id_field="id"),
                 "qa": SourceConfig(path=str(tmp_path / "world" / "qa"), format="synth")},
        tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "shards"),
        valid_fraction=0.0, workers=1, progress_bar="never"))
    run = tmp_path / "run"
    run_pretrain([*tiny_overrides(tmp_path / "shards", run, **{
        "train.max_steps": 20, "train.eval_every": 0, "train.export_at_end": True,
        "data.max_repeat": 1000}), f"tokenizer={data_dir / 'tokenizer'}", "data=custom",
        f"+data.sources.bios.path={tmp_path / 'shards' / 'bios'}",
        f"+data.sources.qa.path={tmp_path / 'shards' / 'qa'}"])
    proc = run_entry("train/evaluate.py", [
        f"checkpoint={run / 'hf'}", "tasks=[world_train,world_test]",
        f"include_path={tmp_path / 'world' / 'tasks'}", f"out={tmp_path / 'eval'}",
        "batch_size=16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    for half in ("train", "test"):
        assert results[f"world_{half}"]["sample_len"] == 6 * \
            json.loads((tmp_path / "world" / "summary.json").read_text())[half]["people"]
        assert 0 <= results[f"world_{half}"]["exact_match,strip"] <= 1
