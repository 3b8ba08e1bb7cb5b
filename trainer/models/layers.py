"""Building blocks shared by every architecture: RMSNorm, RoPE, SwiGLU, the KV/state cache, and the
CausalLM trunk (embed -> blocks -> norm -> head) each model family subclasses.

Tensor layout convention: activations are [B, T, ...]; attention heads are [B, T, H, D] until the
SDPA call, which wants [B, H, T, D].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """RMSNorm over the last dim.

    unit_offset=False: y = norm(x) * w, w initialised to 1 (Llama, Axiom, Argonne).
    unit_offset=True:  y = norm(x) * (1 + w), w initialised to 0 (Gemma, Llama Think).
    fp32=True normalises in float32 and casts back to the input dtype before the weight multiply,
    which is what Argonne and Llama Think do under bf16 autocast (and what HF Llama does).
    """

    def __init__(self, dim: int, eps: float = 1e-6, fp32: bool = True, unit_offset: bool = False,
                 elementwise_affine: bool = True):
        super().__init__()
        self.dim, self.eps, self.fp32, self.unit_offset = dim, eps, fp32, unit_offset
        self.weight = nn.Parameter(torch.empty(dim)) if elementwise_affine else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None and self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.fill_(0.0 if self.unit_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and not self.unit_offset and (x.dtype == torch.float32 or not self.fp32):
            # same math, one fused call (x already fp32, or no upcast wanted)
            return F.rms_norm(x, (self.dim,), self.weight.to(x.dtype), eps=self.eps)
        y = x.float() if self.fp32 else x
        y = F.rms_norm(y, (self.dim,), eps=self.eps).to(x.dtype)
        if self.weight is None:
            return y
        w = self.weight.to(x.dtype)
        return y * (1.0 + w) if self.unit_offset else y * w

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, fp32={self.fp32}, unit_offset={self.unit_offset}"


# ---------------------------------------------------------------------------------------- RoPE

def rope_cos_sin(positions: torch.Tensor, rot_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, rot_dim // 2] for integer positions [T].

    Computed on the fly in fp32 (cheap: T x rot_dim/2) so nothing depends on buffers that a
    meta-device build would leave empty, and decoding at any offset needs no table resize.
    """
    if rot_dim % 2:
        raise ValueError(f"rotary dims must be even, got {rot_dim}")
    exps = torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.int64).float() / rot_dim
    inv_freq = 1.0 / (theta ** exps)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rope_full(cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> tuple[torch.Tensor, torch.Tensor]:
    """Widen [T, r/2] cos/sin to [T, r] in the pair order of `layout`. Do it once per forward and
    pass the result to apply_rope: rotation is then 2 multiplies + 1 add per tensor."""
    if layout == "half":
        return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    if layout == "interleaved":
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {layout!r}")


def _rotate(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The partner of each dim, signed: (x1, x2) -> (-x2, x1) for every rotation pair."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    if layout == "interleaved":
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {layout!r}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half",
               rot_dim: int | None = None, heads_first: bool = False) -> torch.Tensor:
    """Rotate the first rot_dim dims of x's last axis; the rest pass through (partial RoPE).

    x: [..., T, H, D] (heads after time), or [..., H, T, D] with heads_first=True (SDPA layout:
    rotating there keeps q/k contiguous for the attention kernel).
    cos/sin: [T, rot_dim // 2] from rope_cos_sin, or [T, rot_dim] from rope_full (cheaper).
    layout "half": pairs (i, i + rot_dim/2)  -- HF/GPT-NeoX rotate-half.
    layout "interleaved": pairs (2i, 2i+1)  -- Meta's original Llama / Axiom.
    """
    d = x.shape[-1]
    r = d if rot_dim is None else rot_dim
    if cos.shape[-1] != r:
        cos, sin = rope_full(cos, sin, layout)
    if not heads_first:  # [T, 1, r] broadcasts over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if r == d:
        return x * cos + _rotate(x, layout) * sin
    xr, xp = x[..., :r], x[..., r:]
    return torch.cat((xr * cos + _rotate(xr, layout) * sin, xp), dim=-1)


# ---------------------------------------------------------------------------------------- MLP

class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); separate gate/up matrices so Muon orthogonalises each."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------- cache

class KVCache:
    """Decoding state: one mutable dict per layer plus the number of positions already consumed.

    Attention layers keep "k"/"v" (via update_kv); recurrent layers keep whatever state they need
    (e.g. "conv", "ssm"). model.forward(ids, cache) reads positions from cache.pos and advances
    cache.pos by T once every layer has run.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int):
        self.layers: list[dict] = [dict() for _ in range(n_layers)]
        self.pos = 0
        self.batch_size = batch_size
        self.max_len = max_len

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v ([B, T, Hkv, D]) at cache.pos; return all keys/values so far ([B, pos+T, Hkv, D]).

        Buffers are preallocated to max_len on first use so decoding does no quadratic re-copying.
        """
        st = self.layers[layer]
        t = k.shape[1]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        if "k" not in st:
            st["k"] = k.new_empty((k.shape[0], self.max_len, *k.shape[2:]))
            st["v"] = v.new_empty((v.shape[0], self.max_len, *v.shape[2:]))
        st["k"][:, self.pos:end] = k
        st["v"][:, self.pos:end] = v
        return st["k"][:, :end], st["v"][:, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.layers = [dict() for _ in self.layers]
        self.pos = 0


def causal_mask(t_q: int, t_k: int, device, window: int | None = None) -> torch.Tensor:
    """Boolean [t_q, t_k] mask (True = attend); queries are the last t_q of t_k positions.

    window = number of keys visible including the query itself (HF/Gemma convention): key j is
    visible to query i iff i - window < j <= i.
    """
    qi = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    kj = torch.arange(t_k, device=device)[None, :]
    m = kj <= qi
    if window is not None:
        m = m & (kj > qi - window)
    return m


# ---------------------------------------------------------------------------------------- attention


def masked_attention(q, k, v, scale: float, mask=None, is_causal: bool = False):
    """SDPA on [B, H, T, D] with GQA (k, v may have fewer heads). Without a mask GQA is native; with an
    explicit mask on CUDA the (few) kv heads are repeated, so the masked memory-efficient kernel stays
    eligible."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)


def causal_attention(q, k, v, scale: float, window: int | None = None):
    """The one causal-attention dispatcher: q [B, H, T, D] are the last T of k's t_k positions (a
    cache may hold a past); `window` = keys visible per query, itself included (None: all before it).

    Keys no query can see are cut off first; then the cheapest exact form: a single new token over
    every kept key (no mask), plain causal over a whole sequence (flash / memory-efficient kernels on
    GPU), else an explicit [T, t_k] mask.
    """
    T, t_k = q.shape[2], k.shape[2]
    if window is not None and t_k > T + window - 1:
        k, v = k[:, :, t_k - (T + window - 1):], v[:, :, t_k - (T + window - 1):]
        t_k = k.shape[2]
    if T == 1 and (window is None or t_k <= window):
        return masked_attention(q, k, v, scale)
    if T == t_k and (window is None or T <= window):
        return masked_attention(q, k, v, scale, is_causal=True)
    return masked_attention(q, k, v, scale, mask=causal_mask(T, t_k, q.device, window))


# ---------------------------------------------------------------------------------------- LM trunk

class CausalLM(nn.Module):
    """embed -> blocks -> final norm -> tied/untied head -> fp32 logits, shared by every family.

    A subclass passes its block factory and final norm, implements init_weights() and rope() (the
    cos/sin tables its blocks take; blocks are called as blk(x, cos, sin, cache)), and may ask for
    a final logit softcap: logits <- c * tanh(logits / c).

    forward(ids) gives the logits; forward(ids, targets=y, loss_mask=m) gives the training loss
    instead, through the chunked head + cross-entropy (trainer.loss.linear_cross_entropy) so no
    [tokens, vocab] logits exist. `loss_chunk` is its tokens per chunk: None = trainer.loss.LOSS_CHUNK,
    0 = the full logits then compute_loss (the same number either way).
    """

    def __init__(self, config, block: Callable[[int], nn.Module], norm: nn.Module,
                 logit_softcap: float | None = None):
        super().__init__()
        self.config = c = config
        self.logit_softcap = logit_softcap
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(block(i) for i in range(c.n_layers))
        self.norm = norm
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.loss_chunk: int | None = None  # set from train.loss_chunk; not model state (no checkpoint entry)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        raise NotImplementedError

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [B, T, V]; with `targets` [B, T] (and an optional `loss_mask` [B, T]) the mean
        cross-entropy over the counted tokens instead, as trainer.loss.compute_loss defines it. The loss
        is computed here, not by the caller, so DDP/FSDP/compile wrappers see one ordinary forward."""
        x = self.hidden(input_ids, cache)
        if targets is None:
            return self.head(x)
        return self._loss(x, targets, loss_mask)

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, D] the head reads (advances `cache` past the input)."""
        T = input_ids.shape[1]
        pos0 = cache.pos if cache is not None else 0
        cos, sin = self.rope(torch.arange(pos0, pos0 + T, device=input_ids.device))
        x = self.embed(input_ids)
        c = self.config
        ckpt = c.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                x = checkpoint(blk, x, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def head_weight(self) -> torch.Tensor:
        """[V, D]: the embedding when tied, else the head's own weight."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-normed hidden states, softcapped where the model has a softcap."""
        logits = F.linear(x, self.head_weight()).float()
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        # Imported here, not at the top: an export carries this file without trainer/ (transformers'
        # wrapper asks for logits and computes its own loss, so never reaches this line).
        from trainer.loss import LOSS_CHUNK, compute_loss, linear_cross_entropy

        chunk = LOSS_CHUNK if self.loss_chunk is None else self.loss_chunk
        if chunk > 0:
            return linear_cross_entropy(x, self.head_weight(), targets, loss_mask, self.logit_softcap, chunk)
        return compute_loss(self.head(x), targets, loss_mask)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, batch_size, max_len or self.config.max_seq_len)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def param_kinds(self) -> dict[str, str]:
        """Optimizer roles: the (tied) embedding/head is "embedding"; every other >= 2-D weight is
        "matrix"; norm weights and other 1-D parameters are "vector"."""
        kinds = {}
        for name, p in self.named_parameters():
            if name.startswith("embed.") or name.startswith("lm_head."):
                kinds[name] = "embedding"
            else:
                kinds[name] = "matrix" if p.ndim >= 2 else "vector"
        return kinds
