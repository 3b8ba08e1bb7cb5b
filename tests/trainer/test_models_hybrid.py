"""Llama Think hybrid: Gated DeltaNet, compressed sparse attention, gated full attention, the whole model.

References are independent of the code under test: the delta rule written per token from its equations,
transformers' Qwen3.5 Gated DeltaNet with the same weights, and attention written as explicit loops/masks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.gated_deltanet import GatedDeltaNet, chunk_gated_delta_rule

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- Gated DeltaNet

def delta_rule_reference(q, k, v, g, beta):
    """S <- e^g S; u = S^T k; S <- S + k (beta (v - u))^T; o = S^T q. One (batch, head) at a time, in fp64."""
    B, H, T, Dk = k.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    states = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(Dk, v.shape[-1], dtype=torch.float64)
            for t in range(T):
                kt, vt, qt = k[b, h, t].double(), v[b, h, t].double(), q[b, h, t].double()
                S = math.exp(float(g[b, h, t])) * S
                u = S.T @ kt
                S = S + torch.outer(kt, float(beta[b, h, t]) * (vt - u))
                out[b, h, t] = S.T @ qt
            states[b, h] = S
    return out, states


def random_rule_inputs(B, H, T, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, D, generator=gen), dim=-1) * D ** -0.5
    k = F.normalize(torch.randn(B, H, T, D, generator=gen), dim=-1)
    v = torch.randn(B, H, T, D, generator=gen)
    g = -torch.rand(B, H, T, generator=gen) * 0.5  # realistic decays, some close to 1
    beta = torch.rand(B, H, T, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("T", [64, 100, 7])  # a multiple of the chunk, a ragged tail, shorter than a chunk
def test_chunked_delta_rule_matches_per_token_recurrence(T):
    q, k, v, g, beta = random_rule_inputs(2, 3, T, 16, seed=T)
    ref, ref_state = delta_rule_reference(q, k, v, g, beta)
    out, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5), (out.double() - ref).abs().max()
    assert torch.allclose(state.double(), ref_state, atol=1e-5, rtol=1e-5)


def test_chunked_delta_rule_continues_from_a_state():
    q, k, v, g, beta = random_rule_inputs(1, 2, 90, 8, seed=3)
    ref, ref_state = delta_rule_reference(q, k, v, g, beta)
    o1, s1 = chunk_gated_delta_rule(q[:, :, :37], k[:, :, :37], v[:, :, :37], g[:, :, :37], beta[:, :, :37],
                                    chunk_size=16)
    o2, s2 = chunk_gated_delta_rule(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], g[:, :, 37:], beta[:, :, 37:],
                                    state=s1, chunk_size=16)
    assert torch.allclose(torch.cat([o1, o2], 2).double(), ref, atol=1e-5)
    assert torch.allclose(s2.double(), ref_state, atol=1e-5)


def small_gdn(seed=0, dim=48, heads=3, head_dim=16, chunk_size=16):
    torch.manual_seed(seed)
    m = GatedDeltaNet(dim, heads, head_dim, chunk_size=chunk_size)
    m.init_weights(std=0.2, out_std=0.2)  # larger than 0.02 so the test sees non-trivial activations
    return m


def test_gdn_layer_matches_transformers_qwen3_5():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    ours = small_gdn(seed=1)
    cfg = Qwen3_5TextConfig(hidden_size=48, linear_num_key_heads=3, linear_num_value_heads=3,
                            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                            rms_norm_eps=1e-6, hidden_act="silu", num_hidden_layers=1,
                            layer_types=["linear_attention"])
    ref = Qwen3_5GatedDeltaNet(cfg, layer_idx=0)
    missing = ref.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes: 1:1
    assert not missing.missing_keys and not missing.unexpected_keys
    cores = {}  # the delta-rule output, before the gated norm (which amplifies rows of tiny rms)
    ours.norm.register_forward_hook(lambda m, i, o: cores.__setitem__("ours", i[0].reshape(-1, 16)))
    ref.norm.register_forward_hook(lambda m, i, o: cores.__setitem__("ref", i[0].reshape(-1, 16)))
    x = torch.randn(2, 75, 48)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert torch.allclose(cores["ours"], cores["ref"], atol=1e-5), (cores["ours"] - cores["ref"]).abs().max()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_gdn_cached_decoding_equals_full_forward():
    m = small_gdn(seed=2)
    x = torch.randn(2, 41, 48)
    with torch.no_grad():
        full = m(x)
        cache = {}
        parts = [m(x[:, :20], cache)]  # chunked prefill, then one token at a time
        parts += [m(x[:, t:t + 1], cache) for t in range(20, 41)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_gdn_gradients_finite_and_param_names():
    m = small_gdn(seed=3)
    names = {n for n, _ in m.named_parameters()}
    assert names == {"in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                     "conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"}
    m(torch.randn(2, 50, 48)).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert m.A_log.detach().exp().min() >= 1.0 and m.A_log.detach().exp().max() <= 16.0


# ------------------------------------------------------------------------------- attention references

def ref_norm(x, w, eps=1e-6):  # (1 + w) RMSNorm, written out
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def ref_rope(x, pos, rot, theta):
    """Rotate-half RoPE on the first `rot` dims of a [D] vector at integer position `pos`."""
    out = x.clone()
    half = rot // 2
    for i in range(half):
        ang = pos / theta ** (2 * i / rot)
        a, b = x[i], x[i + half]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + half] = b * math.cos(ang) + a * math.sin(ang)
    return out


def ref_softmax_attend(q, keys, values, scale):
    if not keys:
        return torch.zeros_like(q)
    s = torch.stack([q @ k for k in keys]) * scale
    return (torch.softmax(s, 0)[:, None] * torch.stack(values)).sum(0)


def ref_attention(m, x, window=None, block=None):
    """GatedAttention / CSA for one sequence x [T, dim], token by token from the equations."""
    H, Hkv, D = m.n_heads, m.n_kv, m.hd
    rot, theta, group = m.rope_dims, 20000.0, H // Hkv
    T = x.shape[0]
    qg = (x @ m.wq.weight.T).view(T, H, 2 * D)
    kpre = ref_norm((x @ m.wk.weight.T).view(T, Hkv, D), m.k_norm.weight)
    v = (x @ m.wv.weight.T).view(T, Hkv, D)
    q = ref_norm(qg[..., :D], m.q_norm.weight)
    q = torch.stack([torch.stack([ref_rope(q[t, h], t, rot, theta) for h in range(H)]) for t in range(T)])
    k = torch.stack([torch.stack([ref_rope(kpre[t, h], t, rot, theta) for h in range(Hkv)]) for t in range(T)])
    if block is not None:
        nb = T // block
        bk = [(kpre[block * c: block * (c + 1)].reshape(block, -1).mean(0) @ m.compress_k.weight.T).view(Hkv, D)
              for c in range(nb)]
        bk = [torch.stack([ref_rope(bk[c][h], block * c + block // 2, rot, theta) for h in range(Hkv)])
              for c in range(nb)]
        bv = [(v[block * c: block * (c + 1)].reshape(block, -1).mean(0) @ m.compress_v.weight.T).view(Hkv, D)
              for c in range(nb)]
    out = torch.zeros(T, H, D)
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        for h in range(H):
            g = h // group
            ctx = ref_softmax_attend(q[t, h], [k[j, g] for j in range(lo, t + 1)],
                                     [v[j, g] for j in range(lo, t + 1)], D ** -0.5)
            if block is not None:
                seen = [c for c in range(nb) if t >= block * (c + 1)]
                comp = ref_softmax_attend(q[t, h], [bk[c][g] for c in seen], [bv[c][g] for c in seen],
                                          D ** -0.5)
                blend = torch.sigmoid(x[t] @ m.blend_gate.weight.T).view(H, D)[h]
                ctx = blend * comp + (1 - blend) * ctx
            out[t, h] = ctx * torch.sigmoid(qg[t, h, D:])
    return out.reshape(T, H * D) @ m.wo.weight.T


def randomize(m, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # norm weights too, so a wrong (1 + w) would show
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.2))
    return m


def test_gated_full_attention_matches_reference():
    from trainer.models.csa import GatedAttention
    m = randomize(GatedAttention(32, n_heads=4, n_kv_heads=2, head_dim=16, layer=0, rope_dims=8), seed=4)
    x = torch.randn(1, 13, 32)
    T = 13
    pos = torch.arange(T)
    from trainer.models.layers import rope_cos_sin
    cos, sin = rope_cos_sin(pos, 8, 20000.0)
    with torch.no_grad():
        ours = m(x, cos, sin)[0]
    assert torch.allclose(ours, ref_attention(m, x[0]), atol=1e-5), (ours - ref_attention(m, x[0])).abs().max()


@pytest.mark.parametrize("T", [3, 30])  # 3: no row sees a block (no block exists); 30: window and blocks
def test_csa_matches_explicit_masked_reference(T):
    from trainer.models.csa import CompressedSparseAttention
    from trainer.models.layers import rope_cos_sin
    m = randomize(CompressedSparseAttention(32, 4, 2, 16, layer=0, rope_dims=8, rope_theta=20000.0,
                                            window=8, block=4), seed=5)
    x = torch.randn(1, T, 32, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T), 8, 20000.0)
    ours = m(x, cos, sin)
    with torch.no_grad():
        ref = ref_attention(m, x[0].detach(), window=8, block=4)
    assert torch.allclose(ours[0].detach(), ref, atol=1e-5), (ours[0].detach() - ref).abs().max()
    ours.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for n, p in m.named_parameters():
        if T < 4 and n.startswith("compress_"):
            continue  # no complete block: the compressors are not used
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_csa_rows_without_a_visible_block_are_zero_not_nan():
    from trainer.models.csa import CompressedSparseAttention
    m = randomize(CompressedSparseAttention(32, 4, 2, 16, layer=0, rope_dims=8, rope_theta=20000.0,
                                            window=8, block=4), seed=6)
    q = torch.randn(1, 10, 4, 16)
    k_pre, v = torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    comp = m.compressed(q, k_pre, v, pos0=0)
    assert torch.isfinite(comp).all()
    assert (comp[:, :4] == 0).all()          # tokens 0..3 see no complete block
    assert (comp[:, 4:].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------ the model

FULL_SIZE = 95_715_408


def test_llama_think_exact_parameter_count_and_kinds_on_meta():
    from trainer.models import build_model
    with torch.device("meta"):
        m = build_model({"arch": "hybrid"})
    assert m.num_params() == FULL_SIZE
    assert sum(p.numel() for p in m.parameters()) == FULL_SIZE
    assert [b.kind for b in m.blocks] == ["linear", "linear", "csa", "full"] * 4
    kinds = m.param_kinds()
    assert kinds["embed.weight"] == "embedding"
    assert kinds["blocks.0.mixer.conv1d.weight"] == "matrix"          # Muon takes the conv, as in the source
    assert kinds["blocks.0.mixer.in_proj_qkv.weight"] == "matrix"
    for n in ("blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.0.mixer.norm.weight",
              "blocks.3.mixer.q_norm.weight", "blocks.2.mixer_residual_scale", "blocks.5.ffn_sublayer_scale",
              "norm.weight"):
        assert kinds[n] == "vector", n
    assert m.blocks[3].mixer.wq.weight.shape == (1152, 576)
    assert m.blocks[2].mixer.compress_k.weight.shape == (192, 192)
    assert m.blocks[0].mixer.in_proj_qkv.weight.shape == (3024, 576)
    assert 5e8 < m.flops_per_token(1024) < 8e8  # ~6 N


def tiny(**over):
    from trainer.models import build_model
    torch.manual_seed(0)
    cfg = {"arch": "hybrid", "preset": "hybrid-tiny", "csa_window": 8, "linear_chunk_size": 16}
    cfg.update(over)
    return build_model(cfg)


def test_init_follows_source():
    m = tiny(init_std=0.02)
    out_std = 0.02 / math.sqrt(2 * 4)
    stds = {n: p.std().item() for n, p in m.named_parameters() if p.ndim == 2 and p.numel() >= 4096}
    for n, s in stds.items():
        want = out_std if n.endswith(("wo.weight", "up_proj.weight", "out_proj.weight")) else 0.02
        assert abs(s - want) / want < 0.1, (n, s, want)
    for n, p in m.named_parameters():
        if n.endswith(("_scale", "norm.weight")) and ".mixer.norm." not in n:
            assert (p == 0).all(), n
    gdn = m.blocks[0].mixer
    assert (gdn.norm.weight == 1).all() and (gdn.dt_bias == 1).all()
    assert gdn.A_log.exp().min() >= 1 and gdn.A_log.exp().max() <= 16


def test_cached_incremental_decoding_equals_full_forward():
    m = randomize(tiny(), seed=7).eval()  # random norms/scales so every path matters
    ids = torch.randint(0, 512, (2, 45))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64)
        parts = [m(ids[:, :17], cache), m(ids[:, 17:22], cache)]  # prefill, then a chunk after a prefix
        parts += [m(ids[:, t:t + 1], cache) for t in range(22, 45)]
    assert cache.pos == 45
    got = torch.cat(parts, 1)
    assert torch.allclose(got, full, atol=1e-4, rtol=1e-4), (got - full).abs().max()


def test_gradients_finite_for_every_parameter_and_checkpointing_matches():
    ids = torch.randint(0, 512, (2, 40))
    grads = []
    for ckpt in (False, True):
        m = tiny(activation_checkpointing=ckpt).train()
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_bf16_autocast_forward_is_finite():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randint(0, 512, (1, 20)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.slow
def test_compiles_with_aot_eager():
    # one layer of each mixer (compile time grows with depth: ~10 s of it is torch.compile's own start-up)
    m = tiny(n_layers=3, layer_pattern="linear,csa,full")
    ids = torch.randint(0, 512, (1, 20))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    out.sum().backward()
    assert torch.allclose(out, m(ids), atol=1e-5)
