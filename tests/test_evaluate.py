"""Downstream evaluation with lm-evaluation-harness: local tasks, offline, from a Hugging Face
folder or a checkpoint, with clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, run_pretrain, tiny_overrides

pytest.importorskip("lm_eval")

DOCS = [("The cat sat on the mat by the door.", "Where did the cat sit", "on the mat",
         ["on the mat", "in the tree", "by the river"]),
        ("Rain fell all night over the old town.", "When did the rain fall", "all night",
         ["all night", "at noon", "in spring"])]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice and an extractive exact-match task over the same local jsonl."""
    out = tmp_path_factory.mktemp("tasks")
    rows = [{"context": c, "question": q, "answer": a, "choices": ch, "label": ch.index(a)}
            for c, q, a, ch in DOCS] * 3
    data = out / "rc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files: {data}\ntest_split: train\n"
              'doc_to_text: "{{context}}\\nQuestion: {{question}}?\\nAnswer:"\n')
    (out / "rc_mc.yaml").write_text(
        "task: rc_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (out / "rc_em.yaml").write_text(
        "task: rc_em\n" + common + "output_type: generate_until\n"
        'doc_to_target: " {{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n")
    return out


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train" / "evaluate.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_hugging_face_folder_is_evaluated_on_local_tasks(tiny_lm, tasks, tmp_path):
    proc = evaluate(f"checkpoint={tiny_lm}", "tasks=[rc_mc,rc_em]", f"include_path={tasks}",
                    f"out={tmp_path}", "batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["rc_mc"]["sample_len"] == 6
    assert 0 <= results["rc_mc"]["acc,none"] <= 1
    assert 0 <= results["rc_em"]["exact_match,none"] <= 1
    table = (tmp_path / "table.md").read_text()
    assert "| rc_mc | 0 | acc |" in table and "| rc_em | 0 | exact_match |" in table
    assert "| rc_mc | 0 | acc |" in proc.stdout


def test_a_checkpoint_is_evaluated_as_its_trained_weights(data_dir, tasks, tmp_path):
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 2, "train.eval_every": 0}))
    proc = evaluate(f"checkpoint={run / 'checkpoints'}", "tasks=[rc_mc]", "num_fewshot=1",
                    f"include_path={tasks}", f"out={tmp_path / 'eval'}", "limit=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["results"]["rc_mc"]["sample_len"] == 2
    assert results["n-shot"]["rc_mc"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["tasks=[nope]"], "unknown task(s) ['nope']; local tasks in include_path: ['rc_em', 'rc_mc']"),
    (["tasks=[]"], "names no task"),
])
def test_bad_tasks_get_one_clear_line_and_exit_2(tiny_lm, tasks, tmp_path, args, message):
    proc = evaluate(f"checkpoint={tiny_lm}", f"include_path={tasks}", f"out={tmp_path}", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_folder_without_a_model_is_refused(tasks, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = evaluate(f"checkpoint={tmp_path / 'empty'}", "tasks=[rc_mc]",
                    f"include_path={tasks}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "holds no usable checkpoint or Hugging Face model" in proc.stderr
