"""Counting reads of tensor values into Python, for the tests that a step reads nothing back
(`tests/test_speed_options.py`) and for `tests/workers/device_skip.py`."""

from __future__ import annotations

import torch


class HostReads:
    """Counts reads of tensor values into Python (`item`, `tolist`, `bool`, `int`, `float`):
    on a GPU each one waits for the device. The count adds up over every `with` block."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self) -> None:
        self.count = 0
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

    def __enter__(self) -> HostReads:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def read(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)
        return read

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
