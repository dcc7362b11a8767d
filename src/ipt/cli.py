"""What every entry point shares: a known failure is one clear line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ipt.checkpoint import CheckpointError
from ipt.config import ConfigError
from ipt.data.shards import ShardError
from ipt.data.tokenizer import TokenizerError

KNOWN = (ConfigError, CheckpointError, ShardError, TokenizerError, FileNotFoundError)


def run(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except KNOWN as e:
        print(f"ipt: error: {e}", file=sys.stderr)
        sys.exit(2)
