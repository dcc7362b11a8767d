"""Third-party noise kept off the console, so a run's own progress and results are what a
person reads there; `train.log` keeps the details.

Known noise, each harmless here:
- DeepSpeed, at import on a machine without a GPU: "Setting accelerator to CPU ...";
- DeepSpeed, when ZeRO wraps torch's AdamW (ipt's choice): "untested optimizer";
- the compiler command lines of DeepSpeed's op builder probing for libaio, which setuptools'
  compiler classes log at import;
- DeepSpeed's own prints on CPU ("... built successfully") and while consolidating ZeRO
  partitions for an export ("Processing zero checkpoint ...");
- deprecation warnings from torch.distributed that DeepSpeed's calls trigger;
- transformers' "Loading weights" bar for every model it loads, when stderr is not a
  terminal (`HF_HUB_DISABLE_PROGRESS_BARS`, unless set);
- lm-evaluation-harness's progress lines and its warnings that a pre-loaded model or a
  default setting is used (`ipt.evaluate`).

Two mechanisms, by when the noise comes. What comes at import, before a run has a log file,
is dropped by filters or levels on the loggers that emit it (`install`, run when `ipt` is
imported).
What comes during a run goes to the log file only: `route_to_log` hands DeepSpeed's logger
and Python's warnings to the root logger, whose console handler skips known noise while the
file handler records everything. Anything not listed here, a real warning included, still
reaches the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator

AT_IMPORT = {"DeepSpeed": re.compile(r"Setting accelerator to")}
# The loggers of setuptools' compiler classes (and of distutils before them): their INFO
# lines are the commands of DeepSpeed's op-builder probes; their warnings still show.
COMPILER_LOGGERS = ("compilers", "distutils")
ON_CONSOLE = {
    "DeepSpeed": re.compile(r"untested optimizer|Setting accelerator to"),
    "py.warnings": re.compile(r"`torch\.distributed\.\w+` is deprecated"),
}


class _Drop(logging.Filter):
    def __init__(self, rules: dict[str, re.Pattern[str]]) -> None:
        super().__init__()
        self.rules = rules

    def filter(self, record: logging.LogRecord) -> bool:
        rule = self.rules.get(record.name)
        return rule is None or rule.search(record.getMessage()) is None


def install() -> None:
    """Drop the import-time noise: a filter on each logger that emits it."""
    for name, rule in AT_IMPORT.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop({name: rule}))
    for name in COMPILER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # progress bars are for a terminal (as ipt's own)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def route_to_log(console: logging.Handler) -> None:
    """During a run: DeepSpeed's records and Python's warnings through the root logger's
    handlers, `console` skipping the known noise (the file handler keeps it)."""
    deepspeed = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed.handlers):
        deepspeed.removeHandler(handler)  # its own stdout handler
    deepspeed.propagate = True
    logging.captureWarnings(True)
    console.addFilter(_Drop(ON_CONSOLE))


@contextlib.contextmanager
def prints_to_log(logger: logging.Logger, stderr: bool = False) -> Iterator[None]:
    """What a third-party call prints to stdout (and, with `stderr`, its progress bars on
    stderr) goes to `logger` at debug level instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), \
            contextlib.redirect_stderr(buffer) if stderr else contextlib.nullcontext():
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("%s", line)
