"""Learning-rate schedules: warm-up, cosine, warmup-stable-decay, re-warm-up."""

import pytest

from ipt.config import ScheduleConfig
from ipt.schedule import lr_multiplier


def curve(total=100, **kw):
    f = lr_multiplier(ScheduleConfig(**kw), total)
    return [f(s) for s in range(total)]


def test_warmup_rises_linearly_to_the_peak():
    c = curve(name="constant", warmup_steps=10)
    assert c[0] == pytest.approx(0.1) and c[9] == pytest.approx(1.0) and c[50] == 1.0


def test_cosine_decays_from_peak_to_floor():
    c = curve(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert c[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(c[10:], c[11:], strict=False))
    assert c[-1] == pytest.approx(0.1, abs=1e-3)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    c = curve(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0)
    assert set(c[5:80]) == {1.0}
    assert c[80] == 1.0 and c[90] == pytest.approx(0.5) and c[99] < 0.06


def test_rewarm_starts_from_a_fraction_of_the_peak():
    c = curve(name="cosine", warmup_steps=10, warmup_start_ratio=0.5)
    assert c[0] == pytest.approx(0.55) and c[9] == pytest.approx(1.0)
