"""Learning-rate schedules as plain functions of the step.

`lr_at(step, ...)` returns the absolute learning rate for optimizer step `step` (0-based, the rate
used for the update that produces step+1). Every optimizer group scales it by its own base lr over
the peak (`lr_multiplier`), so AdamW groups under Muon follow the same shape.

- wsd: linear warmup from 0, flat at peak, linear decay to min over the final `cooldown` steps
  (Argonne: cooldown 0 -> warmup then constant; min_lr_ratio 0.1 is then never reached).
- warmup_constant_cosine: linear warmup, constant, cosine to min over the final `decay` steps (Axiom).
- cosine: linear warmup then cosine to min over all remaining steps (Llama Think: to 0).
- constant: linear warmup then flat.
"""
from __future__ import annotations

import math
import typing

from .config import LRScheduleKind, LRScheduleSection


def min_lr_of(peak: float, sched: LRScheduleSection) -> float:
    if sched.min_lr is not None:
        return float(sched.min_lr)
    return peak * float(sched.min_lr_ratio or 0.0)


def warmup_factor(step: int, warmup: int) -> float:
    # (step+1)/warmup: the first update is not a wasted zero-lr step; reaches peak at step warmup-1.
    if warmup <= 0 or step >= warmup:
        return 1.0
    return (step + 1) / warmup


def _constant(step: int, peak: float, lo: float, total_steps: int, sched: LRScheduleSection) -> float:
    return peak


def _wsd(step: int, peak: float, lo: float, total_steps: int, sched: LRScheduleSection) -> float:
    start = total_steps - sched.cooldown
    if sched.cooldown <= 0 or step < start:
        return peak
    frac = min(1.0, (step - start + 1) / sched.cooldown)  # last step lands exactly on min
    return peak + (lo - peak) * frac


def _warmup_constant_cosine(step: int, peak: float, lo: float, total_steps: int, sched: LRScheduleSection) -> float:
    start = total_steps - sched.decay
    if sched.decay <= 0 or step < start:
        return peak
    frac = min(1.0, (step - start) / max(1, sched.decay - 1))
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * frac))


def _cosine(step: int, peak: float, lo: float, total_steps: int, sched: LRScheduleSection) -> float:
    span = max(1, total_steps - sched.warmup - 1)
    frac = min(1.0, (step - sched.warmup) / span)
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * frac))


# schedule.kind -> the LR after warmup; the kinds themselves are the config's LRScheduleKind
KINDS = {"constant": _constant, "wsd": _wsd, "warmup_constant_cosine": _warmup_constant_cosine, "cosine": _cosine}
assert set(KINDS) == set(typing.get_args(LRScheduleKind)), "every LRScheduleKind needs a function"


def lr_at(step: int, peak: float, total_steps: int, sched: LRScheduleSection) -> float:
    if step < sched.warmup:
        return peak * warmup_factor(step, sched.warmup)
    return KINDS[sched.kind](step, peak, min_lr_of(peak, sched), total_steps, sched)


def lr_multiplier(step: int, peak: float, total_steps: int, sched: LRScheduleSection) -> float:
    return lr_at(step, peak, total_steps, sched) / peak


def set_lr(optimizer, step: int, peak: float, total_steps: int, sched: LRScheduleSection) -> float:
    """Set every group's lr to its `base_lr` times the schedule's multiplier; returns the peak-scaled lr."""
    m = lr_multiplier(step, peak, total_steps, sched)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * m
    return peak * m
