"""Document ids in the synthesis stages: unique names for repeated ids, and the held-out key.

A source's id field may repeat (a URL often does: the same page crawled twice). The
synthesize stage keys chains, links and re-runs by id, so it names a repeat of `x` as `x#2`,
`x#3`, ...; the reading-comprehension tasks name documents the same way.

What is held out, though, is decided by the id the source gives, in every stage: the prepare
stage reads a source as it is (`is_valid_doc(doc.id, ...)` on the source's own ids), so the
copies of a repeated id are all held out or all trained on. Holding out by the new name
would train on one copy of a text and ask the held-out tasks about another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ipt.data import sources as src
from ipt.data.prepare import is_valid_doc


@dataclass(frozen=True)
class RenamedDoc(src.Doc):
    """A document whose id an earlier document of the run has: kept under a new id."""

    input_id: str = ""


def unique_ids(records: Iterator[src.Record]) -> Iterator[src.Record]:
    """The records with each repeat of a document id `x` renamed `x#2`, `x#3`, ... (the next
    suffix no document has), so that no document overwrites another."""
    # Every id of the run is remembered: a repeat may come from anywhere in the source.
    taken: set[str] = set()
    last_suffix: dict[str, int] = {}
    for r in records:
        if isinstance(r, src.Doc):
            if r.id in taken:
                n = last_suffix.get(r.id, 1) + 1
                while f"{r.id}#{n}" in taken:  # the source has that id itself
                    n += 1
                last_suffix[r.id] = n
                r = RenamedDoc(f"{r.id}#{n}", r.text, r.loss_spans, input_id=r.id)
            taken.add(r.id)
        yield r


def source_id(doc: src.Doc) -> str:
    """The id the source gives the document, before any renaming."""
    return doc.input_id if isinstance(doc, RenamedDoc) else doc.id


def held_out(doc: src.Doc, valid_fraction: float) -> bool:
    """Whether the prepare stage holds the document out of training: by its source id."""
    return is_valid_doc(source_id(doc), valid_fraction)
