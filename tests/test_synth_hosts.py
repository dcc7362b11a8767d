"""The synthesize stage split over hosts: workers started at once on one output folder finish
every shard, agree on the settings and leave one summary that adds up every shard."""

from __future__ import annotations

import json
import multiprocessing
from typing import Any

from ipt.config import SynthesizeConfig
from ipt.synth.stage import synthesize

from .test_synth_stage import config, records, write_corpus

WORKERS = 4
# The workers share two files, written at the start and at the end of a run; a clash there
# is a matter of microseconds, so the workers run many small runs in step.
RUNS = 20


def hosts(start: Any, runs: list[SynthesizeConfig]) -> None:
    """One host's worker, a process of its own, let go at once with the others for each run."""
    failed = []
    for cfg in runs:
        start.wait(timeout=120)
        try:
            synthesize(cfg)
        except Exception as e:  # noqa: BLE001 - keep in step with the other hosts, report all
            failed.append(f"{cfg.out}: {e!r}")
    if failed:
        raise SystemExit("\n".join(failed))


def test_hosts_started_at_once_finish_every_shard_and_one_summary_adds_them_up(data_dir,
                                                                               tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 16)
    small = {"docs_per_shard": 2, "rounds": 1}
    reference = synthesize(config(tmp_path / "in.jsonl", tmp_path / "one", **small))
    outs = [tmp_path / f"hosts{n}" for n in range(RUNS)]
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(WORKERS)
    procs = [spawn.Process(target=hosts, args=(start, [config(
        tmp_path / "in.jsonl", out, worker_index=i, num_workers=WORKERS, **small)
        for out in outs])) for i in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    for out in outs:
        assert records(out) == records(tmp_path / "one")
        assert len(list((out / "parts").glob("shard_*.json"))) == 8
        assert json.loads((out / "summary.json").read_text()) == reference
        assert json.loads((out / "stage.json").read_text()) == \
            json.loads((tmp_path / "one" / "stage.json").read_text())
        assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]
