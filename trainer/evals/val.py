"""Validation loss and bits per byte, per source and overall, on the fixed val batches of each source.

Loss is the mean next-token cross-entropy over the counted targets (nats per token: comparable only
between runs with one tokenizer); bpb divides the same summed loss by the UTF-8 bytes those targets
stand for (trainer/evals/bpb.py), which compares across tokenizers. Every rank scores its share of
each source's batches; the sums are all-reduced, so each rank returns the same figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..parallel import Dist, is_sharded
from .bpb import bits_per_byte, loss_and_bytes


@dataclass
class ValResult:
    loss: dict[str, float] = field(default_factory=dict)  # per source, then "overall"
    bpb: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def val_metrics(model, eval_sets: dict, byte_table: torch.Tensor | None, device, autocast, d: Dist) -> ValResult:
    """byte_table None (the tokenizer cannot be loaded here): loss only."""
    was = model.training
    model.eval()
    out = ValResult()
    total = torch.zeros(3, dtype=torch.float64)  # summed loss (nats), targets, bytes
    for name, batches in eval_sets.items():
        sums = _source_sums(model, batches, byte_table, device, autocast, d)
        if sums[1] > 0:
            out.loss[name] = float(sums[0] / sums[1])
            if byte_table is not None:
                out.bpb[name] = bits_per_byte(float(sums[0]), int(sums[2]))
            total += sums
    if total[1] > 0:
        out.loss["overall"] = float(total[0] / total[1])
        if byte_table is not None:
            out.bpb["overall"] = bits_per_byte(float(total[0]), int(total[2]))
    model.train(was)
    return out


def _source_sums(model, batches, byte_table, device, autocast, d: Dist) -> torch.Tensor:
    """(summed loss, counted targets, bytes) of one source over all ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    table = byte_table if byte_table is not None else torch.zeros(model.config.vocab_size, dtype=torch.int64,
                                                                    device=device)
    mine = batches[d.rank :: d.world]
    # FSDP: each forward all-gathers, so every rank runs as many as the busiest (extra ones not counted)
    rounds = -(-len(batches) // d.world) if is_sharded(model) else len(mine)
    for i in range(rounds):
        x, y, mask = mine[i] if i < len(mine) else batches[0]
        x, y = x.to(device), y.to(device)
        mask = mask.to(device) if mask is not None else None
        with autocast():
            loss, nbytes = loss_and_bytes(model, x, y, mask, table)
        if i >= len(mine):
            continue
        n = mask.sum() if mask is not None else y.numel()
        sums += torch.stack([loss, torch.as_tensor(n, dtype=torch.float64, device=device), nbytes.double()])
    return d.sum(sums).cpu()
