"""What every entry point shares: a known failure is one clear line and exit code 2; a run
stopped by a signal (after its checkpoint), or a synthesis whose server went away, exits with
`EXIT_REQUEUE`, which `launch/slurm.sbatch` and `launch/synthesize.sbatch` turn into
`scontrol requeue`."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from ipt.checkpoint import CheckpointError
from ipt.config import ConfigError
from ipt.data.shards import ShardError
from ipt.data.tokenizer import TokenizerError
from ipt.health import AnomalyError
from ipt.synth.backend import ServerGone
from ipt.trainer import Stopped

# EX_TEMPFAIL in sysexits.h: a temporary failure, worth retrying
EXIT_REQUEUE = 75

KNOWN = (ConfigError, CheckpointError, ShardError, TokenizerError, FileNotFoundError,
         AnomalyError)


def run(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except KNOWN as e:
        print(f"ipt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ServerGone as e:
        print(f"ipt: {e} (exit {EXIT_REQUEUE}: requeue)", file=sys.stderr)
        sys.exit(EXIT_REQUEUE)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"ipt: {e} (exit {EXIT_REQUEUE}: requeue)", file=sys.stderr)
        if e.signum is not None:
            previous = signal.getsignal(e.signum)
            if callable(previous):  # the launcher's own handler, e.g. submitit's: it requeues
                previous(e.signum, None)
        sys.exit(EXIT_REQUEUE)
