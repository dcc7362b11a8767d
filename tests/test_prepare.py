"""The prepare stage: every record ends in a shard or in the rejects with its reason; the
output does not depend on the number of workers; a killed run resumes without redoing or
duplicating anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ipt.config import ConfigError, PrepareConfig, SourceConfig
from ipt.data.prepare import pieces, prepare
from ipt.data.shards import ShardSet

from .conftest import ROOT, bpe_tokenizer


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> Path:
    """The demo docstrings plus bad lines sprinkled in."""
    path = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    good = (data_dir / "raw" / "docstrings.jsonl").read_bytes().splitlines()
    lines = []
    for i, line in enumerate(good):
        lines.append(line)
        if i % 97 == 0:
            lines += [b'{"text": "unterminated', b'{"title": "no text"}', b'{"text": ""}',
                      b'{"text": "\xff\xfe"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def config(data_dir: Path, out: Path, corpus: Path, **kw) -> PrepareConfig:
    settings = {"tokenizer": str(data_dir / "tokenizer"), "docs_per_shard": 100,
                "progress_bar": "never"} | kw
    return PrepareConfig(sources={"mixed": SourceConfig(path=str(corpus))}, out=str(out),
                         **settings)


def shard_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): json.loads(p.read_text())["content_hash"]
            for p in sorted(out.glob("*/*/shard_*.json")) if p.parent.name in ("train", "valid")}


def test_every_record_is_accounted_for(data_dir, corpus, tmp_path):
    summary = prepare(config(data_dir, tmp_path, corpus, workers=1))["mixed"]
    lines = sum(1 for line in corpus.read_bytes().splitlines() if line.strip())
    assert summary["records"] == lines
    assert summary["train_docs"] + summary["valid_docs"] + summary["rejected"] == lines
    assert summary["reject_reasons"] == {"invalid JSON": 7, "no 'text' field": 7,
                                         "empty text": 7, "not UTF-8": 7}
    rejects = [json.loads(x) for f in sorted((tmp_path / "mixed" / "rejects").glob("*.jsonl"))
               for x in f.read_text().splitlines()]
    assert len(rejects) == 28 and all(r["id"].startswith("mixed/mixed.jsonl:") for r in rejects)
    shards = ShardSet(tmp_path / "mixed" / "train")
    assert sum(s.meta["num_docs"] for s in shards.shards) == summary["train_docs"]


def test_documents_get_bos_and_eos(data_dir, corpus, tmp_path):
    prepare(config(data_dir, tmp_path, corpus, workers=1))
    shard = ShardSet(tmp_path / "mixed" / "train").shards[0]
    starts = np.concatenate([[0], shard.doc_ends[:-1]]).astype(np.int64)
    assert set(shard.tokens[starts].tolist()) == {1}  # <s>
    assert set(shard.tokens[shard.doc_ends.astype(np.int64) - 1].tolist()) == {2}  # </s>


def test_output_does_not_depend_on_the_number_of_workers(data_dir, corpus, tmp_path):
    prepare(config(data_dir, tmp_path / "one", corpus, workers=1))
    prepare(config(data_dir, tmp_path / "two", corpus, workers=2))
    assert shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two")


def test_hosts_started_at_once_split_the_groups_and_account_for_every_document_once(
        data_dir, corpus, tmp_path):
    """Three workers (as three hosts would, each a process of its own) on one output folder:
    the same shards as one worker writes, and one summary that adds up every record once."""
    reference = tmp_path / "reference"
    prepare(config(data_dir, reference, corpus, workers=1))
    out = tmp_path / "hosts"
    cmd = [sys.executable, str(ROOT / "data_pipeline" / "prepare.py"),
           f"tokenizer={data_dir / 'tokenizer'}", f"out={out}", f"+sources.mixed.path={corpus}",
           "docs_per_shard=100", "workers=1", "progress_bar=never", "num_workers=3"]
    procs = [subprocess.Popen([*cmd, f"worker_index={i}"], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
        p.stderr.close()
    assert shard_hashes(out) == shard_hashes(reference)
    summary = json.loads((out / "mixed" / "summary.json").read_text())
    expected = json.loads((reference / "mixed" / "summary.json").read_text())
    assert summary == expected | {"source": summary["source"]}
    assert summary["complete"] and summary["records"] == expected["records"]
    assert not list((out / "mixed").glob(".*.tmp"))
    with pytest.raises(ConfigError, match=r"worker_index=3 must be in \[0, num_workers=3\)"):
        prepare(config(data_dir, out, corpus, worker_index=3, num_workers=3))


def test_killed_run_resumes_without_redoing_or_duplicating(data_dir, corpus, tmp_path):
    reference = tmp_path / "reference"
    prepare(config(data_dir, reference, corpus, workers=1))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data_pipeline" / "prepare.py"),
           f"tokenizer={data_dir / 'tokenizer'}", f"out={out}", f"+sources.mixed.path={corpus}",
           "docs_per_shard=100", "workers=1", "progress_bar=never"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = out / "mixed" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.json"))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert 2 <= len(done_before) < len(list((reference / "mixed" / "parts").glob("*.json")))

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")
            if p.name in done_before} == done_before  # finished groups were not redone
    assert shard_hashes(out) == shard_hashes(reference)
    summary = json.loads((out / "mixed" / "summary.json").read_text())
    assert summary == json.loads((reference / "mixed" / "summary.json").read_text()) | {
        "source": summary["source"]}


def test_segments_become_a_loss_mask_channel(data_dir, tmp_path):
    f = tmp_path / "sft.jsonl"
    row = {"segments": [{"text": "Read this context first. ", "loss": False},
                        {"text": "Question? Answer.", "loss": True}]}
    f.write_text(json.dumps(row) + "\n")
    prepare(PrepareConfig(sources={"sft": SourceConfig(path=str(f), segments_field="segments")},
                          tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "o"),
                          valid_fraction=0.0, workers=1, progress_bar="never"))
    shard = ShardSet(tmp_path / "o" / "sft" / "train").shards[0]
    mask = shard.channels["loss_mask"].tolist()
    assert mask[0] == 0 and mask[-1] == 1  # BOS never trained on, EOS always
    from ipt.data.tokenizer import load

    tok = load(data_dir / "tokenizer")
    trained = [t for t, m in zip(shard.tokens.tolist(), mask, strict=True) if m][:-1]
    assert tok.decode(trained).strip() == "Question? Answer."


def test_huge_document_is_tokenized_in_pieces(data_dir, tmp_path):
    text = ("A long line of plain prose about nothing in particular.\n" * 40_000)  # 2.2 MB
    f = tmp_path / "huge.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n")
    prepare(PrepareConfig(sources={"huge": SourceConfig(path=str(f))},
                          tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "o"),
                          valid_fraction=0.0, workers=1, max_chars_per_piece=100_000,
                          progress_bar="never"))
    shard = ShardSet(tmp_path / "o" / "huge" / "train").shards[0]
    from ipt.data.tokenizer import load

    whole = load(data_dir / "tokenizer")(text, add_special_tokens=False)["input_ids"]
    assert shard.tokens[1:-1].tolist() == whole  # the same ids as in one piece


def test_pieces_cut_at_line_breaks():
    assert pieces("aaa\nbbb\nccc", 5) == ["aaa\n", "bbb\n", "ccc"]
    assert "".join(pieces("x" * 23, 5)) == "x" * 23


def test_pieces_without_a_line_break_in_reach_cut_before_a_space():
    assert pieces("the quick brown fox", 12) == ["the quick", " brown fox"]


def test_no_sources_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="sources is empty"):
        prepare(PrepareConfig(tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path)))


def test_missing_source_fails_before_any_work(data_dir, tmp_path):
    cfg = PrepareConfig(sources={"a": SourceConfig(path=str(tmp_path / "missing.jsonl"))},
                        tokenizer=str(data_dir / "tokenizer"), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="source a: path=.* does not exist"):
        prepare(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_32_mb_document_goes_through_in_pieces(data_dir, tmp_path):
    """32 times the prepare stage's piece (`max_chars_per_piece`, 1,000,000 characters): a
    document of any size is tokenized piece by piece (a 100 MB one took 65 s in CI)."""
    line = "Plain prose, repeated until the document weighs thirty-two megabytes.\n"
    text = line * (32 * 2**20 // len(line))
    f = tmp_path / "huge.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "a small one"}) + "\n")
    del text
    out = tmp_path / "o"
    summary = prepare(PrepareConfig(sources={"huge": SourceConfig(path=str(f))},
                                    tokenizer=str(data_dir / "tokenizer"), out=str(out),
                                    valid_fraction=0.0, workers=1,
                                    progress_bar="never"))["huge"]
    assert summary["train_docs"] == 2 and summary["rejected"] == 0
    shard = ShardSet(out / "huge" / "train").shards[0]
    assert shard.meta["num_docs"] == 2 and shard.meta["num_tokens"] > 3_000_000


def prepare_texts(data_dir: Path, out: Path, texts: list[str], **kw) -> list[list[int]]:
    """Prepare one jsonl source of `texts`; the token ids of each document, in order."""
    f = out.parent / f"{out.name}.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(PrepareConfig(sources={"s": SourceConfig(path=str(f))},
                          tokenizer=str(data_dir / "tokenizer"), out=str(out),
                          valid_fraction=0.0, workers=1, progress_bar="never", **kw))
    shard = ShardSet(out / "s" / "train").shards[0]
    ends = shard.doc_ends.astype(np.int64).tolist()
    return [shard.tokens[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends, strict=True)]


@pytest.mark.parametrize("max_chars", [1_000_000, 8], ids=["whole", "in_pieces"])
def test_special_token_strings_in_raw_text_are_plain_text(data_dir, tmp_path, max_chars):
    from ipt.data.tokenizer import load

    tk = load(data_dir / "tokenizer")
    text = "I wrote <s>old</s> price"
    (ids,) = prepare_texts(data_dir, tmp_path / "o", [text], max_chars_per_piece=max_chars)
    assert ids[0] == tk.bos_token_id and ids[-1] == tk.eos_token_id
    assert not {tk.bos_token_id, tk.eos_token_id} & set(ids[1:-1])
    assert tk.decode(ids[1:-1]) == text


def test_a_long_line_loses_nothing_at_piece_cuts(data_dir, tmp_path):
    from ipt.data.tokenizer import load

    tk = load(data_dir / "tokenizer")
    text = "The quick brown fox jumps over the lazy cat and dog ran away. " * 20
    (ids,) = prepare_texts(data_dir, tmp_path / "o", [text], max_chars_per_piece=50)
    assert tk.decode(ids[1:-1]) == text
    assert ids[1:-1] == tk(text, add_special_tokens=False)["input_ids"]  # as in one piece


def test_text_without_whitespace_loses_nothing_at_piece_cuts(data_dir, tmp_path):
    from ipt.data.tokenizer import load

    tk = load(data_dir / "tokenizer")
    text = json.dumps([{"id": i, "name": f"item{i}", "tags": ["a", "b"]} for i in range(40)],
                      separators=(",", ":"))  # minified JSON
    (ids,) = prepare_texts(data_dir, tmp_path / "o", [text], max_chars_per_piece=50)
    assert tk.decode(ids[1:-1]) == text


@pytest.fixture
def small_corpus(data_dir, tmp_path) -> Path:
    """A directory source of 30 demo documents in one file."""
    folder = tmp_path / "small"
    folder.mkdir()
    lines = (data_dir / "raw" / "docstrings.jsonl").read_text().splitlines()[:30]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_resuming_with_another_docs_per_shard_is_refused(data_dir, small_corpus, tmp_path):
    prepare(config(data_dir, tmp_path / "o", small_corpus, docs_per_shard=10))
    with pytest.raises(ConfigError, match="docs_per_shard: 10 -> 20"):
        prepare(config(data_dir, tmp_path / "o", small_corpus, docs_per_shard=20))


def test_resuming_with_another_tokenizer_is_refused(data_dir, small_corpus, tmp_path):
    from ipt.data.tokenizer import train_sentencepiece

    texts = [json.loads(x)["text"] for x in (small_corpus / "a.jsonl").read_text().splitlines()]
    other = train_sentencepiece(texts * 4, tmp_path / "other_tok", vocab_size=400)
    prepare(config(data_dir, tmp_path / "o", small_corpus))
    with pytest.raises(ConfigError, match="tokenizer: .* -> .*other_tok"):
        prepare(config(data_dir, tmp_path / "o", small_corpus, tokenizer=str(other)))


def test_resuming_from_another_source_is_refused(data_dir, small_corpus, corpus, tmp_path):
    prepare(config(data_dir, tmp_path / "o", small_corpus))
    with pytest.raises(ConfigError, match=r"source.files.a.jsonl: \d+ -> None"):
        prepare(config(data_dir, tmp_path / "o", corpus))


def test_resuming_after_the_source_files_changed_is_refused(data_dir, small_corpus, tmp_path):
    prepare(config(data_dir, tmp_path / "o", small_corpus))
    (small_corpus / "b.jsonl").write_text('{"text": "a file added since"}\n')
    with pytest.raises(ConfigError, match="source.files.b.jsonl: None -> 31"):
        prepare(config(data_dir, tmp_path / "o", small_corpus))


def test_resuming_from_the_same_corpus_moved_elsewhere_goes_on(data_dir, small_corpus,
                                                                tmp_path):
    import shutil

    first = prepare(config(data_dir, tmp_path / "o", small_corpus))
    moved = shutil.copytree(small_corpus, tmp_path / "moved")
    tokenizer = shutil.copytree(data_dir / "tokenizer", tmp_path / "tokenizer")
    again = prepare(config(data_dir, tmp_path / "o", moved, tokenizer=str(tokenizer)))
    assert again["mixed"] | {"source": None} == first["mixed"] | {"source": None}


def test_resuming_with_the_same_settings_and_other_workers_goes_on(data_dir, small_corpus,
                                                                    tmp_path):
    first = prepare(config(data_dir, tmp_path / "o", small_corpus, docs_per_shard=10))
    (tmp_path / "o" / "mixed" / "parts" / "shard_00002.json").unlink()  # as if killed
    again = prepare(config(data_dir, tmp_path / "o", small_corpus, docs_per_shard=10,
                           workers=2))
    assert again == first


@pytest.fixture(scope="module")
def bosless_tokenizer(data_dir, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with an EOS and no BOS, as Qwen's: trained on the demo
    docstrings and saved as a `transformers` folder."""
    return bpe_tokenizer(data_dir, tmp_path_factory.mktemp("bosless_tokenizer"))


def test_a_tokenizer_without_bos_gives_documents_without_one(data_dir, small_corpus,
                                                             bosless_tokenizer, tmp_path):
    from ipt.data.tokenizer import load

    tk = load(bosless_tokenizer)
    assert tk.bos_token_id is None
    prepare(config(data_dir, tmp_path / "o", small_corpus, tokenizer=str(bosless_tokenizer),
                   valid_fraction=0.0))  # add_bos=true, the default
    shard = ShardSet(tmp_path / "o" / "mixed" / "train").shards[0]
    ends = shard.doc_ends.astype(np.int64).tolist()
    docs = [shard.tokens[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    texts = [json.loads(x)["text"] for x in (small_corpus / "a.jsonl").read_text().splitlines()]
    assert [d[-1] for d in docs] == [tk.eos_token_id] * len(texts)
    assert [tk.decode(d[:-1]) for d in docs] == texts  # nothing before the text
    settings = json.loads((tmp_path / "o" / "mixed" / "settings.json").read_text())
    assert settings["add_bos"] is False  # what was done, not what was asked


def test_a_tokenizer_without_bos_is_said_once(data_dir, small_corpus, bosless_tokenizer,
                                              tmp_path, caplog):
    cfg = config(data_dir, tmp_path / "o", small_corpus, tokenizer=str(bosless_tokenizer))
    cfg.sources["again"] = SourceConfig(path=str(small_corpus))
    with caplog.at_level("INFO", logger="ipt.data.prepare"):
        prepare(cfg)
    said = [r.getMessage() for r in caplog.records if "BOS" in r.getMessage()]
    assert said == [f"tokenizer {bosless_tokenizer} has no BOS token: documents start "
                    "without one (add_bos=true has no effect)"]


def test_resuming_with_a_bos_after_a_tokenizer_without_one_is_refused(
        data_dir, small_corpus, bosless_tokenizer, tmp_path):
    prepare(config(data_dir, tmp_path / "o", small_corpus, tokenizer=str(bosless_tokenizer)))
    with pytest.raises(ConfigError, match="add_bos: False -> True"):
        prepare(config(data_dir, tmp_path / "o", small_corpus))


def test_a_tokenizer_without_eos_fails_before_any_work(data_dir, small_corpus,
                                                       bosless_tokenizer, tmp_path):
    import shutil

    no_eos = shutil.copytree(bosless_tokenizer, tmp_path / "no_eos")
    settings = json.loads((no_eos / "tokenizer_config.json").read_text())
    (no_eos / "tokenizer_config.json").write_text(json.dumps(settings | {"eos_token": None}))
    with pytest.raises(ConfigError, match=f"tokenizer={no_eos} has no EOS token"):
        prepare(config(data_dir, tmp_path / "o", small_corpus, tokenizer=str(no_eos)))
    assert not (tmp_path / "o").exists()
