"""Llama Think: a hybrid decoder of Gated DeltaNet, compressed sparse and gated full attention layers.

Facts: docs/models.md ("Llama Think 95.7M", read in the authors' llama2.c fork). The
defaults of HybridConfig ARE that model (95,715,408 parameters), so `build_model({"arch": "hybrid"})`
builds it. A small model for tests and benchmarks is the preset "hybrid-tiny", or any override, e.g.

    build_model({"arch": "hybrid", "d_model": 64, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1,
                 "head_dim": 32, "rope_dims": 16, "ffn_dim": 128, "linear_heads": 2,
                 "linear_head_dim": 32, "vocab_size": 512})

Block (every layer, pre-norm, with per-channel hyper-connection scales r, s, zero-initialised):
    h = (1 + r_a) * x + (1 + s_a) * mixer(norm(x))
    y = (1 + r_f) * h + (1 + s_f) * ffn(norm(h))
where mixer is GatedDeltaNet ("linear"), CompressedSparseAttention ("csa") or GatedAttention ("full"),
and every norm (block, final, q/k) is the (1 + w), w = 0 RMSNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from trainer.models.csa import CompressedSparseAttention, GatedAttention
from trainer.models.gated_deltanet import GatedDeltaNet
from trainer.models.layers import CausalLM, KVCache, RMSNorm, SwiGLU, rope_cos_sin, rope_full

MIXERS = ("linear", "csa", "full")


@dataclass
class HybridConfig:
    arch: ClassVar[str] = "hybrid"  # the family name a curriculum's model.arch gives

    vocab_size: int = 32000              # Llama 2 SentencePiece
    d_model: int = 576
    n_layers: int = 16
    # mixer per layer, tiled to n_layers (n_layers must be a multiple of its length). A list, or a
    # comma-separated string: "linear" = Gated DeltaNet, "csa" = compressed sparse attn, "full" = gated attn
    layer_pattern: list[str] | str = field(default_factory=lambda: ["linear", "linear", "csa", "full"])
    n_heads: int = 9                     # softmax-attention query heads (csa and full)
    n_kv_heads: int = 3                  # GQA
    head_dim: int = 64
    rope_theta: float = 20000.0
    rope_dims: int = 32                  # partial RoPE: rotate-half within the first rope_dims of each head
    ffn_dim: int = 1536                  # SwiGLU hidden size
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    linear_heads: int = 9                # Gated DeltaNet heads (d_k = d_v = linear_head_dim)
    linear_head_dim: int = 112
    linear_conv_kernel: int = 4          # depthwise causal conv before the delta rule
    linear_chunk_size: int = 64          # chunk length of the plain-PyTorch chunked delta rule
    use_fla: bool = True                 # flash-linear-attention kernels when installed and on CUDA
    csa_window: int = 64                 # local keys per query, itself included
    csa_block: int = 4                   # tokens per compressed block
    tie_embeddings: bool = True
    init_std: float = 0.02               # N(0, std); up_proj (their w3), wo, out_proj get std/sqrt(2 L)
    activation_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.layer_pattern, str):
            self.layer_pattern = [p.strip() for p in self.layer_pattern.split(",") if p.strip()]
        self.layer_pattern = list(self.layer_pattern)
        bad = [p for p in self.layer_pattern if p not in MIXERS]
        if bad or not self.layer_pattern:
            raise ValueError(f"layer_pattern: unknown mixer(s) {bad or '(empty)'}; expected from {MIXERS}")
        if self.n_layers % len(self.layer_pattern):
            raise ValueError(f"n_layers={self.n_layers} must be a multiple of len(layer_pattern)="
                             f"{len(self.layer_pattern)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_dims % 2 or not 0 < self.rope_dims <= self.head_dim:
            raise ValueError(f"rope_dims={self.rope_dims} must be even and in (0, head_dim={self.head_dim}]")
        if self.csa_window < 1 or self.csa_block < 1:
            raise ValueError("csa_window and csa_block must be >= 1")

    def mixer_for(self, i: int) -> str:
        return self.layer_pattern[i % len(self.layer_pattern)]


PRESETS: dict[str, dict] = {
    "llama-think-95m": {},  # the defaults
    # Same structure at toy size: one pattern period of every mixer, for tests and CPU benchmarks.
    "hybrid-tiny": dict(vocab_size=512, d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=32,
                        rope_dims=16, ffn_dim=128, linear_heads=2, linear_head_dim=32, max_seq_len=256),
}


class Block(nn.Module):
    def __init__(self, c: HybridConfig, layer: int):
        super().__init__()
        self.kind = c.mixer_for(layer)
        d = c.d_model
        if self.kind == "linear":
            self.mixer = GatedDeltaNet(d, c.linear_heads, c.linear_head_dim, c.linear_conv_kernel, c.norm_eps,
                                       c.linear_chunk_size, c.use_fla)
        elif self.kind == "csa":
            self.mixer = CompressedSparseAttention(d, c.n_heads, c.n_kv_heads, c.head_dim, layer, c.rope_dims,
                                                   c.rope_theta, c.norm_eps, c.csa_window, c.csa_block)
        else:
            self.mixer = GatedAttention(d, c.n_heads, c.n_kv_heads, c.head_dim, layer, c.rope_dims, c.norm_eps)
        self.layer = layer
        self.mixer_norm = RMSNorm(d, eps=c.norm_eps, fp32=True, unit_offset=True)
        self.ffn_norm = RMSNorm(d, eps=c.norm_eps, fp32=True, unit_offset=True)
        self.ffn = SwiGLU(d, c.ffn_dim)
        # hyper-connections: per-channel residual and sublayer scales around 1, zero-initialised
        self.mixer_residual_scale = nn.Parameter(torch.zeros(d))
        self.mixer_sublayer_scale = nn.Parameter(torch.zeros(d))
        self.ffn_residual_scale = nn.Parameter(torch.zeros(d))
        self.ffn_sublayer_scale = nn.Parameter(torch.zeros(d))

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        a_in = self.mixer_norm(x)
        if self.kind == "linear":
            a = self.mixer(a_in, cache.layers[self.layer] if cache is not None else None)
        else:
            a = self.mixer(a_in, cos, sin, cache)
        h = (1 + self.mixer_residual_scale) * x + (1 + self.mixer_sublayer_scale) * a
        f = self.ffn(self.ffn_norm(h))
        return (1 + self.ffn_residual_scale) * h + (1 + self.ffn_sublayer_scale) * f


class HybridLM(CausalLM):
    """Optimizer roles (param_kinds): Muon ("matrix") gets every >= 2-D weight except the embedding/head,
    INCLUDING the depthwise conv weight [C, 1, K] (the optimizer views it as [C, K]), as in the source.
    Norm weights, hyper-connection scales, A_log and dt_bias are "vector".

    Cache (new_cache): attention layers keep k/v (and CSA its pre-RoPE keys); Gated DeltaNet layers keep
    "conv" (last kernel-1 inputs) and "state" (the [B,H,Dk,Dv] recurrent state): O(1) in the length.
    """

    def __init__(self, config: HybridConfig):
        c = config
        super().__init__(c, lambda i: Block(c, i),
                         RMSNorm(c.d_model, eps=c.norm_eps, fp32=True, unit_offset=True))

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) for the embedding and every linear; the source's nanoGPT-style rule then re-draws
        `w3`, `wo` (and here `out_proj`) with 0.02/sqrt(2L). Their FFN is w2(silu(w1 x) * w3 x), so their
        `w3` is our SwiGLU.up_proj (not the down projection). Gated DeltaNet: A_log = log U(1, 16),
        dt_bias = 1, gated-norm weight 1, conv at PyTorch's default. (1+w) norms and hyper-connection
        scales are zero."""
        c = self.config
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * c.n_layers)
        nn.init.normal_(self.embed.weight, 0.0, std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for name, mod in self.blocks.named_modules():
            if isinstance(mod, GatedDeltaNet):  # visited before its linears; those are re-drawn below alike
                mod.init_weights(std, out_std)
            elif isinstance(mod, nn.Linear):
                scaled = name.endswith((".wo", ".up_proj", ".out_proj"))
                nn.init.normal_(mod.weight, 0.0, out_std if scaled else std)
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()
        for blk in self.blocks:
            for p in (blk.mixer_residual_scale, blk.mixer_sublayer_scale, blk.ffn_residual_scale,
                      blk.ffn_sublayer_scale):
                p.zero_()
        self.norm.reset_parameters()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # widened once per forward here, not in every attention layer's apply_rope
        return rope_full(*rope_cos_sin(positions, self.config.rope_dims, self.config.rope_theta), "half")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), PaLM-style.

        6 x matmul weights per token (head included even when tied; conv counted as its 2*C*K
        multiply-adds; compress_k/v run once per block, so /csa_block), plus per layer:
        full attention 12 H D T; CSA 12 H D (min(T, window) + T / block); Gated DeltaNet 3 x the
        chunked delta rule's forward FLOPs (GatedDeltaNet.core_flops_per_token). Causal not halved.
        """
        c = self.config
        mat = c.vocab_size * c.d_model
        for name, p in self.blocks.named_parameters():
            if p.ndim >= 2:
                mat += p.numel() / c.csa_block if (".compress_k." in name or ".compress_v." in name) \
                    else p.numel()
        extra = 0.0
        for blk in self.blocks:
            hd = c.n_heads * c.head_dim
            if blk.kind == "full":
                extra += 12 * hd * seq_len
            elif blk.kind == "csa":
                extra += 12 * hd * (min(seq_len, c.csa_window) + seq_len / c.csa_block)
            else:
                extra += 3 * blk.mixer.core_flops_per_token()
        return float(6 * mat + extra)
