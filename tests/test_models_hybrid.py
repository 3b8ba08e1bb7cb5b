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
