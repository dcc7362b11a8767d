"""What a source yields for each record it finds: a document, or the reason it could not be
read (`ipt.data.sources`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    # Character spans of `text` whose tokens are trained on (SFT-style data); None: all.
    loss_spans: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class Reject:
    id: str  # the location, when the record has no readable id
    reason: str


Record = Doc | Reject
