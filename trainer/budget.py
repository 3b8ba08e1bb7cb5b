"""The data budget of a curriculum, shown by `python -m trainer.run CURRICULUM --dry-run`.

Per stage and source: the train tokens its shards hold (`tokens_available`, from the manifest), the
tokens the mixture schedule will draw from it (`tokens_planned`: the loader's rows of that source,
the exact integral of the schedule rounded as the loader rounds it, times seq_len), and `epochs`, how
many times the loader will read its data: planned rows / the rows it has (windows of seq_len+1 tokens
for stream packing, documents for document packing, best-fit rows for bestfit, whose tokens cropped
and padded it shows too), so the tail shorter than a window that each shard
leaves unused is counted as not there. More than 1.0 epoch means repetition, and the dry run warns,
naming the source. Over a staged curriculum the epochs of one shard directory add up across stages.
A source that is missing, incomplete or empty stops the dry run (trainer.data.DataError). s3:// sources
are not downloaded for a dry run: their figures are unknown (None).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import numpy as np

from shards.s3 import is_s3_uri

from .config import Config
from .data import DataError, open_source


@dataclass
class SourceBudget:
    name: str
    path: str
    tokens_available: int | None  # train tokens in the shards (None: s3://, not counted)
    tokens_planned: int  # tokens the schedule draws: rows of this source * seq_len
    epochs: float | None  # rows drawn / rows the source has (None: unknown)
    # bestfit packing: tokens of one pass over the data that no row holds, and row positions padded
    cropped: int | None = None
    padded: int | None = None


def stage_budget(cfg: Config) -> list[SourceBudget]:
    """The budget of one stage (at the world size it was resolved for); raises DataError for a
    missing or empty source."""
    seq = cfg.batch.seq_len
    rows = cfg.resolved.mixture.arrivals(np.array([cfg.resolved.total_tokens // seq], dtype=np.float64))[0]
    out = []
    for spec, n in zip(cfg.data.sources, rows.tolist()):
        if is_s3_uri(spec.path):
            out.append(SourceBudget(spec.name, str(spec.path), None, n * seq, None))
            continue
        source = open_source(spec.name, spec.path, "train", None, seq, cfg.data.packing)
        where = f"source '{spec.name}' ({spec.path}/train)"
        if source.reader.tokens == 0:
            raise DataError(f"{where}: the shards hold no tokens (an empty source)")
        if source.n == 0 and n:
            unit = f"window of {seq + 1} tokens" if cfg.data.packing == "stream" else source.unit
            raise DataError(f"{where}: {source.reader.tokens:,} tokens, not one {unit}")
        stats = getattr(source, "pack_stats", None)  # bestfit: counted when the plan was made, free here
        out.append(SourceBudget(spec.name, str(spec.path), source.reader.tokens, n * seq,
                                n / source.n if source.n else 0.0, stats and stats.cropped, stats and stats.padded))
    return out


def curriculum_budget(stages: list[list[SourceBudget]]) -> list[SourceBudget]:
    """Every stage's budget summed per shard directory (a source read in two stages repeats)."""
    merged: dict[str, SourceBudget] = {}
    for stage in stages:
        for b in stage:
            m = merged.get(b.path)
            if m is None:
                merged[b.path] = dataclasses.replace(b)
                continue
            m.tokens_planned += b.tokens_planned
            m.epochs = None if m.epochs is None or b.epochs is None else m.epochs + b.epochs
    return list(merged.values())


def print_budget(budget: list[SourceBudget], title: str = "data budget (train split)", out=None) -> list[str]:
    """A table, then one warning line per source read more than once; returns the warnings."""
    out = out or sys.stdout
    width = max(12, *(len(b.name) for b in budget))
    print(f"  {title}", file=out)
    print(f"    {'source':<{width}} {'available':>16} {'planned':>16} {'epochs':>8}", file=out)
    for b in budget:
        avail = f"{b.tokens_available:,}" if b.tokens_available is not None else "? (remote)"
        epochs = f"{b.epochs:.3f}" if b.epochs is not None else "?"
        print(f"    {b.name:<{width}} {avail:>16} {b.tokens_planned:>16,} {epochs:>8}", file=out)
        if b.cropped is not None and b.tokens_available:
            print(f"    {'':<{width}} bestfit, per epoch: {b.cropped:,} tokens cropped "
                  f"({b.cropped / b.tokens_available:.2%}), {b.padded:,} padded", file=out)
    warnings = [f"warning: source '{b.name}' ({b.path}) will be repeated: {b.epochs:.2f} epochs "
                f"({b.tokens_planned:,} tokens planned, {b.tokens_available:,} available)"
                for b in budget if b.epochs is not None and b.epochs > 1.0]
    for w in warnings:
        print(f"  {w}", file=out)
    return warnings
