"""The synthesize stage's output as a source of the prepare stage (`ipt.data.sources`).

- format `synth`: pre-training text. Each chain of linked entries (a document and the ones
  that inherited from it) becomes one M-shot example rendered by `ipt.data.templates`;
  documents left raw, or whose synthesis failed or parsed to nothing, become their raw text.
- format `synth_tuning`: synthesizer tuning data in the released format. `shots` one-shot
  examples of the same source are concatenated into one sequence, with the loss only on the
  instruction-response tokens. The first `<s>` and the last `</s>` are left to the prepare
  stage, which adds BOS and EOS to every document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ipt.config import ConfigError, SourceConfig
from ipt.data import pairs as fmt
from ipt.data.pairs import Pair
from ipt.data.records import Doc, Record, Reject
from ipt.data.templates import render_chain


def check(spec: SourceConfig) -> None:
    root = Path(spec.path)
    summary = root / "summary.json"
    if not summary.exists():
        raise ConfigError(f"source {spec.name}: {spec.path} is not the output of the "
                          "synthesize stage (no summary.json)")
    s = json.loads(summary.read_text())
    if s["groups_done"] < s["groups_total"] and not spec.allow_partial:
        raise ConfigError(f"source {spec.name}: the synthesize stage in {spec.path} finished "
                          f"{s['groups_done']} of {s['groups_total']} shards; finish it, or "
                          "set allow_partial=true to use what is there")


def shards(spec: SourceConfig) -> Iterator[tuple[str, list[dict]]]:
    for f in sorted((Path(spec.path) / "shards").glob("shard_*.jsonl")):
        yield f.name, [json.loads(line) for line in f.read_text().splitlines()]


def read_augmented(spec: SourceConfig) -> Iterator[Record]:
    for _, rows in shards(spec):
        heir = {r["prev"]: r for r in rows if r.get("inherited")}
        for r in rows:
            if r.get("inherited"):
                continue  # rendered inside its chain, after its predecessor
            chain: list[tuple[str, list[Pair], str]] = []
            at: dict | None = r
            while at is not None:
                chain.append((at["text"], [Pair(**p) for p in at["pairs"]], at["id"]))
                at = heir.get(at["id"])
            # held out by the id the source gave (every copy of a repeated id alike)
            yield Doc(r.get("input_id", r["id"]), render_chain(chain, spec.template_seed))


def read_tuning(spec: SourceConfig) -> Iterator[Record]:
    for name, rows in shards(spec):
        group: list[dict] = []
        for r in rows:
            if r["status"] != "ok":
                yield Reject(r["id"], f"no pairs to tune on (status {r['status']})")
                continue
            group.append(r)
            if len(group) == spec.shots:
                yield tuning_doc(group, f"{name}:{group[0]['id']}")
                group = []
        if group:
            yield tuning_doc(group, f"{name}:{group[0]['id']}")


def tuning_doc(rows: list[dict], doc_id: str) -> Doc:
    """Few-shot examples in one sequence; loss spans cover each example's pairs and `</s>`."""
    text, spans = "", []
    for r in rows:
        read = r["text"][:r.get("read_chars", len(r["text"]))]
        text += fmt.context(read)
        pairs = fmt.render_pairs([Pair(**p) for p in r["pairs"]]) + fmt.EOS
        spans.append((len(text), len(text) + len(pairs)))
        text += pairs
    # The prepare stage adds the first BOS and the last EOS (always trained on) itself.
    text = text.removeprefix(fmt.BOS).removesuffix(fmt.EOS)
    shift = len(fmt.BOS)
    spans = [(max(0, a - shift), min(len(text), b - shift)) for a, b in spans]
    return Doc(doc_id, text, tuple(spans))
