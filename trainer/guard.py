"""Rollback on a bad step: a non-finite loss or gradient norm, or a loss spike, sends every rank back to
the last good checkpoint, in-process, and the offending step's batches are skipped exactly.

The loader is a pure function of the step, so "skip these batches" is a list of data steps never
trained on: training step t reads data step `data_step(t, skipped)`, the t-th step not in the list.
The list, the spike window and the rollback count ride in the train state, so a run resumed after a
rollback (or killed during one) is the same run, bit for bit. After `max_rollbacks` the run stops
with one line.

A spike is a train loss more than `spike_sigma` standard deviations above the mean of the trailing
`window` losses (once `min_history` are known); off unless spike_sigma is set, as a loss that rises
because the mixture moved to a harder source is not a fault.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class GuardState:
    skipped: list[int] = field(default_factory=list)   # data steps whose batches are never trained on
    history: list[float] = field(default_factory=list)  # trailing train losses (the spike window)
    rollbacks: int = 0


class BadStep(Exception):
    """Raised by the step, before its update, on every rank alike (the loss and norm are global)."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"step {step + 1}: {reason}")


def data_step(step: int, skipped: list[int]) -> int:
    """The data step training step `step` reads: the step-th (0-based) natural number not in `skipped`."""
    d = step
    for s in sorted(skipped):
        if s <= d:
            d += 1
    return d


def problem(loss: float, grad_norm: float | None, history: list[float], sigma: float | None,
            min_history: int) -> str | None:
    """Why this step must not be applied, or None."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    if sigma is not None and len(history) >= max(min_history, 2):
        mean, sd = statistics.fmean(history), statistics.pstdev(history)
        if loss > mean + sigma * sd:
            return f"loss spike: {loss:.4f} is more than {sigma:g} sd over the trailing mean {mean:.4f} (sd {sd:.4f})"
    return None


def remember(g: GuardState, loss: float, window: int) -> None:
    g.history = (g.history + [loss])[-window:]
