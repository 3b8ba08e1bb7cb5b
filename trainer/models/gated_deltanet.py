"""Gated DeltaNet: the linear-attention mixer of Llama Think (docs/models.md, "Llama Think 95.7M").

Per head, with a state S of shape [d_k, d_v] that maps keys to values:

    S <- exp(g_t) S                      (forget)
    u  = S^T k_t                         (what the state already predicts for k_t)
    S <- S + k_t (beta_t (v_t - u))^T    (delta rule: write only the correction)
    o_t = S^T q_t / sqrt(d_k)

Three implementations of the same rule:
  * `chunk_gated_delta_rule`: training / prefill. Chunkwise-parallel (WY / UT transform) in plain PyTorch,
    fp32, a Python loop over chunks (T/64 steps), never over tokens.
  * `recurrent_gated_delta_rule`: decoding, one token at a time against the cached state.
  * flash-linear-attention's Triton kernels, used automatically when `fla` is importable and the input
    is on CUDA.

Parameter names follow transformers' `Qwen3_5GatedDeltaNet` (in_proj_qkv, in_proj_z, in_proj_b,
in_proj_a, conv1d, A_log, dt_bias, norm, out_proj) so state dicts map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional fast path; never required
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent
except Exception:  # ImportError, or a broken triton install
    _fla_chunk = _fla_recurrent = None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # rsqrt(sum + eps) rather than F.normalize's max(norm, eps): the convention of fla's kernels and of
    # transformers' Qwen3.5, so the three paths agree to rounding.
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q, k, v, g, beta, state=None):
    """Token-by-token rule. q, k: [B,H,T,Dk] (l2-normalised; q already scaled), v: [B,H,T,Dv],
    g (log decay, <= 0), beta: [B,H,T]. Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv]), fp32."""
    B, H, T, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float32) if state is None else state.float()
    outs = []
    for t in range(T):
        S = S * g[:, :, t, None, None].exp()
        u = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        S = S + k[:, :, t, :, None] * (beta[:, :, t, None] * (v[:, :, t] - u))[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    return torch.stack(outs, dim=2), S


def chunk_gated_delta_rule(q, k, v, g, beta, state=None, chunk_size: int = 64):
    """Chunkwise-parallel form of `recurrent_gated_delta_rule` (same arguments, same results).

    Inside a chunk let gam_t = sum_{r<=t} g_r (log of the decay since the chunk start) and S0 the state
    entering the chunk. Unrolling the recurrence, S_t = e^{gam_t} S0 + sum_{s<=t} e^{gam_t-gam_s} k_s w_s^T
    with pseudo-values w_t = beta_t (v_t - e^{gam_t} S0^T k_t - sum_{s<t} e^{gam_t-gam_s} (k_t.k_s) w_s).
    That is a unit lower-triangular system (I + A) W = beta V - beta e^{gam} K S0, so
    W = U - Wk S0 with U = (I+A)^-1 beta V and Wk = (I+A)^-1 beta e^{gam} K, both computed for every chunk
    at once by one triangular solve. Only the S0 hand-off between chunks is sequential.
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    C = chunk_size
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    pad = (-T) % C
    if pad:  # padded steps have g = 0 (no decay) and beta = 0 (no write): the state passes unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    gam = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # e^{gam_t - gam_s} for s <= t; masked in log space first so the upper triangle cannot overflow
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([v * beta[..., None], k * (beta * gam.exp())[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U, Wk = sol.split([Dv, Dk], dim=-1)

    # o = e^{gam} Q S0 + attn W = attn U + (e^{gam} Q - attn Wk) S0: everything but "@ S0" is batched
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk scores, diagonal included
    o_intra = attn @ U
    q_state = q * gam.exp()[..., None] - attn @ Wk
    k_dec = (k * (gam[..., -1:] - gam).exp()[..., None]).transpose(-1, -2)  # writes decayed to chunk end
    chunk_decay = gam[..., -1].exp()[..., None, None]

    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.float()
    outs = []
    for n in range(N):
        outs.append(o_intra[:, :, n] + q_state[:, :, n] @ S)
        S = S * chunk_decay[:, :, n] + k_dec[:, :, n] @ (U[:, :, n] - Wk[:, :, n] @ S)
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return o, S


class GatedRMSNorm(nn.Module):
    """w * rmsnorm(o) * silu(z), per head (w init 1): the output norm of Gated DeltaNet."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet mixer: [B,T,dim] -> [B,T,dim].

    `cache` is this layer's dict in a KV cache (or None). It holds "conv" (the last kernel-1 pre-conv
    inputs, [B, 3*H*D, kernel-1]) and "state" (the recurrent state, [B,H,D,D] fp32), both updated here.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, conv_kernel: int = 4, norm_eps: float = 1e-6,
                 chunk_size: int = 64, use_fla: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.conv_dim = 3 * self.inner_dim  # q | k | v all go through the short conv
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.use_fla = use_fla
        self.in_proj_qkv = nn.Linear(dim, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(dim, self.inner_dim, bias=False)
        self.in_proj_b = nn.Linear(dim, num_heads, bias=False)
        self.in_proj_a = nn.Linear(dim, num_heads, bias=False)
        # padding is not used by forward (we left-pad with the cached tail); kept so the module matches
        # transformers' nn.Conv1d config exactly
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False,
                                padding=conv_kernel - 1)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.out_proj = nn.Linear(self.inner_dim, dim, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, out_std: float = 0.02):
        for lin in (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a):
            nn.init.normal_(lin.weight, 0.0, std)
        nn.init.normal_(self.out_proj.weight, 0.0, out_std)
        # The source's init loop only touches nn.Linear / nn.Embedding, so the conv keeps PyTorch's default
        # (kaiming-uniform, bound 1/sqrt(kernel)). Inferred: the fork's _init_weights is nanoGPT-style.
        self.conv1d.reset_parameters()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        self.dt_bias.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def _conv(self, qkv: torch.Tensor, cache: dict | None) -> torch.Tensor:
        """Depthwise causal conv + SiLU over [B, C, T], continuing from the cached tail when decoding."""
        K = self.conv_kernel
        tail = cache.get("conv") if cache is not None else None
        if tail is None:
            tail = qkv.new_zeros(qkv.shape[0], self.conv_dim, K - 1)
        x = torch.cat([tail.to(qkv.dtype), qkv], dim=-1)
        if cache is not None:
            cache["conv"] = x[:, :, x.shape[-1] - (K - 1):].clone()  # not a view pinning the whole input
        return F.silu(F.conv1d(x, self.conv1d.weight.to(x.dtype), groups=self.conv_dim))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self._conv(self.in_proj_qkv(x).transpose(1, 2), cache).transpose(1, 2)
        q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(self.inner_dim, dim=-1))
        z = self.in_proj_z(x).reshape(B, T, H, D)
        beta = torch.sigmoid(self.in_proj_b(x).float())
        # fp32: in bf16 exp(A_log) * softplus(.) loses the small decays that carry long memory
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        state = cache.get("state") if cache is not None else None

        if self.use_fla and _fla_chunk is not None and x.is_cuda:
            fn = _fla_recurrent if T == 1 else _fla_chunk
            o, state = fn(q, k, v, g=g, beta=beta.to(q.dtype), scale=D ** -0.5, initial_state=state,
                          output_final_state=cache is not None, use_qk_l2norm_in_kernel=True)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
                q = l2_normalize(q) * D ** -0.5
                k = l2_normalize(k)
                g, beta = g.transpose(1, 2), beta.transpose(1, 2)
                if T == 1:  # decoding: one recurrent step, no chunk padding
                    o, state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
                else:
                    o, state = chunk_gated_delta_rule(q, k, v, g, beta, state, self.chunk_size)
            o = o.transpose(1, 2)
        if cache is not None:
            cache["state"] = state
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(B, T, H * D))

    def core_flops_per_token(self) -> float:
        """Forward FLOPs per token of the chunked delta rule (projections excluded), all heads.

        Per chunk of C tokens and head: k k^T and q k^T (2 C^2 Dk), the triangular solve for U and Wk
        (C^2 (Dk+Dv)/2), the intra-chunk output (C^2 Dv / 2), and three C x Dk x Dv products with the state.
        """
        C, D = self.chunk_size, self.head_dim
        per_token = 2 * (2 * C * D + C * (2 * D) / 2 + C * D / 2 + 3 * D * D)
        return float(self.num_heads * per_token)
