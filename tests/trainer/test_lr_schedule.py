"""LR schedules vs their closed forms (written out independently here)."""
import math

import pytest

from trainer.config import LRScheduleSection
from trainer.lr_schedule import lr_at

PEAK = 3e-4


def closed_wsd(s, total, warmup, cooldown, lo):
    if s < warmup:
        return PEAK * (s + 1) / warmup
    if s < total - cooldown:
        return PEAK
    return PEAK - (PEAK - lo) * (s - (total - cooldown) + 1) / cooldown


def closed_wcc(s, total, warmup, decay, lo):
    if s < warmup:
        return PEAK * (s + 1) / warmup
    start = total - decay
    if s < start:
        return PEAK
    t = (s - start) / (decay - 1)
    return lo + (PEAK - lo) * (1 + math.cos(math.pi * t)) / 2


def closed_cos(s, total, warmup, lo):
    if s < warmup:
        return PEAK * (s + 1) / warmup
    t = (s - warmup) / (total - warmup - 1)
    return lo + (PEAK - lo) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("total,warmup,cooldown,ratio", [(100, 10, 20, 0.1), (50, 0, 10, 0.0), (1000, 100, 0, 0.1)])
def test_wsd(total, warmup, cooldown, ratio):
    sch = LRScheduleSection(kind="wsd", warmup=warmup, cooldown=cooldown, min_lr_ratio=ratio)
    got = [lr_at(s, PEAK, total, sch) for s in range(total)]
    want = [closed_wsd(s, total, warmup, cooldown, PEAK * ratio) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if cooldown:
        assert got[-1] == pytest.approx(PEAK * ratio)  # decays all the way to min
    else:
        assert got[-1] == PEAK  # Argonne: cooldown 0 -> stable phase only
    if warmup:
        assert got[warmup - 1] == PEAK and got[0] == pytest.approx(PEAK / warmup)


def test_warmup_constant_cosine_axiom_sft():
    # Axiom SFT: 641 steps, warmup 51, cosine over the last 102 steps (from step 539), 3e-4 -> 3e-5
    sch = LRScheduleSection(kind="warmup_constant_cosine", warmup=51, decay=102, min_lr=3e-5)
    got = [lr_at(s, PEAK, 641, sch) for s in range(641)]
    want = [closed_wcc(s, 641, 51, 102, 3e-5) for s in range(641)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[538] == PEAK and got[539] == pytest.approx(PEAK) and got[540] < PEAK
    assert got[-1] == pytest.approx(3e-5)


def test_cosine_to_zero():
    sch = LRScheduleSection(kind="cosine", warmup=5, min_lr_ratio=0.0)
    got = [lr_at(s, 0.02, 100, sch) for s in range(100)]
    global PEAK
    old, PEAK = PEAK, 0.02
    try:
        want = [closed_cos(s, 100, 5, 0.0) for s in range(100)]
    finally:
        PEAK = old
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[4] == 0.02 and got[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(got[4:], got[5:]))  # monotone after warmup
