"""Known third-party noise stays off the console and in the run's log; anything else, a real
warning included, still shows."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from ipt import quiet


@pytest.fixture
def console_and_file():
    """Handlers like a run's: the console (filtered by quiet) and train.log (not)."""
    root = logging.getLogger()
    console, file = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(console), logging.StreamHandler(file)]
    saved = root.handlers[:], root.level, logging.getLogger("DeepSpeed").propagate
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    quiet.route_to_log(handlers[0])
    yield console, file
    root.handlers[:], level, propagate = saved
    root.setLevel(level)
    logging.getLogger("DeepSpeed").propagate = propagate
    logging.captureWarnings(False)


def test_known_deepspeed_noise_goes_to_the_log_only(console_and_file):
    console, file = console_and_file
    logging.getLogger("DeepSpeed").warning("You are using ZeRO with an untested optimizer")
    assert "untested optimizer" not in console.getvalue()
    assert "untested optimizer" in file.getvalue()


def test_other_deepspeed_warnings_still_show(console_and_file):
    console, _ = console_and_file
    logging.getLogger("DeepSpeed").warning("NCCL timeout is shorter than the step")
    assert "NCCL timeout" in console.getvalue()


def test_torch_distributed_deprecations_go_to_the_log_and_real_warnings_show(console_and_file):
    console, file = console_and_file
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
                      stacklevel=1)
        warnings.warn("the learning rate is absurd", UserWarning, stacklevel=1)
    assert "all_gather_into_tensor" not in console.getvalue()
    assert "all_gather_into_tensor" in file.getvalue()
    assert "the learning rate is absurd" in console.getvalue()


def test_compiler_probe_lines_are_dropped_but_compiler_warnings_are_not():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        probe = logging.getLogger("compilers.C.base")
        probe.info("gcc -c /tmp/x/test.c -o /tmp/x/test.o")
        probe.warning("gcc: unrecognised option")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "test.c" not in stream.getvalue() and "unrecognised option" in stream.getvalue()


def test_prints_of_a_call_go_to_the_log_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="ipt.test"), \
            quiet.prints_to_log(logging.getLogger("ipt.test"), stderr=True):
        print("Processing zero checkpoint 'x'")
    assert caplog.records[0].levelno == logging.DEBUG
    assert "Processing zero checkpoint" in caplog.records[0].getMessage()
