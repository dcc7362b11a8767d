"""`python -m ipt.launch [torchrun options] script [args]`: torchrun, plus the exit status a
batch script needs to requeue a stopped run.

torchrun reports any failed rank as exit status 1, so a run that stopped on a signal
(`ipt.cli.EXIT_REQUEUE` from its ranks) would look like a crash. This wrapper runs torchrun in
this process and exits with `EXIT_REQUEUE` when the first rank to end did so, or when torchrun
itself was told to terminate (it has then passed the signal on to the ranks, which checkpoint
and stop). It also makes torchrun ignore SIGUSR1: SLURM's `--signal=USR1@<seconds>` goes to
every process of the job step, and the ranks, not their launcher, act on it (they install
their own handler; an ignored signal stays ignored only for entry points that don't).
"""

from __future__ import annotations

import signal
import sys

from ipt.cli import EXIT_REQUEUE


def rendezvous_host(argv: list[str]) -> tuple[str, str] | None:
    """The host of torchrun's `--rdzv_endpoint` or `--master_addr` option, and its name."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        flag = name.replace("-", "_")
        if flag in ("__rdzv_endpoint", "__master_addr"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            host = value.rsplit(":", 1)[0] if flag == "__rdzv_endpoint" else value
            return host.strip("[]"), name
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun

    from ipt.config import ConfigError
    from ipt.engine import check_resolvable

    found = rendezvous_host(sys.argv[1:] if argv is None else argv)
    if found is not None and found[0]:
        try:
            check_resolvable(found[0], f"torchrun {found[1]}; MASTER_ADDR in launch/*.sh")
        except ConfigError as e:
            print(f"ipt.launch: error: {e}", file=sys.stderr)
            return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        torchrun.main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == EXIT_REQUEUE:
            print(f"ipt.launch: the ranks stopped on a signal (rank {rank} first); exit "
                  f"{EXIT_REQUEUE} so that a batch script requeues the job", file=sys.stderr)
            return EXIT_REQUEUE
        return 1
    except SignalException as e:
        print(f"ipt.launch: got {e.sigval.name}, passed it to the ranks, which checkpoint and "
              f"stop; exit {EXIT_REQUEUE}", file=sys.stderr)
        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
