"""One dense decoder-only transformer covering Atom, Axiom and Argonne (facts: docs/models.md).

Every difference between those models is a config option named for what it does, so a new dense
model is a new config (or preset), not a new file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.layers import (CausalLM, KVCache, RMSNorm, SwiGLU, apply_rope, causal_attention, rope_cos_sin,
                                   rope_full)

INIT_SCHEMES = ("gpt2", "depth_scaled", "fan_in")


@dataclass
class DenseConfig:
    arch: ClassVar[str] = "dense"  # the family name a curriculum's model.arch gives

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int                       # SwiGLU hidden size
    n_kv_heads: int | None = None      # None -> n_heads (MHA); fewer -> GQA
    head_dim: int | None = None        # None -> d_model // n_heads
    max_seq_len: int = 1024            # training context; default cache length for generation
    rope_theta: float = 10000.0
    rope_layout: str = "half"          # "half" (pairs i, i+D/2) | "interleaved" (pairs 2i, 2i+1)
    rope_dims: int | None = None       # rotate only the first rope_dims of each head (None = all)
    norm_eps: float = 1e-5
    norm_fp32: bool = True             # normalise in fp32, cast back, then multiply by the weight
    qk_norm: bool = False              # RMSNorm(head_dim) on q and k, one weight shared by all heads
    v_norm: bool = False               # same on v (before GQA expansion; v never gets RoPE)
    sandwich_norm: bool = False        # also norm each sublayer's output before the residual add
    attn_scale: float | None = None    # SDPA scale; None -> head_dim ** -0.5
    sliding_window: int | None = None  # keys visible per query, itself included (flash-attn's
    #                                    window_size=(w, w) is w+1 here); None = full causal
    window_layers: list[int] | str = "all"   # where the window applies: "all" | "odd" | "even" | [i, ...]
    xsa_layers: list[int] | str | None = None  # Exclusive Self Attention layers: None | "all" | [i, ...]
    logit_softcap: float | None = None  # logits <- c * tanh(logits / c)
    tie_embeddings: bool = True
    init: str = "gpt2"                 # see init_weights: "gpt2" | "depth_scaled" | "fan_in"
    init_std: float = 0.02             # base std for "gpt2" and "depth_scaled"
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_layout not in ("half", "interleaved"):
            raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {self.rope_layout!r}")
        rd = self.rope_dims if self.rope_dims is not None else self.head_dim
        if rd % 2 or not 0 < rd <= self.head_dim:
            raise ValueError(f"rope_dims={self.rope_dims} must be even and in (0, head_dim={self.head_dim}]")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        self._check_layers("window_layers", self.window_layers)
        self._check_layers("xsa_layers", self.xsa_layers)

    def _check_layers(self, name, spec):
        if spec is None or spec in ("all", "odd", "even"):
            return
        if isinstance(spec, str) or not all(isinstance(i, int) and 0 <= i < self.n_layers for i in spec):
            raise ValueError(f"{name} must be null, 'all', 'odd', 'even' or a list of layer indices "
                             f"in [0, {self.n_layers}), got {spec!r}")

    @staticmethod
    def _layer_in(spec, i: int) -> bool:
        if spec is None:
            return False
        if spec == "all":
            return True
        if spec == "odd":
            return i % 2 == 1
        if spec == "even":
            return i % 2 == 0
        return i in spec

    def window_for(self, i: int) -> int | None:
        if self.sliding_window is None or not self._layer_in(self.window_layers, i):
            return None
        return self.sliding_window

    def xsa_for(self, i: int) -> bool:
        return self._layer_in(self.xsa_layers, i)


# Presets for the seed models (docs/models.md). build_model({"arch": "dense", "preset": "atom", ...overrides}).
PRESETS: dict[str, dict] = {
    # Atom: no public source. Card: RoPE theta 5000 but not its layout -> rotate-half (our choice).
    # Norm eps and init are not published either: eps 1e-5 and GPT-2-style init are our choices.
    # XSA layers are not published: all layers (our default).
    "atom": dict(vocab_size=4096, d_model=192, n_layers=7, n_heads=3, n_kv_heads=1, head_dim=64,
                 ffn_dim=480, max_seq_len=512, rope_theta=5000.0, rope_layout="half", norm_eps=1e-5,
                 xsa_layers="all", tie_embeddings=True, init="gpt2"),
    # Axiom-Dense-380M: exactly LlamaForCausalLM up to the interleaved RoPE layout.
    "axiom-380m": dict(vocab_size=100277, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8,
                       ffn_dim=2816, max_seq_len=1024, rope_theta=10000.0, rope_layout="interleaved",
                       norm_eps=1e-5, tie_embeddings=True, init="depth_scaled"),
    # Argonne 3.0: the source configures a 256-token window on odd layers, but the released weights
    # were trained with full causal attention everywhere (the window only existed in an unused
    # flash-attn path), so the faithful default is no window. What the config file describes is
    # sliding_window=257, window_layers="odd": flash-attn's window_size=(256, 256) lets a query see
    # itself and the 256 keys before it, and our window counts the query too. The attention scale is
    # SDPA's default head_dim**-0.5 (1/16 at head_dim 256), so it follows any head_dim override.
    "argonne-3.0": dict(vocab_size=151669, d_model=3072, n_layers=24, n_heads=12, n_kv_heads=4,
                        head_dim=256, ffn_dim=8192, max_seq_len=1024, rope_theta=1e6, rope_layout="half",
                        norm_eps=1e-6, norm_fp32=True, qk_norm=True, v_norm=True, sandwich_norm=True,
                        sliding_window=None, window_layers="odd", logit_softcap=15.0,
                        tie_embeddings=True, init="fan_in"),
}


class Attention(nn.Module):
    def __init__(self, cfg: DenseConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_layout, self.rope_dims = cfg.rope_layout, cfg.rope_dims
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.window = cfg.window_for(layer)
        self.xsa = cfg.xsa_for(layer)
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        mk = lambda: RMSNorm(self.hd, eps=cfg.norm_eps, fp32=cfg.norm_fp32)  # noqa: E731
        self.q_norm = mk() if cfg.qk_norm else None
        self.k_norm = mk() if cfg.qk_norm else None
        self.v_norm = mk() if cfg.v_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        # RoPE in the [B, H, T, D] layout SDPA wants, so q/k reach the kernel contiguous.
        q = apply_rope(q.transpose(1, 2), cos, sin, self.rope_layout, self.rope_dims, heads_first=True)
        k = apply_rope(k.transpose(1, 2), cos, sin, self.rope_layout, self.rope_dims, heads_first=True)
        v = v.transpose(1, 2)
        v_self = v
        if cache is not None:  # the cache stores [B, T, Hkv, D]
            k, v = cache.update_kv(self.layer, k.transpose(1, 2), v.transpose(1, 2))
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = causal_attention(q, k, v, self.scale, self.window)
        if self.xsa:
            y = self._exclusive(y, v_self)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _exclusive(self, y, v_self):
        """XSA: drop each head's output component along the token's own (group's) value direction.

        y: [B, H, T, D]; v_self: [B, Hkv, T, D]. Grouped view instead of repeating v per head.
        """
        B, H, T, D = y.shape
        g = H // self.n_kv
        vh = F.normalize(v_self.to(y.dtype), dim=-1).unsqueeze(2)  # [B, Hkv, 1, T, D]
        yg = y.view(B, self.n_kv, g, T, D)
        yg = yg - (yg * vh).sum(-1, keepdim=True) * vh
        return yg.view(B, H, T, D)


class Block(nn.Module):
    def __init__(self, cfg: DenseConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, fp32=cfg.norm_fp32)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = norm()
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)
        # Sandwich (Argonne/Gemma): the sublayer output is normed too before joining the residual.
        self.attn_out_norm = norm() if cfg.sandwich_norm else None
        self.mlp_out_norm = norm() if cfg.sandwich_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        a = self.attn(self.attn_norm(x), cos, sin, cache)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        h = x + a
        m = self.mlp(self.mlp_norm(h))
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return h + m


class DenseLM(CausalLM):
    def __init__(self, config: DenseConfig):
        c = config
        super().__init__(c, lambda i: Block(c, i), RMSNorm(c.d_model, eps=c.norm_eps, fp32=c.norm_fp32),
                         logit_softcap=c.logit_softcap)

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Initialise in place following each model's source.

        gpt2:         embedding and linears N(0, init_std); o_proj/down_proj N(0, init_std/sqrt(2L)).
                      (Atom: no published source; a conventional choice.)
        depth_scaled: every linear and the (tied) embedding N(0, init_std/sqrt(2L))  (Axiom: 0.02/sqrt(48)).
        fan_in:       embedding and linears N(0, d_model^-0.5); o_proj/down_proj N(0, (2L)^-0.5), literally
                      as Argonne's source writes it (no d_model factor).
        """
        c = self.config
        two_l = 2 * c.n_layers
        if c.init == "gpt2":
            std, out_std, emb_std = c.init_std, c.init_std / math.sqrt(two_l), c.init_std
        elif c.init == "depth_scaled":
            std = out_std = emb_std = c.init_std / math.sqrt(two_l)
        else:  # fan_in
            std = emb_std = c.d_model ** -0.5
            out_std = two_l ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, 0.0, emb_std)
            if self.lm_head is not None:
                nn.init.normal_(self.lm_head.weight, 0.0, std)
            for name, mod in self.blocks.named_modules():
                if isinstance(mod, nn.Linear):
                    out = name.endswith("o_proj") or name.endswith("down_proj")
                    nn.init.normal_(mod.weight, 0.0, out_std if out else std)
                elif isinstance(mod, RMSNorm):
                    mod.reset_parameters()
            self.norm.reset_parameters()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_full(*rope_cos_sin(positions, c.rope_dims or c.head_dim, c.rope_theta), c.rope_layout)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM-style: 6 x matmul params (the head
        counts even when tied: it is a real matmul; the embedding lookup does not) + 12 x L x H x D x
        T_eff for attention scores and values (T_eff = window where one applies; causal not halved)."""
        c = self.config
        mat = sum(p.numel() for n, p in self.blocks.named_parameters() if p.ndim >= 2)
        mat += c.vocab_size * c.d_model
        attn = sum(12 * c.n_heads * c.head_dim * min(seq_len, self.config.window_for(i) or seq_len)
                   for i in range(c.n_layers))
        return float(6 * mat + attn)
