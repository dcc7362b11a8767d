"""The synthesize stage's cache of generations: a resumed or re-run stage pays for none twice.

Each generation is appended (and flushed) the moment it arrives, so a kill, of the stage or
of its server, loses only the requests in flight.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO

from ipt.synth.backend import Result


class Cache:
    """Generations already paid for, one append-only jsonl file per group."""

    def __init__(self, path: Path, salt: str) -> None:
        self.path, self.salt = path, salt
        self.done: dict[str, Result] = {}
        self.file: IO[str] | None = None
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                self.done[row["key"]] = Result(row["text"], finish=row["finish"],
                                               tokens=row.get("tokens"))

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.salt}\n{prompt}".encode()).hexdigest()

    def get(self, prompt: str) -> Result | None:
        return self.done.get(self.key(prompt))

    def put(self, prompt: str, result: Result) -> None:
        """Keep a generation; failures are not kept (a re-run tries them again)."""
        if result.text is None:
            return
        key = self.key(prompt)
        self.done[key] = result
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")
        self.file.write(json.dumps({"key": key, "text": result.text, "finish": result.finish,
                                    "tokens": result.tokens}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class NoCache(Cache):
    """The rules miner costs nothing to rerun."""

    def __init__(self) -> None:
        self.done, self.file = {}, None

    def get(self, prompt: str) -> Result | None:
        return None

    def put(self, prompt: str, result: Result) -> None:
        pass
