"""The data mixture schedule: each source's weight at points of the run, placed by tokens seen.

One type for the trainer. A curriculum's `data.schedule` places points at a fraction of the run (`at`)
or at a token count (`tokens`); `Config.mixture` turns both into `MixturePoint`s in tokens, and
`MixtureSchedule` checks them (the one check, which the config, the loader and the data budget
share) and integrates them for the loader. Not the learning-rate schedule (`schedule:` in a
curriculum, trainer/lr_schedule.py).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np


class MixtureError(ValueError):
    """A bad point: `index` into the points given (None: the schedule as a whole), `field` in it.
    `unknown` lists the weights naming no source (so a caller can suggest the closest name)."""

    def __init__(self, index: int | None, field_: str, message: str, unknown: list[str] = ()):
        self.index, self.field, self.message, self.unknown = index, field_, message, list(unknown)
        super().__init__(f"schedule[{index}].{field_}: {message}" if index is not None else f"schedule: {message}")


@dataclass
class MixturePoint:
    tokens: float  # position in the run: tokens seen
    weights: dict[str, float] = field(default_factory=dict)  # >= 0, normalised by the schedule


class MixtureSchedule:
    """Piecewise-linear normalised weights over row-time (tokens / seq_len), with an exact integral.

    Weights are normalised at each point (they need only be >= 0 and sum to > 0), then interpolated
    linearly, so they sum to 1 everywhere. Points are taken in order of `tokens` (a stable sort: two
    points at the same position give a hard switch, in the order given). Before the first point and
    after the last the weights are held constant.
    """

    def __init__(self, names: list[str], points: list[MixturePoint], seq_len: int):
        if len(set(names)) != len(names):
            raise MixtureError(None, "sources", f"duplicate source names {names}")
        if not points:
            raise MixtureError(None, "", "needs at least one point")
        xs, ws = [], []
        for i, p in enumerate(points):
            unknown = sorted(set(p.weights) - set(names))
            if unknown:
                raise MixtureError(i, "weights", f"unknown source(s) {unknown} (sources: {names})", unknown)
            w = np.array([float(p.weights.get(n, 0.0)) for n in names])
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise MixtureError(i, "weights", f"must be finite and >= 0, got {p.weights}")
            if w.sum() <= 0:
                raise MixtureError(i, "weights", f"must sum to > 0, got {p.weights}")
            at = float(p.tokens)
            if not math.isfinite(at) or at < 0:
                raise MixtureError(i, "tokens", f"must be >= 0, got {p.tokens}")
            xs.append(at / seq_len)  # row units
            ws.append(w / w.sum())
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs, ws = [xs[i] for i in order], [ws[i] for i in order]
        if xs[0] > 0:  # hold the first weights from the start
            xs.insert(0, 0.0)
            ws.insert(0, ws[0])
        self.names = names
        self.x = np.array(xs)
        self.w = np.stack(ws)  # [P, S]
        self.seq_len = seq_len
        seg = np.diff(self.x)[:, None] * (self.w[1:] + self.w[:-1]) / 2
        self.cum = np.concatenate([np.zeros((1, len(names))), np.cumsum(seg, axis=0)])  # E at each point
        dx = np.diff(self.x)[:, None]
        slope = np.where(dx > 0, np.diff(self.w, axis=0) / np.where(dx > 0, dx, 1.0), 0.0)
        self.slope = np.concatenate([slope, np.zeros((1, len(names)))])  # per segment; flat after the last point
        self._xs = self.x.tolist()

    def weights(self, rows: float) -> np.ndarray:
        i = min(max(bisect.bisect_right(self._xs, rows) - 1, 0), len(self._xs) - 1)
        if i == len(self.x) - 1:
            return self.w[i].copy()
        t = (rows - self.x[i]) / (self.x[i + 1] - self.x[i])
        return self.w[i] + t * (self.w[i + 1] - self.w[i])

    def arrivals(self, rows: np.ndarray) -> np.ndarray:
        """A[b, s]: how many of the first b rows are source s, the integral rounded to the nearest
        row (the rule the loader assigns rows by, and the budget counts them by)."""
        return np.floor(self.integral(rows) + 0.5).astype(np.int64)

    def integral(self, rows: np.ndarray) -> np.ndarray:
        """E[b, s]: expected number of rows of source s among the first b rows (b may be fractional)."""
        b = np.asarray(rows, dtype=np.float64)
        last = len(self.x) - 1
        i = np.minimum(np.maximum(np.searchsorted(self.x, b, side="right") - 1, 0), last)
        t = (b - self.x[i])[:, None]
        return self.cum[i] + self.w[i] * t + self.slope[i] * t * t / 2
