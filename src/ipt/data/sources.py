"""Sources of raw documents: jsonl (plain or compressed), parquet, directories of text files,
and Hugging Face datasets (local files or `load_from_disk`, streaming or not).

Every source yields, in a fixed order, either a `Doc` or a `Reject` for each record it
finds. A record is never silently dropped. A malformed line, bytes that are not UTF-8, a
missing text field or an empty text become a `Reject` with its location and reason, and the
stream goes on. Document ids are deterministic: the record's own id field when configured,
else the file (relative to the source root) and line or row number. An id field may repeat
(a URL often does); a stage that keys records by id makes them unique itself.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipt.config import ConfigError, SourceConfig
from ipt.data import augmented
from ipt.data.records import Doc, Record, Reject

FORMATS = ("auto", "jsonl", "parquet", "text", "hf", "hf_disk", "synth", "synth_tuning")
SYNTH_FORMATS = ("synth", "synth_tuning")  # the synthesize stage's output (`ipt.data.augmented`)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.bz2", ".jsonl.xz",
                  ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        if (path / "stage.json").exists():
            return "synth"  # written by the synthesize stage: templated into text
        names = [p.name for p in path.rglob("*") if p.is_file()]
        if any(n.endswith(JSONL_SUFFIXES) for n in names):
            return "jsonl"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        return "text"
    if path.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    return "text"


def masked(spec: SourceConfig) -> bool:
    """Whether the source's documents train on part of their tokens only (a loss mask)."""
    return spec.segments_field is not None or spec.format == "synth_tuning"


def means_special_tokens(spec: SourceConfig) -> bool:
    """Whether `<s>` and `</s>` in the source's texts are BOS and EOS: only in synthesizer
    tuning data, written in the synthesizer's format. Anywhere else they are plain text."""
    return spec.format == "synth_tuning"


def check(spec: SourceConfig) -> str:
    """The resolved format; fails before any work when the source cannot be read at all."""
    if spec.format not in FORMATS:
        raise ConfigError(f"source {spec.name}: format={spec.format!r}; expected one of {FORMATS}")
    path = Path(spec.path)
    if spec.format != "hf" and not path.exists():
        raise ConfigError(f"source {spec.name}: path={spec.path!r} does not exist")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    if fmt in SYNTH_FORMATS:
        augmented.check(spec)
    if fmt in ("jsonl", "parquet", "text") and not files_of(path, fmt):
        raise ConfigError(f"source {spec.name}: no {fmt} files under {spec.path}")
    return fmt


def contents(spec: SourceConfig) -> dict[str, int]:
    """The files a source reads, by path under its root, with their sizes: what a resumed
    run compares to find a source that changed. Empty for a remote `hf` dataset."""
    path = Path(spec.path)
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    if fmt in ("jsonl", "parquet", "text"):
        found = files_of(path, fmt)
    elif fmt in SYNTH_FORMATS:
        found = sorted((path / "shards").glob("shard_*.jsonl"))
    elif fmt == "hf_disk":
        found = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return {}
    return {_rel(f, path): f.stat().st_size for f in found}


def files_of(path: Path, fmt: str) -> list[Path]:
    suffixes = {"jsonl": JSONL_SUFFIXES, "parquet": (".parquet",), "text": TEXT_SUFFIXES}[fmt]
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if fmt == "text" and not found:  # a directory of extension-less text files
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return found


def read(spec: SourceConfig) -> Iterator[Record]:
    """Every record of the source, in a deterministic order."""
    fmt = check(spec)
    root = Path(spec.path)
    if fmt == "jsonl":
        for f in files_of(root, fmt):
            yield from _jsonl(f, _rel(f, root), spec)
    elif fmt == "parquet":
        for f in files_of(root, fmt):
            yield from _parquet(f, _rel(f, root), spec)
    elif fmt == "text":
        for f in files_of(root, fmt):
            yield _text_file(f, f"{spec.name}/{_rel(f, root)}")
    elif fmt in SYNTH_FORMATS:
        yield from augmented.read_augmented(spec) if fmt == "synth" \
            else augmented.read_tuning(spec)
    else:
        yield from _hf(spec, fmt)


def _rel(f: Path, root: Path) -> str:
    return f.name if root.is_file() else str(f.relative_to(root))


def _open_binary(f: Path) -> Any:
    name = f.name
    if name.endswith(".gz"):
        return gzip.open(f, "rb")
    if name.endswith(".bz2"):
        return bz2.open(f, "rb")
    if name.endswith(".xz"):
        return lzma.open(f, "rb")
    if name.endswith(".zst"):
        import zstandard  # optional: only for .zst files

        return zstandard.open(f, "rb")
    return open(f, "rb")  # noqa: SIM115 - closed by the caller's with-block


def _from_row(row: Any, loc: str, spec: SourceConfig) -> Record:
    if not isinstance(row, dict):
        return Reject(loc, f"record is a {type(row).__name__}, not an object")
    if spec.segments_field:
        return _from_segments(row, loc, spec)
    text = row.get(spec.text_field)
    if text is None:
        return Reject(loc, f"no {spec.text_field!r} field")
    if not isinstance(text, str):
        return Reject(loc, f"{spec.text_field!r} is a {type(text).__name__}, not a string")
    doc_id = str(row[spec.id_field]) if spec.id_field and spec.id_field in row else loc
    if spec.response_field:
        response = row.get(spec.response_field)
        if not isinstance(response, str) or not response.strip():
            return Reject(doc_id, f"no {spec.response_field!r} text")
        text = f"{text.strip()}\n\n{response.strip()}"
    if not text.strip():
        return Reject(doc_id, "empty text")
    return Doc(doc_id, text)


def _from_segments(row: dict, loc: str, spec: SourceConfig) -> Record:
    """A record of `[{"text": ..., "loss": bool}, ...]`: trained only where `loss` is true."""
    segments = row.get(spec.segments_field)
    if not isinstance(segments, list) or not all(
            isinstance(g, dict) and isinstance(g.get("text"), str) for g in segments):
        return Reject(loc, f"{spec.segments_field!r} is not a list of {{text, loss}} objects")
    doc_id = str(row[spec.id_field]) if spec.id_field and spec.id_field in row else loc
    spans, pos = [], 0
    for g in segments:
        if g.get("loss", True):
            spans.append((pos, pos + len(g["text"])))
        pos += len(g["text"])
    text = "".join(g["text"] for g in segments)
    if not text.strip():
        return Reject(doc_id, "empty text")
    return Doc(doc_id, text, tuple(spans))


def _jsonl(f: Path, rel: str, spec: SourceConfig) -> Iterator[Record]:
    try:
        with _open_binary(f) as fh:
            for n, raw in enumerate(fh, start=1):
                loc = f"{spec.name}/{rel}:{n}"
                if not raw.strip():
                    continue  # blank line: not a record
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Reject(loc, f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Reject(loc, f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield _from_row(row, loc, spec)
    except (OSError, EOFError, lzma.LZMAError) as e:  # truncated or corrupt compressed file
        yield Reject(f"{spec.name}/{rel}", f"unreadable file ({type(e).__name__}: {e}); "
                     "records after this point were not read")


def _parquet(f: Path, rel: str, spec: SourceConfig) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        yield Reject(f"{spec.name}/{rel}", f"not a readable parquet file ({e})")
        return
    columns = pf.schema_arrow.names
    if spec.text_field not in columns:
        yield Reject(f"{spec.name}/{rel}", f"wrong schema: no {spec.text_field!r} column "
                     f"(columns: {columns}); {pf.metadata.num_rows} rows not read")
        return
    wanted = [c for c in (spec.text_field, spec.response_field, spec.id_field) if c]
    row_no = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield _from_row(row, f"{spec.name}/{rel}:{row_no}", spec)


def _text_file(f: Path, loc: str) -> Record:
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(loc, f"not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
    if not text.strip():
        return Reject(loc, "empty text")
    return Doc(loc, text)


def _hf(spec: SourceConfig, fmt: str) -> Iterator[Record]:
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(spec.path)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ConfigError(f"source {spec.name}: split {spec.split!r} not in {list(ds)}")
            ds = ds[spec.split]
    else:
        ds = datasets.load_dataset(spec.path, data_files=spec.data_files, split=spec.split,
                                   streaming=spec.streaming)
    for n, row in enumerate(ds, start=1):
        yield _from_row(row, f"{spec.name}/{spec.split}:{n}", spec)
