"""Real prose available offline: the documentation strings of installed Python code.

Docstrings are human-written English about software, in the thousands on any machine with
Python; the demo and the tests pre-train on them. Files are parsed, never imported.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def python_roots() -> list[Path]:
    """The standard library, then site-packages: the same list on every run of one venv."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def docstrings(min_chars: int = 200, max_docs: int | None = None,
               roots: list[Path] | None = None) -> Iterator[dict]:
    """Yield `{"id", "text", "source"}` for each docstring of at least `min_chars`."""
    seen: set[str] = set()
    n = 0
    for root in roots or python_roots():
        for path in sorted(root.rglob("*.py")):
            if "test" in path.parts[-2:-1] or path.name.startswith("test_"):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                                  ast.AsyncFunctionDef):
                    continue
                text = ast.get_docstring(node)
                if not text or len(text) < min_chars:
                    continue
                digest = hashlib.sha1(text.encode()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                yield {"id": digest[:16], "text": text, "source": str(path.relative_to(root))}
                n += 1
                if max_docs is not None and n >= max_docs:
                    return
