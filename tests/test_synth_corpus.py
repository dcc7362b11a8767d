"""Synthesized documents as sources of the prepare stage: templated pre-training text and
synthesizer tuning data with a loss mask on the pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ipt.config import ConfigError, PrepareConfig, SourceConfig, SynthesizeConfig
from ipt.data import sources as src
from ipt.data import templates
from ipt.data import tokenizer as tok
from ipt.data.pairs import Pair
from ipt.data.prepare import prepare
from ipt.data.shards import Shard
from ipt.synth.stage import synthesize

PAIRS = [Pair("Which colour is the sky?\nOptions:\n- blue\n- green\n- red", "blue"),
         Pair("Is 4 even? Let's think step by step.", "It divides by 2.\nTherefore, the answer is yes."),
         Pair("What is the text about?", "Numbers.")]


@pytest.fixture(scope="module")
def synth_out(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:120]
    (out / "in.jsonl").write_text("\n".join(lines) + "\n")
    synthesize(SynthesizeConfig(source=SourceConfig(name="docs", path=str(out / "in.jsonl"),
                                                    id_field="id"),
                                out=str(out / "synth"), rounds=2, docs_per_shard=60,
                                progress_bar="never"))
    return out / "synth"


def test_templates_are_reproducible_per_document_and_vary_across_documents():
    texts = [templates.render_entry("A text.", PAIRS, f"doc{i}", seed=0) for i in range(200)]
    assert texts == [templates.render_entry("A text.", PAIRS, f"doc{i}", 0) for i in range(200)]
    assert len(set(texts)) > 50
    assert templates.render_entry("A text.", PAIRS, "doc0", seed=1) != texts[0] or \
        templates.render_entry("A text.", PAIRS, "doc1", seed=1) != texts[1]
    assert sum(t.startswith("A text.") for t in texts) > 150  # mostly text first
    assert any(not t.startswith("A text.") for t in texts)  # sometimes pairs first


def test_a_multiple_choice_answer_given_as_a_marker_names_the_right_option():
    for i in range(100):
        q, a, _ = templates.render_pair(PAIRS[0], templates.rng_for(f"d{i}", 0))
        lines = q.splitlines()[1:]
        marker = a.split()[0]
        if marker != "blue":
            assert next(line for line in lines if line.startswith(marker)).endswith("blue")


def test_a_document_without_pairs_stays_raw_text():
    assert templates.render_entry("Just text.", [], "d", 0) == "Just text."


def test_each_chain_becomes_one_example_with_its_linked_documents(synth_out):
    rows = [json.loads(line) for f in sorted((synth_out / "shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    docs = list(src.read(SourceConfig(name="aug", path=str(synth_out))))  # format detected
    assert len(docs) == len(rows) - sum(bool(r.get("inherited")) for r in rows)
    by_id = {d.id: d.text for d in docs}
    for r in rows:
        if r.get("inherited"):
            assert r["text"].strip() in by_id[r["prev"]]  # two rounds: prev is the root


def tuning_shard(synth_out, data_dir, out) -> Shard:
    """The synthesize output prepared as synthesizer tuning data (3 shots a sequence)."""
    spec = {"path": str(synth_out), "format": "synth_tuning", "shots": 3}
    prepare(PrepareConfig(sources={"tune": SourceConfig(name="tune", **spec)},
                          tokenizer=str(data_dir / "tokenizer"), out=str(out),
                          valid_fraction=0.0, progress_bar="never", workers=1))
    return Shard.open(next((out / "tune" / "train").glob("*.tokens")).with_suffix(""))


def test_tuning_data_trains_only_on_the_pairs(synth_out, data_dir, tmp_path):
    shard = tuning_shard(synth_out, data_dir, tmp_path)
    tk = tok.load(data_dir / "tokenizer")
    end = int(shard.doc_ends[0])
    ids, mask = np.asarray(shard.tokens[:end]), np.asarray(shard.channels["loss_mask"][:end])
    trained, context = tk.decode(ids[mask == 1]), tk.decode(ids[mask == 0])
    assert ids[0] == tk.bos_token_id and ids[-1] == tk.eos_token_id and mask[-1] == 1
    assert "<CON>" not in trained and "<QUE>" in trained and trained.count("</END>") >= 3
    assert "<QUE>" not in context and context.count("<CON>") == 3


def test_tuning_data_keeps_bos_and_eos_between_its_examples(synth_out, data_dir, tmp_path):
    shard = tuning_shard(synth_out, data_dir, tmp_path)
    tk = tok.load(data_dir / "tokenizer")
    inner = np.asarray(shard.tokens[1:int(shard.doc_ends[0]) - 1]).tolist()
    assert inner.count(tk.bos_token_id) == 2 and inner.count(tk.eos_token_id) == 2


def test_an_unfinished_synthesize_output_is_refused(synth_out, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(synth_out, partial)
    summary = json.loads((partial / "summary.json").read_text())
    summary["groups_done"] -= 1
    (partial / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="finished 1 of 2 shards"):
        list(src.read(SourceConfig(name="aug", path=str(partial))))


def test_finetune_trains_on_the_tuning_shards_with_the_context_masked(synth_out, data_dir,
                                                                      tmp_path):

    from ipt.observe import read_metrics

    from .conftest import run_entry, tiny_overrides

    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "tokenizer").symlink_to(data_dir / "tokenizer")
    prepare(PrepareConfig(sources={"synth_tuning": SourceConfig(
        name="synth_tuning", path=str(synth_out), format="synth_tuning")},
        tokenizer=str(root / "tokenizer"), out=str(root / "shards"), valid_fraction=0.1,
        progress_bar="never", workers=1))
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(root, run, **{"train.max_steps": 4})]
    proc = run_entry("train/finetune.py", overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    assert "synth_tuning" in proc.stdout + proc.stderr


def test_literal_bos_and_eos_tokenize_as_the_ids_the_prepare_stage_adds(data_dir):
    tk = tok.load(data_dir / "tokenizer")
    text = "<s> <CON> Some text. </CON>\n\n<QUE> q <ANS> a </END></s>"
    inner = text.removeprefix("<s>").removesuffix("</s>")
    ids = tk(text, add_special_tokens=False)["input_ids"]
    assert ids == [tk.bos_token_id, *tk(inner, add_special_tokens=False)["input_ids"],
                   tk.eos_token_id]


def test_documents_sharing_an_id_each_reach_the_prepare_stage_once(data_dir, tmp_path):
    texts = ["The river flooded the valley early in the spring season. Therefore, the farmers "
             "moved all of their cattle up to the hills.",
             "The old bridge was closed to traffic for the whole summer. Because of this, the "
             "town built a ferry across the wide river.",
             "The library opened a new reading room on the second floor. However, most of the "
             "visitors still preferred the quiet garden."]
    ids = ["https://example.org/a", "https://example.org/a", "https://example.org/b"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                               for i, t in zip(ids, texts, strict=True)))
    synth = synthesize(SynthesizeConfig(
        source=SourceConfig(name="web", path=str(tmp_path / "in.jsonl"), id_field="id"),
        out=str(tmp_path / "synth"), fraction=1.0, rounds=2, progress_bar="never"))
    prepared = prepare(PrepareConfig(
        sources={"web": SourceConfig(name="web", path=str(tmp_path / "synth"), format="synth")},
        tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "shards"),
        valid_fraction=0.0, progress_bar="never", workers=1))["web"]
    shard = Shard.open(next((tmp_path / "shards" / "web" / "train").glob("*.tokens"))
                       .with_suffix(""))
    tk = tok.load(data_dir / "tokenizer")
    starts = [0, *map(int, shard.doc_ends[:-1])]
    prepared_text = "\n".join(tk.decode(shard.tokens[a:int(b)], skip_special_tokens=True)
                              for a, b in zip(starts, shard.doc_ends, strict=True))
    assert [prepared_text.count(t) for t in texts] == [1, 1, 1]
    assert synth["records"] == synth["docs"] == 3 and synth["rejected"] == 0
    assert prepared["train_docs"] + synth["inherited"] == 3
