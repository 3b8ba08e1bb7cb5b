"""The training loss: mean next-token cross-entropy over the tokens that count (all of them, or where a
`.ds.loss` mask is 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the tokens that count: all of them, or where the `.ds.loss` mask is 1."""
    V = logits.size(-1)
    if mask is None:
        return F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
    ce = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def loss_tokens(y: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many targets of a micro-batch count towards the loss."""
    return int(mask.sum()) if mask is not None else y.numel()
