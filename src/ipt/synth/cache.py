"""The synthesize stage's cache of generations: a resumed or re-run stage pays for none twice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ipt.synth.backend import Backend, Request, Result

# Requests per backend call, in units of the backend's parallelism (batch or concurrency):
# enough to keep it busy, few enough that a kill loses little before the cache has it.
CHUNK_PER_SLOT = 4


class Cache:
    """Generations already paid for, one append-only jsonl file per group."""

    def __init__(self, path: Path, salt: str) -> None:
        self.path, self.salt = path, salt
        self.done: dict[str, Result] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                self.done[row["key"]] = Result(row["text"], finish=row["finish"])

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.salt}\n{prompt}".encode()).hexdigest()

    def generate(self, backend: Backend, requests: list[Request]) -> list[Result]:
        results: list[Result | None] = [self.done.get(self.key(r.prompt)) for r in requests]
        todo = [i for i, r in enumerate(results) if r is None]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        c = backend.cfg
        size = CHUNK_PER_SLOT * (c.batch_size if c.kind == "hf" else c.concurrency)
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            fresh = backend.generate([requests[i] for i in chunk])
            with self.path.open("a") as f:
                for i, res in zip(chunk, fresh, strict=True):
                    results[i] = res
                    if res.text is not None:
                        key = self.key(requests[i].prompt)
                        self.done[key] = res
                        f.write(json.dumps({"key": key, "text": res.text,
                                            "finish": res.finish}) + "\n")
        return [r for r in results if r is not None]


class NoCache(Cache):
    """The rules miner costs nothing to rerun."""

    def __init__(self) -> None:
        self.done = {}

    def generate(self, backend: Backend, requests: list[Request]) -> list[Result]:
        return backend.generate(requests)
