"""Downstream evaluation with lm-evaluation-harness: local tasks, offline, from a Hugging Face
folder or a checkpoint, with clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import run_entry, run_pretrain, tiny_overrides

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
    return run_entry("train/evaluate.py", list(args))


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


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A 2-step run with its checkpoint."""
    run = tmp_path_factory.mktemp("run")
    run_pretrain(tiny_overrides(data_dir, run, **{"train.max_steps": 2, "train.eval_every": 0}))
    return run


def test_a_checkpoint_is_evaluated_as_its_trained_weights(run, tasks, tmp_path):
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


def test_a_checkpoint_whose_tokenizer_changed_is_refused(data_dir, run, tasks, tmp_path):
    from ipt.data import tokenizer as tok

    other = tmp_path / "other_tokenizer"
    texts = [json.loads(line)["text"] for line in
             (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:200]]
    tok.train_sentencepiece(texts, other, 400)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(next((run / "checkpoints").glob("step_*")), ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["tokenizer"] = str(other)  # as if its tokenizer had been retrained
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = evaluate(f"checkpoint={ckpt}", "tasks=[rc_mc]", f"include_path={tasks}",
                    f"out={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert f"{other} is now {tok.fingerprint(other)}: it changed since" in proc.stderr


def test_a_folder_without_a_model_is_refused(tasks, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = evaluate(f"checkpoint={tmp_path / 'empty'}", "tasks=[rc_mc]",
                    f"include_path={tasks}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "holds no usable checkpoint or Hugging Face model" in proc.stderr


# Evaluation during training -------------------------------------------------------------

def rc_tasks(data_dir, out, valid_fraction: float):
    from ipt.config import RCTasksConfig, SourceConfig
    from ipt.synth.rc_tasks import build

    build(RCTasksConfig(source=SourceConfig(name="docstrings", id_field="id",
                                            path=str(data_dir / "raw" / "docstrings.jsonl")),
                        out=str(out), valid_fraction=valid_fraction, max_chars=500,
                        max_gen_toks=32))
    return out


@pytest.fixture(scope="module")
def heldout(data_dir, tmp_path_factory):
    """The stage's tasks from the documents the test shards hold out (valid_fraction 0.05)."""
    return rc_tasks(data_dir, tmp_path_factory.mktemp("heldout"), 0.05)


def eval_overrides(heldout, tasks: str, every: int, limit: int | None) -> dict:
    return {"eval.tasks": tasks, "eval.include_path": str(heldout), "eval.every": every,
            "eval.limit": limit, "eval.batch_size": 4, "model.max_seq_len": 512}


def test_training_evaluates_the_live_weights_without_changing_the_run(data_dir, heldout,
                                                                       tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ipt.observe import read_metrics

    tasks = "[heldout_mc_sciq,heldout_em_sciq]"
    run = tmp_path / "run"
    run_pretrain(tiny_overrides(data_dir, run, **{"logger.plot": True,
                                                  "logger.tensorboard": True},
                                **eval_overrides(heldout, tasks, 4, 6)))
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    scored = [s for s, r in rows.items() if "downstream/heldout_mc_sciq/acc" in r]
    assert scored == [4, 8]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("downstream/heldout_mc_sciq/acc")] == \
        [(s, pytest.approx(rows[s]["downstream/heldout_mc_sciq/acc"])) for s in scored]
    for key in ("downstream/heldout_mc_sciq/acc_norm", "downstream/heldout_em_sciq/exact_match",
                "downstream/seconds", "downstream/share"):
        assert key in rows[8]
    assert 0 < rows[8]["downstream/share"] < 1
    assert (run / "loss.png").exists()
    assert "downstream evaluation: 2 runs" in (run / "train.log").read_text()
    # the same weights, saved at step 8 and evaluated on their own, score the same
    proc = evaluate(f"checkpoint={run / 'checkpoints'}", f"tasks={tasks}", "limit=6",
                    f"include_path={heldout}", f"out={tmp_path / 'eval'}", "batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert alone["heldout_mc_sciq"]["acc,none"] == rows[8]["downstream/heldout_mc_sciq/acc"]
    assert alone["heldout_mc_sciq"]["acc_norm,none"] == \
        rows[8]["downstream/heldout_mc_sciq/acc_norm"]
    # and training went exactly as it does without evaluation
    plain = tmp_path / "plain"
    run_pretrain(tiny_overrides(data_dir, plain, **{"model.max_seq_len": 512}))
    assert [r["loss"] for r in read_metrics(plain / "metrics.jsonl")] == \
        [rows[s]["loss"] for s in sorted(rows)]


@pytest.mark.slow
def test_zero3_ranks_wait_for_rank_0_without_tripping_the_watchdog(data_dir, tmp_path):
    from ipt.observe import read_metrics
    from ipt.synth.rc_tasks import TASK_NAMES

    # many documents (not the training hold-out: only the length of the evaluation matters)
    heldout = rc_tasks(data_dir, tmp_path / "tasks", 0.99)
    run = tmp_path / "run"
    timeout = 4
    proc = run_pretrain(tiny_overrides(data_dir, run, **{"deepspeed": "zero3",
                                                         "train.hang_timeout_s": timeout},
                                       **eval_overrides(heldout, f"[{','.join(TASK_NAMES)}]",
                                                        8, None)),
                        nproc=2, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["downstream/seconds"] > timeout  # longer than the watchdog allows a silent rank
    assert 0 <= last["downstream/heldout_em_sciq/exact_match"] <= 1


@pytest.mark.slow
def test_an_unknown_task_stops_the_run_before_training(data_dir, heldout, tmp_path):
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path / "run",
                                       **eval_overrides(heldout, "[nope]", 4, 2)), check=False)
    assert proc.returncode == 2
    assert "unknown task(s) ['nope']; local tasks in include_path:" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def stalling_task(tasks, tmp_path):
    """rc_mc, whose documents never come: the harness stalls before any forward pass."""
    out = tmp_path / "stalling"
    out.mkdir()
    (out / "stall.py").write_text("import time\n\n\ndef process_docs(dataset):\n"
                                  "    time.sleep(3600)\n    return dataset\n")
    (out / "stall_mc.yaml").write_text((tasks / "rc_mc.yaml").read_text().replace(
        "task: rc_mc", "task: stall_mc\nprocess_docs: !function stall.process_docs"))
    return out


@pytest.mark.slow
def test_an_evaluation_that_hangs_ends_the_job_within_the_hang_timeout(data_dir, stalling_task,
                                                                       tmp_path):
    """The harness captures stderr while it runs; the watchdog still writes rank 0's stacks
    to the job's log and ends it, and the rank waiting for rank 0 ends too."""
    timeout = 6
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path / "run", **{
        "train.hang_timeout_s": timeout, "train.max_steps": 4},
        **eval_overrides(stalling_task, "[stall_mc]", 2, None)), nproc=2, check=False,
        timeout=40)
    err = proc.stderr
    assert proc.returncode != 0
    assert "rank 0: no progress for" in err and "in rank 0's downstream evaluation" in err
    # rank 1 ends on its own watchdog, or, when rank 0 ended the job first, says so
    assert ("rank 1: no progress for" in err or "rank 1: rank 0 ended" in err) \
        and "waiting for rank 0's downstream" in err
    assert "in process_docs" in err  # rank 0's stacks: where it hangs
