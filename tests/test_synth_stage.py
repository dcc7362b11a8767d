"""The synthesize stage with the rules miner: accounting, chaining, truncation, resume, shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipt.config import ConfigError, SourceConfig, SynthBackendConfig, SynthesizeConfig
from ipt.synth.stage import synthesize


def write_corpus(data_dir: Path, path: Path, n: int, extra: list[str] = ()) -> list[str]:
    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return [json.loads(line)["id"] for line in lines]


def config(src: Path, out: Path, **kw) -> SynthesizeConfig:
    synth = kw.pop("synth", SynthBackendConfig(kind="rules"))
    return SynthesizeConfig(source=SourceConfig(name="docs", path=str(src), id_field="id"),
                            out=str(out), synth=synth, progress_bar="never",
                            **{"docs_per_shard": 40, "rounds": 2, **kw})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_every_input_record_is_a_document_or_a_reject(data_dir, tmp_path):
    ids = write_corpus(data_dir, tmp_path / "in.jsonl", 100,
                       ['{"id": "e", "text": "   "}', "{not json", '{"id": "n", "text": 5}'])
    summary = synthesize(config(tmp_path / "in.jsonl", tmp_path / "out"))
    assert summary["records"] == 103 and summary["docs"] == 100 and summary["rejected"] == 3
    assert [r["id"] for r in records(tmp_path / "out")] == ids
    rejects = [json.loads(line) for f in (tmp_path / "out" / "rejects").glob("*.jsonl")
               for line in f.read_text().splitlines()]
    assert sorted(r["reason"].split(" (")[0] for r in rejects) == \
        ["'text' is a int, not a string", "empty text", "invalid JSON"]
    # all synthesized but the documents the prepare stage will hold out (0.5% by id hash)
    assert summary["ok"] + summary["no_pairs"] + summary["held_out"] == 100
    assert summary["held_out"] <= 3 and summary["pairs"] > 100


def test_round_r_documents_chain_to_the_same_slot_of_round_r_minus_1(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 40)
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", rounds=2))
    rows = records(tmp_path / "out")
    first, second = rows[:20], rows[20:]
    assert {r["round"] for r in first} == {0} and {r["round"] for r in second} == {1}
    for a, b in zip(first, second, strict=True):
        assert b["prev"] == (a["id"] if a["pairs"] else None)  # no pairs: nothing to show
        assert b["inherited"] == (b["prev"] is not None and bool(b["pairs"]))
    assert sum(r["inherited"] for r in second) > 10


def test_a_chain_breaks_when_the_earlier_example_does_not_fit(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 40)
    tight = SynthBackendConfig(kind="rules", context=700, max_new_tokens=100)
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", synth=tight))
    second = records(tmp_path / "out")[20:]
    roomy_out = tmp_path / "roomy"
    synthesize(config(tmp_path / "in.jsonl", roomy_out))
    roomy = records(roomy_out)[20:]
    assert sum(r["prev"] is not None for r in second) < sum(r["prev"] is not None for r in roomy)


def test_a_text_longer_than_the_context_is_truncated_before_synthesis(data_dir, tmp_path):
    long_text = " ".join(["This sentence is long enough to be mined by the rules miner."] * 400)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "long", "text": long_text}) + "\n")
    synth = SynthBackendConfig(kind="rules", context=1024, max_new_tokens=200,
                               tokenizer=str(data_dir / "tokenizer"))
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", synth=synth, rounds=1))
    (row,) = records(tmp_path / "out")
    assert row["truncated"] and row["read_chars"] < len(long_text) and row["text"] == long_text


def test_only_the_configured_fraction_is_synthesized_and_the_rest_kept_raw(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 200)
    summary = synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", fraction=0.2))
    assert 20 <= summary["docs"] - summary["raw"] <= 60
    assert all(not r["pairs"] for r in records(tmp_path / "out") if r["status"] == "raw")


def test_two_workers_split_the_shards_without_overlap(data_dir, tmp_path):
    ids = write_corpus(data_dir, tmp_path / "in.jsonl", 200)
    for index in (0, 1):
        synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", worker_index=index,
                          num_workers=2))
    assert sorted(r["id"] for r in records(tmp_path / "out")) == sorted(ids)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["groups_done"] == 5


def test_a_rerun_skips_finished_shards_and_completes_the_rest(data_dir, tmp_path):
    ids = write_corpus(data_dir, tmp_path / "in.jsonl", 120)
    out = tmp_path / "out"
    synthesize(config(tmp_path / "in.jsonl", out))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (out / "parts" / "shard_00001.json").unlink()  # as if killed while writing shard 1
    summary = synthesize(config(tmp_path / "in.jsonl", out))
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert after["shard_00000.jsonl"] == before["shard_00000.jsonl"]
    assert after["shard_00001.jsonl"] != before["shard_00001.jsonl"]
    assert [r["id"] for r in records(out)] == ids and summary["docs"] == 120


def test_continuing_with_other_settings_is_refused(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 20)
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "out"))
    with pytest.raises(ConfigError, match="rounds: 2 -> 3"):
        synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", rounds=3))


def test_continuing_with_another_valid_fraction_is_refused(data_dir, tmp_path):
    """The held-out documents would change for the shards still to do: some held out before
    would be synthesized now, and their records hold no generation to keep."""
    write_corpus(data_dir, tmp_path / "in.jsonl", 80)
    out = tmp_path / "out"
    synthesize(config(tmp_path / "in.jsonl", out, valid_fraction=0.3))
    (out / "parts" / "shard_00000.json").unlink()  # a shard still to do
    with pytest.raises(ConfigError, match="valid_fraction: 0.3 -> 0.1"):
        synthesize(config(tmp_path / "in.jsonl", out, valid_fraction=0.1))


def test_an_output_of_an_older_ipt_is_refused_naming_the_changed_rule(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 40)
    out = tmp_path / "out"
    synthesize(config(tmp_path / "in.jsonl", out))
    stage = json.loads((out / "stage.json").read_text())
    del stage["valid_fraction"]  # as written before it was a recorded setting
    (out / "stage.json").write_text(json.dumps(stage))
    with pytest.raises(ConfigError, match="older ipt.*renamed ids.*new out"):
        synthesize(config(tmp_path / "in.jsonl", out))


def test_the_entry_point_names_an_unknown_key(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "data_pipeline/synthesize.py", "source.path=x",
                           f"out={tmp_path}", "synth.temprature=0"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "temprature" in proc.stderr


def test_worker_processes_write_what_one_process_writes(data_dir, tmp_path):
    write_corpus(data_dir, tmp_path / "in.jsonl", 160)
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "one"))
    synthesize(config(tmp_path / "in.jsonl", tmp_path / "two", workers=2))
    assert records(tmp_path / "one") == records(tmp_path / "two")


def test_non_english_and_markup_only_texts_are_kept_and_accounted(tmp_path):
    texts = ["Der Hund läuft schnell über die Wiese, weil er den Ball sehen kann. Danach "
             "schläft er lange im Garten unter dem großen Baum.", "これは日本語の文章です。" * 20,
             "<div><span></span></div>", "1 2 3 4 5"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    summary = synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", rounds=1))
    rows = records(tmp_path / "out")
    assert [r["text"] for r in rows] == texts and summary["failed"] == 0
    assert summary["ok"] + summary["no_pairs"] == 4


def test_a_repeated_id_gets_the_same_suffix_from_whichever_worker_writes_it(data_dir, tmp_path):
    lines = [json.loads(line) for line in
             (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:4]]
    ids = ["a", "b", "a", "c"]  # the repeat is in the second shard, the second worker's
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({**row, "id": i}) + "\n"
                                               for row, i in zip(lines, ids, strict=True)))
    for index in (1, 0):
        synthesize(config(tmp_path / "in.jsonl", tmp_path / "out", docs_per_shard=2,
                          worker_index=index, num_workers=2))
    rows = records(tmp_path / "out")
    assert [r["id"] for r in rows] == ["a", "b", "a#2", "c"]
    assert [r["text"] for r in rows] == [row["text"] for row in lines]
    assert rows[2]["input_id"] == "a" and "input_id" not in rows[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["renamed_ids"] == 1
