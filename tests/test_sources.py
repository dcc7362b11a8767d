"""Sources: every record becomes a document or a reject with its reason; nothing is lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipt.config import ConfigError, SourceConfig
from ipt.data.sources import Doc, Reject, read


def spec(path, **kw) -> SourceConfig:
    return SourceConfig(name="s", path=str(path), **kw)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_bad_records_become_rejects_with_reasons(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [
        b'{"text": "a good document"}',
        b'{"text": "broken',
        b'{"body": "no text field"}',
        b'{"text": "   "}',
        b'{"text": 42}',
        b'["not", "an", "object"]',
        b'{"text": "caf\xe9 in latin-1"}',
        b"",
        b'{"text": "another good one"}',
    ])
    records = list(read(spec(f)))
    docs = [r for r in records if isinstance(r, Doc)]
    rejects = {r.id: r.reason for r in records if isinstance(r, Reject)}
    assert [d.text for d in docs] == ["a good document", "another good one"]
    assert [d.id for d in docs] == ["s/a.jsonl:1", "s/a.jsonl:9"]
    assert rejects["s/a.jsonl:2"].startswith("invalid JSON")
    assert rejects["s/a.jsonl:3"] == "no 'text' field"
    assert rejects["s/a.jsonl:4"] == "empty text"
    assert rejects["s/a.jsonl:5"] == "'text' is a int, not a string"
    assert rejects["s/a.jsonl:6"] == "record is a list, not an object"
    assert rejects["s/a.jsonl:7"].startswith("not UTF-8")
    assert len(records) == 8  # the blank line is not a record


def test_compressed_jsonl_and_id_field(tmp_path):
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "x1", "content": "hello"}) + "\n")
    docs = list(read(spec(tmp_path, text_field="content", id_field="id")))
    assert docs == [Doc("x1", "hello")]


def test_truncated_gzip_keeps_what_was_read_and_says_so(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n"
                                  for i in range(2000)))
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    records = list(read(spec(tmp_path)))
    assert isinstance(records[-1], Reject) and "unreadable file" in records[-1].reason
    assert all(isinstance(r, Doc) for r in records[:-1]) and len(records) > 100


def test_parquet_with_wrong_schema_is_rejected_whole(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "bad.parquet")
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "good.parquet")
    records = list(read(spec(tmp_path)))
    assert [r.text for r in records if isinstance(r, Doc)] == ["one", "two"]
    (bad,) = [r for r in records if isinstance(r, Reject)]
    assert "wrong schema: no 'text' column" in bad.reason and "2 rows not read" in bad.reason


def test_directory_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad bytes")
    (tmp_path / "c.txt").write_text("")
    records = {r.id: r for r in read(spec(tmp_path))}
    assert records["s/a.txt"] == Doc("s/a.txt", "first file")
    assert records["s/b.txt"].reason.startswith("not UTF-8")
    assert records["s/c.txt"].reason == "empty text"


def test_hf_datasets_streaming_and_from_disk(tmp_path):
    import datasets

    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": t}).encode() for t in "xyz"])
    streamed = list(read(spec("json", format="hf", data_files=str(f), streaming=True)))
    assert [d.text for d in streamed] == ["x", "y", "z"]
    datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(tmp_path / "disk")
    assert [d.text for d in read(spec(tmp_path / "disk"))] == ["p", "q"]


def test_segments_give_loss_spans(tmp_path):
    row = {"segments": [{"text": "Context. ", "loss": False}, {"text": "Q? A.", "loss": True}]}
    f = write_lines(tmp_path / "e.jsonl", [json.dumps(row).encode()])
    (doc,) = read(spec(f, segments_field="segments"))
    assert doc.text == "Context. Q? A." and doc.loss_spans == ((9, 14),)


def test_missing_path_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="path=.* does not exist"):
        next(read(spec(tmp_path / "nope.jsonl")))


def test_unknown_format_is_named(tmp_path):
    with pytest.raises(ConfigError, match="format='csv'"):
        next(read(spec(tmp_path, format="csv")))


def test_instruction_data_joins_instruction_and_response_as_plain_text(tmp_path):
    from ipt.config import SourceConfig
    from ipt.data import sources as src

    f = tmp_path / "general.jsonl"
    f.write_text('{"instruction": "Name a colour.", "response": "Blue."}\n'
                 '{"instruction": "Say hi.", "response": ""}\n')
    spec = SourceConfig(name="general", path=str(f), text_field="instruction",
                        response_field="response")
    doc, reject = list(src.read(spec))
    assert doc.text == "Name a colour.\n\nBlue."
    assert reject.reason == "no 'response' text"


def test_contents_are_the_files_read_with_their_sizes(tmp_path):
    from ipt.data.sources import contents

    write_lines(tmp_path / "a.jsonl", [b'{"text": "one"}'])
    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "sub" / "b.jsonl.gz", [b"not really gzip"])
    (tmp_path / "notes.txt").write_text("not read: the source is jsonl")
    assert contents(spec(tmp_path)) == {"a.jsonl": 16, "sub/b.jsonl.gz": 16}
    assert contents(spec(tmp_path / "a.jsonl")) == {"a.jsonl": 16}
    assert contents(spec("json", format="hf")) == {}
