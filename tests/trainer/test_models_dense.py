"""Dense decoder (Atom / Axiom / Argonne) against independent references.

References: transformers' LlamaForCausalLM and Gemma3ForCausalLM loaded with our weights, and a slow
per-token reference written here straight from the equations in docs/models.md.
"""
import math

import pytest
import torch
import torch.nn as nn

from trainer.models import build_model, count_params, make_config
from trainer.models.dense import DenseLM

torch.set_num_threads(1)


def tiny(preset, **kw):
    """A preset with small dims (everything else -- rope layout, norms, softcap ... -- unchanged)."""
    base = {"arch": "dense", "preset": preset, "vocab_size": 97, "d_model": 64, "n_layers": 2,
            "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96, "head_dim": 16}
    base.update(kw)
    torch.manual_seed(0)
    return build_model(base).eval()


def jitter_norms(model):
    """Make a comparison sensitive: norm weights (init 1) perturbed so a misplaced norm shows, and
    matrices at std 0.15 (the real inits are tiny, which leaves attention nearly uniform)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


# ------------------------------------------------------------------------------ counts, config

@pytest.mark.parametrize("preset,expected", [("atom", 3_412_800), ("axiom-380m", 385_849_344),
                                             ("argonne-3.0", 2_882_162_688)])
def test_exact_param_counts_on_meta(preset, expected):
    assert count_params({"arch": "dense", "preset": preset}) == expected
    if preset == "argonne-3.0":  # SDPA's default scale at head_dim 256, as Argonne's source runs it
        assert build_model({"arch": "dense", "preset": preset}, device="meta").blocks[0].attn.scale == 1 / 16
    with torch.device("meta"):
        m = build_model({"arch": "dense", "preset": preset})
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.num_params() == expected


def test_atom_count_matches_card_formula():
    d, f, kv = 192, 480, 64
    formula = 4096 * d + 7 * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    assert count_params({"arch": "dense", "preset": "atom"}) == formula


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.rope_thetta.*rope_theta"):
        make_config({"arch": "dense", "preset": "atom", "rope_thetta": 1.0})
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        make_config({"arch": "dense", "d_model": 8, "n_layers": 1, "n_heads": 1, "ffn_dim": 8})
    with pytest.raises(ValueError, match=r"model\.arch.*dense"):
        make_config({"arch": "dens"})
    with pytest.raises(ValueError, match=r"model\.preset.*atom"):
        make_config({"arch": "dense", "preset": "atm"})
    with pytest.raises(ValueError, match="rope_layout"):
        make_config({"arch": "dense", "preset": "atom", "rope_layout": "sideways"})
    with pytest.raises(ValueError, match="xsa_layers"):
        make_config({"arch": "dense", "preset": "atom", "xsa_layers": [9]})


def test_param_kinds_and_tying():
    m = tiny("axiom-380m")
    kinds = m.param_kinds()
    assert kinds["embed.weight"] == "embedding"
    assert kinds["blocks.0.attn.q_proj.weight"] == "matrix"
    assert kinds["blocks.1.mlp_norm.weight"] == "vector"
    assert set(kinds) == {n for n, _ in m.named_parameters()}
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    untied = tiny("axiom-380m", tie_embeddings=False)
    assert untied.param_kinds()["lm_head.weight"] == "embedding"
    assert untied.num_params() == m.num_params() + 97 * 64
    assert m.flops_per_token(32) > 6 * (m.num_params() - 97 * 64)


# ------------------------------------------------------------------------------ vs transformers Llama

def _llama_from(model: DenseLM):
    """transformers' LlamaForCausalLM holding our weights through the export mapping (eager attention)."""
    from trainer.tools.hf import transformers_llama
    return transformers_llama(model, attn_implementation="eager")


def test_axiom_shape_matches_llama_with_permuted_qk():
    m = tiny("axiom-380m", n_layers=3)
    jitter_norms(m)
    assert m.config.rope_layout == "interleaved"
    hf = _llama_from(m)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ours, ref = m(ids), hf(ids).logits
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # And the permutation matters: without it the two disagree (the test can fail).
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight.copy_(m.blocks[0].attn.q_proj.weight)
        hf.model.layers[0].self_attn.k_proj.weight.copy_(m.blocks[0].attn.k_proj.weight)
        assert (hf(ids).logits - ours).abs().max() > 1e-3


def test_atom_without_xsa_matches_llama():
    m = tiny("atom", vocab_size=113, d_model=48, n_heads=3, n_kv_heads=1, head_dim=16, ffn_dim=80,
             n_layers=3, xsa_layers=None)
    jitter_norms(m)
    hf = _llama_from(m)
    ids = torch.randint(0, 113, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ slow reference

def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_vec(x, pos, theta, layout):
    """Rotate one head vector at one position, pair by pair."""
    d = x.shape[0]
    out = x.clone()
    for i in range(d // 2):
        ang = pos * theta ** (-2.0 * i / d)
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d // 2)
        out[a] = x[a] * math.cos(ang) - x[b] * math.sin(ang)
        out[b] = x[a] * math.sin(ang) + x[b] * math.cos(ang)
    return out


def reference_forward(model: DenseLM, ids):
    """Token-by-token float64 forward written from docs/models.md, sharing only the weights."""
    c = model.config
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    H, Hk, D, eps = c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
    scale = c.attn_scale if c.attn_scale is not None else D ** -0.5
    T = ids.shape[0]
    x = P["embed.weight"][ids]
    for layer in range(c.n_layers):
        pre = f"blocks.{layer}."
        w = lambda n: P[pre + n]  # noqa: E731
        h = _rms(x, w("attn_norm.weight"), eps)
        q = (h @ w("attn.q_proj.weight").T).view(T, H, D)
        k = (h @ w("attn.k_proj.weight").T).view(T, Hk, D)
        v = (h @ w("attn.v_proj.weight").T).view(T, Hk, D)
        if c.qk_norm:
            q, k = _rms(q, w("attn.q_norm.weight"), eps), _rms(k, w("attn.k_norm.weight"), eps)
        if c.v_norm:
            v = _rms(v, w("attn.v_norm.weight"), eps)
        q = torch.stack([torch.stack([_rope_vec(q[t, j], t, c.rope_theta, c.rope_layout) for j in range(H)])
                         for t in range(T)])
        k = torch.stack([torch.stack([_rope_vec(k[t, j], t, c.rope_theta, c.rope_layout) for j in range(Hk)])
                         for t in range(T)])
        window = c.window_for(layer)
        out = torch.zeros(T, H, D, dtype=torch.float64)
        for t in range(T):
            for j in range(H):
                g = j // (H // Hk)
                keys = [s for s in range(t + 1) if window is None or s > t - window]
                scores = torch.stack([q[t, j] @ k[s, g] * scale for s in keys])
                p = torch.softmax(scores, 0)
                o = sum(p[n] * v[s, g] for n, s in enumerate(keys))
                if c.xsa_for(layer):  # y <- y - (y . v_hat) v_hat, v_hat = own value / |own value|
                    vh = v[t, g] / v[t, g].norm()
                    o = o - (o @ vh) * vh
                out[t, j] = o
        a = out.reshape(T, H * D) @ w("attn.o_proj.weight").T
        if c.sandwich_norm:
            a = _rms(a, w("attn_out_norm.weight"), eps)
        x = x + a
        h = _rms(x, w("mlp_norm.weight"), eps)
        m = (torch.nn.functional.silu(h @ w("mlp.gate_proj.weight").T) * (h @ w("mlp.up_proj.weight").T)) \
            @ w("mlp.down_proj.weight").T
        if c.sandwich_norm:
            m = _rms(m, w("mlp_out_norm.weight"), eps)
        x = x + m
    x = _rms(x, P["norm.weight"], eps)
    logits = x @ P["embed.weight"].T
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits


def test_xsa_matches_token_by_token_formula():
    m = tiny("atom", d_model=48, n_heads=3, n_kv_heads=1, head_dim=16, ffn_dim=64, n_layers=2,
             xsa_layers="all")
    jitter_norms(m)
    ids = torch.randint(0, 97, (10,))
    with torch.no_grad():
        ours = m(ids[None])[0].double()
        torch.testing.assert_close(ours, reference_forward(m, ids), atol=1e-5, rtol=1e-5)
        # XSA changes the output (so the test above can tell XSA from plain attention).
        m.config.xsa_layers = None
        for b in m.blocks:
            b.attn.xsa = False
        assert (m(ids[None])[0].double() - ours).abs().max() > 1e-3
    # XSA with one layer only, and GQA with 2 groups.
    m2 = tiny("atom", n_heads=4, n_kv_heads=2, xsa_layers=[1])
    jitter_norms(m2)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids[None])[0].double(), reference_forward(m2, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_argonne_matches_reference_from_equations(window):
    m = tiny("argonne-3.0", sliding_window=window, n_heads=6, n_kv_heads=2, rope_theta=1e4)
    jitter_norms(m)
    ids = torch.randint(0, 97, (9,))
    with torch.no_grad():
        torch.testing.assert_close(m(ids[None])[0].double(), reference_forward(m, ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ vs transformers Gemma3

class _VNormProj(nn.Module):
    """Gemma3 has no V-norm: wrap its v_proj with RMSNorm(head_dim) per KV head (before GQA)."""

    def __init__(self, proj, weight, head_dim, eps):
        super().__init__()
        self.proj, self.weight, self.head_dim, self.eps = proj, weight, head_dim, eps

    def forward(self, x):
        v = self.proj(x)
        vh = v.view(*v.shape[:-1], -1, self.head_dim).float()
        vh = vh * torch.rsqrt(vh.pow(2).mean(-1, keepdim=True) + self.eps)
        return (vh.to(v.dtype) * self.weight).view(v.shape)


def _gemma3_from(model: DenseLM):
    from transformers import Gemma3ForCausalLM
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    c = model.config
    types = ["sliding_attention" if c.window_for(i) else "full_attention" for i in range(c.n_layers)]
    hc = Gemma3TextConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                          num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                          num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                          hidden_activation="silu", rms_norm_eps=c.norm_eps,
                          query_pre_attn_scalar=round((c.attn_scale or c.head_dim ** -0.5) ** -2),
                          final_logit_softcapping=c.logit_softcap, attn_logit_softcapping=None,
                          sliding_window=c.sliding_window or 4096, layer_types=types,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                                           "sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": c.rope_theta}},
                          tie_word_embeddings=True, max_position_embeddings=256, pad_token_id=0)
    hc._attn_implementation = "eager"
    hf = Gemma3ForCausalLM(hc).eval()
    one = lambda w: (w - 1.0).detach().clone()  # noqa: E731  Gemma norms are (1 + w)
    sd = {"model.embed_tokens.weight": model.embed.weight.detach().clone(),
          "model.norm.weight": one(model.norm.weight)}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        a = b.attn
        sd.update({p + "self_attn.q_proj.weight": a.q_proj.weight, p + "self_attn.k_proj.weight": a.k_proj.weight,
                   p + "self_attn.v_proj.weight": a.v_proj.weight, p + "self_attn.o_proj.weight": a.o_proj.weight,
                   p + "self_attn.q_norm.weight": one(a.q_norm.weight),
                   p + "self_attn.k_norm.weight": one(a.k_norm.weight),
                   p + "mlp.gate_proj.weight": b.mlp.gate_proj.weight, p + "mlp.up_proj.weight": b.mlp.up_proj.weight,
                   p + "mlp.down_proj.weight": b.mlp.down_proj.weight,
                   p + "input_layernorm.weight": one(b.attn_norm.weight),
                   p + "post_attention_layernorm.weight": one(b.attn_out_norm.weight),
                   p + "pre_feedforward_layernorm.weight": one(b.mlp_norm.weight),
                   p + "post_feedforward_layernorm.weight": one(b.mlp_out_norm.weight)})
    sd = {k: v.detach().clone() for k, v in sd.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    with torch.no_grad():
        hf.model.embed_tokens.embed_scale.fill_(1.0)  # Gemma scales embeddings by sqrt(d); Argonne does not
    for i, b in enumerate(model.blocks):
        att = hf.model.layers[i].self_attn
        att.v_proj = _VNormProj(att.v_proj, b.attn.v_norm.weight.detach().clone(), c.head_dim, c.norm_eps)
    return hf


@pytest.mark.parametrize("window", [None, 5])
def test_argonne_shape_matches_gemma3(window):
    m = tiny("argonne-3.0", n_layers=3, sliding_window=window)
    jitter_norms(m)
    assert m.blocks[0].attn.scale == 16 ** -0.5 and m.config.logit_softcap == 15.0  # follows head_dim
    hf = _gemma3_from(m)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ours, ref = m(ids), hf(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.abs().max() < 15.0  # softcapped


# ------------------------------------------------------------------------------ cache, grads, init

VARIANTS = {
    "atom": dict(preset="atom", n_heads=3, n_kv_heads=1),
    "axiom": dict(preset="axiom-380m"),
    "argonne": dict(preset="argonne-3.0"),
    "argonne_window": dict(preset="argonne-3.0", sliding_window=3, window_layers="odd"),
    "partial_rope_all_window": dict(preset="axiom-380m", rope_dims=8, sliding_window=4),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    m = tiny(**VARIANTS[name])
    jitter_norms(m)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 16)
        parts = [m(ids[:, :5], cache)]                      # prefill
        parts += [m(ids[:, t:t + 1], cache) for t in range(5, 9)]  # token by token
        parts.append(m(ids[:, 9:13], cache))               # a chunk after a prefix
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        m(ids[:, :4], cache)


@pytest.mark.parametrize("name", ["atom", "axiom", "argonne_window"])
def test_gradients_finite_and_checkpointing_identical(name):
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = tiny(**VARIANTS[name], activation_checkpointing=ckpt).train()
        loss = nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        g = {n: p.grad for n, p in m.named_parameters()}
        assert all(v is not None and torch.isfinite(v).all() for v in g.values())
        assert all(v.abs().sum() > 0 for v in g.values()), "every parameter gets gradient"
        grads.append(g)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset,std,out_std,emb_std", [
    ("axiom-380m", 0.02 / math.sqrt(48), 0.02 / math.sqrt(48), 0.02 / math.sqrt(48)),
    ("argonne-3.0", 384 ** -0.5, 48 ** -0.5, 384 ** -0.5),
    ("atom", 0.02, 0.02 / math.sqrt(48), 0.02),
])
def test_init_statistics_follow_source(preset, std, out_std, emb_std):
    # Real widths are too big for a unit test; keep n_layers=24 so depth-scaled stds are the real ones.
    torch.manual_seed(0)
    m = build_model({"arch": "dense", "preset": preset, "vocab_size": 1000, "d_model": 384, "n_layers": 24,
                     "n_heads": 6, "n_kv_heads": 2, "head_dim": 64, "ffn_dim": 512})
    b = m.blocks[5]
    for w, s in [(b.attn.q_proj.weight, std), (b.mlp.up_proj.weight, std), (b.attn.o_proj.weight, out_std),
                 (b.mlp.down_proj.weight, out_std), (m.embed.weight, emb_std)]:
        assert abs(w.std().item() / s - 1) < 0.03, (preset, w.shape, w.std().item(), s)
        assert abs(w.mean().item()) < 0.05 * s
    assert all((p == 1).all() for n, p in m.named_parameters() if p.ndim == 1)


# ------------------------------------------------------------------------------ compile, autocast

def test_torch_compile_fullgraph_matches_eager():
    m = tiny("argonne-3.0", sliding_window=4, xsa_layers=[0])
    ids = torch.randint(0, 97, (2, 10))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks allowed
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), m(ids), atol=1e-5, rtol=1e-5)
    m2 = tiny("atom", activation_checkpointing=True).train()
    out = torch.compile(m2, backend="aot_eager", fullgraph=True)(ids)
    out.sum().backward()
    assert torch.isfinite(m2.embed.weight.grad).all()


def test_bf16_autocast_logits_fp32_and_close():
    m = tiny("argonne-3.0")
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
