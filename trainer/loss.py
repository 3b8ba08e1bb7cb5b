"""The training loss: mean next-token cross-entropy over the tokens that count (all of them, or where a
`.ds.loss` mask is 1).

Two ways to the same number. `compute_loss` takes the full [tokens, vocab] logits. `linear_cross_entropy`
takes the final hidden states and the head weight and never holds more than one chunk of logits: at
Argonne's 151,669 ids the full logits of a 38 x 1,024-token micro-batch are 23.6 GB in fp32, and the
softcap, log-softmax and their gradients keep several such tensors alive at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk unless `train.loss_chunk` says otherwise. At Argonne's vocabulary a chunk's fp32
# logits are 1.2 GB (a few such buffers live at once); at small vocabularies the chunks are cheap and
# few, so one default serves every model.
LOSS_CHUNK = 2048
IGNORE_INDEX = -100  # F.cross_entropy's default, which compute_loss inherits


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


# ------------------------------------------------------------------------- chunked head + loss

@torch.compiler.disable  # eager under torch.compile: a graph break around matmul-bound work costs little
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, softcap: float | None = None,
                         chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """compute_loss(logits, targets, mask) for logits = softcap(hidden @ weight.T) in fp32, computed
    `chunk` tokens at a time: no [tokens, vocab] tensor, nor its gradient, exists at once.

    hidden [..., D] (after the final norm), weight [V, D] (the tied embedding or the head: the gradient
    goes to whichever it is), targets and mask shaped like hidden without D. The matmuls run in the
    autocast dtype where autocast is on (as F.linear would), everything after them in fp32.
    """
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1 tokens, got {chunk}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0, got {softcap}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    scale = _token_scale(y, mask)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, y, scale, softcap, chunk)
    return _chunked(h, weight, y, scale, softcap, chunk, want=(False, False))[0]


def _token_scale(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each token's weight in the mean, fp32: compute_loss's denominators, ignore_index included (F's
    mean divides by the targets it does not ignore; the masked form divides by the mask's sum)."""
    keep = (y != IGNORE_INDEX).float()
    if mask is None:
        return keep / keep.sum()
    m = mask.reshape(-1).float()
    return m * keep / m.sum().clamp(min=1.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in forward, chunk by chunk, while each chunk's logits exist anyway:
    recomputing them in backward instead would add a third to the head's matmul work. Backward only
    scales them by the incoming gradient (a scalar: 1, or the accumulation factor)."""

    @staticmethod
    def forward(ctx, h, weight, y, scale, softcap, chunk):
        want = ctx.needs_input_grad[:2]
        loss, grad_h, grad_w = _chunked(h, weight, y, scale, softcap, chunk, want)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: an [V, D] copy would be the largest transient of the whole backward. A second
        # backward through the same graph then fails autograd's version check instead of going wrong.
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_loss) if ctx.needs_input_grad[0] else None
        gw = grad_w.mul_(grad_loss) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype F.linear(h, weight) would use here: autocast's, else the promoted input dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunked(h, weight, y, scale, softcap, chunk, want):
    """(loss, grad wrt h or None, grad wrt weight or None) of sum_i scale_i * CE_i, chunk by chunk.

    The weight gradient accumulates in fp32 across chunks (F.linear's backward would reduce all tokens
    in one matmul, fp32-accumulated inside), then takes the weight's dtype; the hidden gradient takes h's.
    """
    cd = _compute_dtype(h, weight)
    with torch.autocast(h.device.type, enabled=False):  # the casts below are explicit
        w = weight.to(cd)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want[1] else None
        for i in range(0, h.shape[0], chunk):
            h_c = h[i:i + chunk].to(cd)
            part, g = _chunk_loss(h_c, w, y[i:i + chunk], scale[i:i + chunk], softcap, any(want))
            loss += part
            if g is None:
                continue
            g = g.to(cd)
            if grad_h is not None:
                grad_h[i:i + chunk] = g @ w
            if grad_w is not None:
                _accumulate(grad_w, g.t(), h_c)
        return loss, grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b; fp32 operands add in place (no [V, D] temporary); lower-precision ones are
    multiplied in their dtype, as F.linear's backward would, and summed in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def _chunk_loss(h_c, w, y_c, scale_c, softcap, grad: bool):
    """One chunk: (sum of scale * CE, d(that sum)/d(pre-softcap logits) in fp32, or None).

    Written for few passes over [chunk, V] (the head's elementwise work is memory-bound, as large as
    its matmuls on a GPU) and two such fp32 buffers: z, then e, which becomes the gradient in place.
    """
    z = F.linear(h_c, w).float()
    c = 1.0
    if softcap is not None:  # logits = c * z with z = tanh(raw / c); z itself gives the derivative
        z.div_(softcap).tanh_()
        c = softcap
    m = z.amax(dim=-1) * c                                  # c > 0: the max logit
    e = torch.add(-m[:, None], z, alpha=c).exp_()           # exp(logits - max)
    s = e.sum(dim=-1)
    y_c = y_c.clamp(min=0)[:, None]                         # ignored targets have scale 0
    part = ((m + s.log() - c * z.gather(1, y_c).squeeze(1)) * scale_c).sum()
    if not grad:
        return part, None
    e.mul_((scale_c / s)[:, None])                          # softmax, times the token's weight
    e.scatter_add_(1, y_c, -scale_c[:, None])               # minus the one-hot, likewise
    if softcap is not None:                                 # d(c tanh(x / c))/dx = 1 - tanh^2
        e.addcmul_(e, z.square_(), value=-1.0)
    return part, e
