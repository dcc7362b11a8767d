"""The demo's data, built with the real stages: two raw corpora available offline, a
sentencepiece tokenizer trained on them, and token shards from the prepare stage.

- `raw/docstrings.jsonl`: documentation strings of the installed Python (jsonl source)
- `raw/packages/`: the long descriptions of the installed distributions (a directory of text)

Every step is skipped when its output exists, and the prepare stage resumes by itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from pathlib import Path

from ipt.config import DemoDataConfig, PrepareConfig, SourceConfig
from ipt.data import sources as src
from ipt.data import tokenizer as tok
from ipt.data.corpus import docstrings
from ipt.data.prepare import prepare

log = logging.getLogger(__name__)


def base_closure(root: str = "ipt") -> set[str] | None:
    """The distributions `root` needs without any extra, recursively (normalised names);
    None when `root` is not installed. The demo corpus reads these only, so installing an
    extra (lm-eval and its 40 dependencies, say) does not change it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        importlib.metadata.distribution(root)
    except importlib.metadata.PackageNotFoundError:
        return None
    seen: set[str] = set()
    todo = [canonicalize_name(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def package_descriptions(min_chars: int) -> dict[str, str]:
    """Name -> long description (markdown or reStructuredText) of each package ipt needs
    (`base_closure`; every installed one when ipt itself is not installed), but not ipt's
    own: its README changes with the project, and the demo's corpus (its tokenizer, and the
    tiny synthesizer trained on it) must not."""
    from packaging.utils import canonicalize_name

    closure = base_closure()
    wanted = None if closure is None else closure - {"ipt"}
    out = {}
    for dist in importlib.metadata.distributions():
        if wanted is not None and canonicalize_name(dist.metadata["Name"] or "") not in wanted:
            continue
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", dist.metadata["Name"] or "")
        if isinstance(body, str) and len(body) >= min_chars and name:
            out[name.lower()] = body
    return dict(sorted(out.items()))


def write_raw(cfg: DemoDataConfig, raw: Path) -> dict[str, SourceConfig]:
    raw.mkdir(parents=True, exist_ok=True)
    jsonl = raw / "docstrings.jsonl"
    if not jsonl.exists():
        tmp = jsonl.with_suffix(".tmp")
        with tmp.open("w") as f:
            for doc in docstrings(cfg.min_chars, cfg.max_docs):
                f.write(json.dumps(doc) + "\n")
        tmp.rename(jsonl)
    packages = raw / "packages"
    if not packages.is_dir():
        tmp_dir = raw / "packages.tmp"
        tmp_dir.mkdir(exist_ok=True)
        for name, text in package_descriptions(500).items():
            (tmp_dir / f"{name}.txt").write_text(text)
        tmp_dir.rename(packages)
    return {"docstrings": SourceConfig(name="docstrings", path=str(jsonl), id_field="id"),
            "packages": SourceConfig(name="packages", path=str(packages))}


def build_demo_data(cfg: DemoDataConfig) -> Path:
    out = Path(cfg.out)
    sources = write_raw(cfg, out / "raw")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        texts = [r.text for spec in sources.values() for r in src.read(spec)
                 if isinstance(r, src.Doc)]
        tok.train_sentencepiece(texts, tok_dir, cfg.vocab_size)
    prepare(PrepareConfig(sources=sources, tokenizer=str(tok_dir), out=str(out / "shards"),
                          docs_per_shard=cfg.docs_per_shard, workers=cfg.workers,
                          valid_fraction=cfg.valid_fraction, progress_bar="never"))
    return out
