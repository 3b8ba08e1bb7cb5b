"""The two softmax-attention mixers of Llama Think (docs/models.md, "Llama Think 95.7M").

GatedAttention ("full" layers): `wq` gives, per head, a query (first head_dim) and an output gate (last
head_dim); k, v with fewer heads (GQA); (1+w) RMSNorm on q and k; partial rotate-half RoPE; causal SDPA;
output * sigmoid(gate); `wo`.

CompressedSparseAttention ("csa" layers) = the same projections and two paths blended per channel:
  local       softmax attention over keys j in [i - window + 1, i]   (window 64)
  compressed  softmax attention over block summaries: block c = tokens [4c, 4c+4);
              key   = compress_k(mean of the block's normed, pre-RoPE keys), RoPE'd at position 4c + 2
              value = compress_v(mean of the block's values)
              query i sees block c only once the block is complete (i >= 4(c+1)); rows that see no
              block (the first 4 tokens) give 0, not NaN.
  ctx = blend * compressed + (1 - blend) * local, blend = sigmoid(blend_gate(x)); then * sigmoid(gate), wo.

Parameter names follow the authors' llama2.c fork (wq, wk, wv, wo, q_norm, k_norm, compress_k, compress_v,
blend_gate). Both classes read/write the model's KVCache: "k"/"v" through cache.update_kv; CSA also keeps
the normed pre-RoPE keys ("k_pre") because block summaries are built from them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.layers import KVCache, RMSNorm, apply_rope, causal_attention, masked_attention, rope_cos_sin


class GatedAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer: int,
                 rope_dims: int, norm_eps: float = 1e-6):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv_heads, head_dim
        self.rope_dims = rope_dims
        self.scale = head_dim ** -0.5  # 1/8 for head_dim 64, as in the source
        self.wq = nn.Linear(dim, n_heads * 2 * head_dim, bias=False)  # query | gate, per head
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps, fp32=True, unit_offset=True)
        self.k_norm = RMSNorm(head_dim, eps=norm_eps, fp32=True, unit_offset=True)

    def project(self, x, cos, sin):
        """-> q (RoPE'd) [B,T,H,D], gate [B,T,H,D], k_pre (normed, pre-RoPE) and k [B,T,Hkv,D], v."""
        B, T, _ = x.shape
        qg = self.wq(x).view(B, T, self.n_heads, 2 * self.hd)
        q, gate = qg[..., : self.hd], qg[..., self.hd:]
        k_pre = self.k_norm(self.wk(x).view(B, T, self.n_kv, self.hd))
        v = self.wv(x).view(B, T, self.n_kv, self.hd)
        q = apply_rope(self.q_norm(q), cos, sin, "half", self.rope_dims)
        k = apply_rope(k_pre, cos, sin, "half", self.rope_dims)
        return q, gate, k_pre, k, v

    def finish(self, ctx, gate):
        """ctx [B,T,H,D] -> output gate and projection."""
        B, T = ctx.shape[:2]
        y = ctx * torch.sigmoid(gate)
        return self.wo(y.reshape(B, T, self.n_heads * self.hd))

    def attend(self, q, k, v, window: int | None = None):
        """Causal (optionally windowed) attention in this module's [B,T,H,D] layout."""
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(causal_attention(t(q), t(k), t(v), self.scale, window))

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        q, gate, _, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update_kv(self.layer, k, v)
        return self.finish(self.attend(q, k, v), gate)


class CompressedSparseAttention(GatedAttention):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer: int, rope_dims: int,
                 rope_theta: float, norm_eps: float = 1e-6, window: int = 64, block: int = 4):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, layer, rope_dims, norm_eps)
        self.window, self.block, self.rope_theta = window, block, rope_theta
        kv_dim = n_kv_heads * head_dim
        self.compress_k = nn.Linear(kv_dim, kv_dim, bias=False)
        self.compress_v = nn.Linear(kv_dim, kv_dim, bias=False)
        self.blend_gate = nn.Linear(dim, n_heads * head_dim, bias=False)

    def summaries(self, k_pre, v, first: int, n: int):
        """Keys (RoPE'd at each block's centre) and values [B, n, Hkv, D] of blocks first..first+n-1,
        from the normed pre-RoPE keys and the values of their positions."""
        B, kv = k_pre.shape[0], self.n_kv * self.hd
        s, e = first * self.block, (first + n) * self.block
        bk = self.compress_k(k_pre[:, s:e].reshape(B, n, self.block, kv).mean(2)).view(B, n, self.n_kv, self.hd)
        bv = self.compress_v(v[:, s:e].reshape(B, n, self.block, kv).mean(2)).view(B, n, self.n_kv, self.hd)
        centre = torch.arange(first, first + n, device=k_pre.device) * self.block + self.block // 2
        cos, sin = rope_cos_sin(centre, self.rope_dims, self.rope_theta)
        return apply_rope(bk, cos, sin, "half", self.rope_dims), bv

    def compressed(self, q, bk, bv, pos0: int):
        """Attention over completed block summaries bk, bv [B, n_blocks, Hkv, D]; q [B,T,H,D] at
        positions pos0..pos0+T-1. -> [B,T,H,D]."""
        T, n_blocks = q.shape[1], bk.shape[1]
        if n_blocks == 0:
            return q.new_zeros(q.shape)
        qpos = torch.arange(pos0, pos0 + T, device=q.device)
        ends = (torch.arange(n_blocks, device=q.device) + 1) * self.block
        mask = qpos[:, None] >= ends[None, :]  # [T, n_blocks]: block complete before query i
        sees_any = mask[:, 0]
        # A row with no visible block would softmax over nothing (NaN, and NaN gradients). Let it see
        # block 0 instead, then zero the row: finite forward and backward, and exactly 0 output.
        mask = mask | ((~sees_any)[:, None] & (torch.arange(n_blocks, device=q.device) == 0)[None, :])
        y = masked_attention(q.transpose(1, 2), bk.transpose(1, 2), bv.transpose(1, 2), self.scale, mask=mask)
        return y.transpose(1, 2) * sees_any[None, :, None, None].to(y.dtype)

    def cached_summaries(self, st: dict, k_pre, v, max_len: int):
        """Decoding: block summaries live in the cache, and only blocks completed by this call are
        built, so a new token costs the same whatever the context length."""
        done, total = st.get("blocks", 0), k_pre.shape[1] // self.block
        if total > done:
            bk, bv = self.summaries(k_pre, v, done, total - done)
            if "bk" not in st:
                n = max_len // self.block
                st["bk"], st["bv"] = bk.new_empty((bk.shape[0], n, *bk.shape[2:])), bv.new_empty((bv.shape[0], n, *bv.shape[2:]))
            st["bk"][:, done:total], st["bv"][:, done:total] = bk, bv
            st["blocks"] = total
        if total == 0:
            return k_pre[:, :0], v[:, :0]
        return st["bk"][:, :total], st["bv"][:, :total]

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, gate, k_pre, k, v = self.project(x, cos, sin)
        if cache is None:
            pos0, n_blocks = 0, T // self.block
            bk, bv = self.summaries(k_pre, v, 0, n_blocks)
        else:
            pos0 = cache.pos
            k, v = cache.update_kv(self.layer, k, v)  # checks max_len first
            st = cache.layers[self.layer]
            if "k_pre" not in st:
                st["k_pre"] = k_pre.new_empty((B, cache.max_len, self.n_kv, self.hd))
            st["k_pre"][:, pos0:pos0 + T] = k_pre
            bk, bv = self.cached_summaries(st, st["k_pre"][:, :pos0 + T], v, cache.max_len)
        local = self.attend(q, k, v, self.window)
        comp = self.compressed(q, bk, bv, pos0)
        blend = torch.sigmoid(self.blend_gate(x)).view(B, T, self.n_heads, self.hd)
        return self.finish(blend * comp + (1 - blend) * local, gate)
