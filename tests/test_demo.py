"""The demo, exactly as `make train` runs it: raw text to an exported model on 2 CPU ranks."""

from __future__ import annotations

import json
import subprocess

import pytest

from ipt.observe import read_metrics

from .conftest import ROOT


@pytest.mark.slow
def test_make_train_runs_the_demo_end_to_end(tmp_path):
    data, run, synth_run = tmp_path / "data", tmp_path / "run", tmp_path / "synth_run"
    slm, world_run = tmp_path / "slm", tmp_path / "world_run"
    proc = subprocess.run(["make", "-s", "train", f"DEMO_DATA={data}", f"DEMO_RUN={run}",
                           f"DEMO_SYNTH={synth_run}", f"DEMO_SLM={slm}",
                           f"DEMO_WORLD={world_run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    console = proc.stdout + proc.stderr  # ipt's progress and results, not third-party noise
    for noise in ("Setting accelerator to", "untested optimizer", "gcc ", "built successfully",
                  "`torch.distributed.", "Processing zero checkpoint", "Loading checkpoint shards",
                  "Setting OMP_NUM_THREADS", "Loading weights", "Cannot enable progress bars"):
        assert noise not in console, noise
    assert "ipt: demo-synth finished at step 120" in proc.stdout
    assert "ipt: demo-slm finished at step 70" in proc.stdout
    assert "ipt: demo finished at step 120" in proc.stdout
    mined = json.loads((data / "synth" / "rules" / "summary.json").read_text())
    assert 0.15 < (mined["ok"] + mined["no_pairs"]) / mined["docs"] < 0.25
    assert mined["pairs_per_doc"] > 1 and 0.03 < mined["held_out"] / mined["docs"] < 0.07
    tiny = json.loads((data / "synth" / "tiny" / "summary.json").read_text())
    assert tiny["docs"] == 64 and tiny["failed"] == 0
    assert tiny["parse_rate"] > 0.3  # the loop closes: its own pairs parse (0.97 measured)
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "hf" / "model.safetensors").exists() and (run / "loss.png").exists()
    assert summary["checkpoint"].endswith("step_00000120")
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 120
    # SALT: the SLM scored every source; KD from it (on the selected half) for 30 steps
    for source in ("docstrings_ipt", "packages", "packages_synth"):
        assert len(list((data / "shards" / source / "scores").glob("*.npy"))) == 1
    assert all(r["kd_weight"] == 0.5 and r["kd"] > 0 and r["ce"] > 0 for r in rows[:30])
    assert not any("kd" in r for r in rows[30:])
    log = (run / "train.log").read_text()
    assert "untested optimizer" in log  # the details stay in the run's log
    assert "data selection: the first 30 steps draw from the top 50%" in log
    assert "KD phase over: teacher released" in log
    assert rows[-1]["val_loss"] < rows[0]["loss"] - 1.5  # it learned (2.1 measured)
    waited = sum(r["data_wait"] * r["step_time_s"] for r in rows[1:])
    assert waited / sum(r["step_time_s"] for r in rows[1:]) < 0.02  # of step time
    # MTP: a second head trained alongside; its export drafts for self-speculative decoding
    assert all(r["ce_2"] > 0 for r in rows) and (run / "hf" / "mtp_heads.safetensors").exists()
    assert f"[{run}/hf, greedy]" in proc.stdout and f"[{run}/hf, speculative]" in proc.stdout
    assert "speculative == greedy: True" in proc.stdout
    # Downstream: tasks from the held-out docstrings, scored during training and at the end
    tasks = json.loads((data / "rc_tasks" / "summary.json").read_text())
    assert tasks["fate"]["used"] > 50 and tasks["tasks"]["heldout_mc_sciq"]["examples"] > 80
    scored = [r for r in rows if "downstream/heldout_mc_sciq/acc" in r]
    assert [r["step"] for r in scored] == [60, 120]
    assert scored[-1]["downstream/share"] < 0.1  # of the run's wall time (about 0.03)
    assert "downstream evaluation: 2 runs" in log
    table = (run / "eval" / "table.md").read_text()
    assert table in proc.stdout and "| heldout_mc_unseen | 0 | acc |" in table
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    assert len(results) == 6 and all(0 <= r["acc,none"] <= 1 for n, r in results.items()
                                     if "_em_" not in n)
    # Knowledge: the world's model answers questions about people it was never asked about
    assert "ipt: demo-world finished at step 250" in proc.stdout
    answer = (data / "world" / "example" / "answer.txt").read_text().strip()
    assert f"[{world_run}/hf, greedy] 'Question: What is the birth city of " in proc.stdout
    assert f"the world's answer: {answer} (a question about the test half" in proc.stdout
    world = json.loads((world_run / "eval" / "results.json").read_text())["results"]
    assert world["world_train"]["exact_match,strip"] > 0.8  # 0.957 measured
    assert world["world_test"]["exact_match,strip"] > 0.2  # 0.525 measured; chance about 0.01
