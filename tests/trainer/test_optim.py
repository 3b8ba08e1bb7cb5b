"""Optimizers: our AdamW construction vs a hand-built torch.optim.AdamW; Muon's Newton–Schulz vs
its spectral definition; Muon's step vs a reference written from the equations (SVD-based, fp64),
and vs torch.optim.Muon."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from trainer.config import MuonSection, OptimSection
from trainer.models import build_model
from trainer.optim import CombinedOptimizer, Muon, build_optimizer, zeropower_newton_schulz

TINY = dict(arch="dense", vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32)
A, B, C = 3.4445, -4.7750, 2.0315


def p5(x):
    for _ in range(5):
        x = A * x + B * x**3 + C * x**5
    return x


def ns_reference(G, eps=1e-7):
    """NS5 by its definition on singular values: U · p⁵(σ/(‖G‖_F + eps)) · Vᵀ (fp64, via SVD)."""
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ torch.diag(p5(S / (G.norm() + eps))) @ Vh


def published_muon_step(p, g, buf, lr, mu, wd, eps=1e-7):
    """Llama Think's Muon, written from its update rule (fp64, NS by SVD): summed momentum
    buf = mu*buf + g, Nesterov u = g + mu*buf, O = NS5(u viewed [rows, -1]) after Frobenius
    normalisation with +eps, p = p*(1 - lr*wd) - lr*sqrt(max(r,c)/min(r,c))*O."""
    buf = mu * buf + g
    u = g + mu * buf
    u2 = u.reshape(u.shape[0], -1).double()
    r, c = u2.shape
    O = ns_reference(u2, eps).reshape(u.shape).to(p.dtype)
    return p * (1 - lr * wd) - lr * math.sqrt(max(r, c) / min(r, c)) * O, buf


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def test_adamw_matches_hand_built_torch_adamw():
    torch.manual_seed(0)
    model = build_model(TINY)
    ref = copy.deepcopy(model)
    cfg = OptimSection(name="adamw", lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    # expected groups: decay = every >=2-D weight incl. the tied embedding; no decay = norm gains
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.ndim < 2]
    assert no_decay and decay
    ref_opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)], lr=1e-2, betas=(0.9, 0.95), eps=1e-8
    )
    names_decay = {n for n, p in model.named_parameters() if any(p is q for g in opt.param_groups if g["weight_decay"] > 0 for q in g["params"])}
    assert names_decay == {n for n, p in model.named_parameters() if p.ndim >= 2}
    init = model.embed.weight.detach().clone()
    for step in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    # and the update did something (the test can fail)
    assert not torch.equal(model.embed.weight, init)


def test_newton_schulz_acts_on_singular_values_as_the_quintic():
    torch.manual_seed(0)
    for shape in [(48, 32), (32, 48), (40, 40)]:
        # well-conditioned input: singular values spread over [0.05, 1] before normalisation
        U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64))
        k = min(shape)
        S = torch.linspace(0.05, 1.0, k, dtype=torch.float64)
        G = U[:, :k] @ torch.diag(S) @ V[:, :k].T
        out = zeropower_newton_schulz(G, steps=5)
        assert (out - ns_reference(G)).abs().max() < 1e-9
        sv = torch.linalg.svdvals(out)
        # p⁵ of the quintic keeps normalised σ >= ~3e-3 inside [0.68, 1.21]; it does not converge to 1
        assert sv.min() > 0.68 and sv.max() < 1.21, (sv.min(), sv.max())
        # near-orthogonal: OᵀO (wide: OOᵀ) close to identity in the sense of those bounds
    x = torch.logspace(-2.5, 0, 2000, dtype=torch.float64)
    y = p5(x)
    assert y.min() > 0.68 and y.max() < 1.21


class WithConv(nn.Module):
    """A matrix, a 3-D depthwise conv weight (as in Gated DeltaNet), a gain and an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.w = nn.Parameter(torch.randn(12, 8))
        self.conv = nn.Parameter(torch.randn(8, 1, 4))
        self.gain = nn.Parameter(torch.ones(8))

    def param_kinds(self):
        return {"embed.weight": "embedding", "w": "matrix", "conv": "matrix", "gain": "vector"}

    def forward(self, x):
        h = self.embed(x) * self.gain  # [B, T, 8]
        h = nn.functional.conv1d(h.transpose(1, 2), self.conv, groups=8, padding=3)[..., : x.shape[1]].transpose(1, 2)
        return h @ self.w.T


def test_muon_step_matches_equations_including_conv_weight():
    torch.manual_seed(0)
    model = WithConv().double()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimSection(name="muon", lr=0.02, weight_decay=0.01, muon=MuonSection(adamw_betas=[0.9, 0.99]))
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(model.w), id(model.conv)}
    g = adamw.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"], g["lr"]) == ((0.9, 0.99), 1e-8, 0.01, 0.02)

    lr, wd, mu = 0.02, 0.01, 0.95
    ref = {n: init[n].clone() for n in ("w", "conv")}
    bufs = {n: torch.zeros_like(ref[n]) for n in ref}
    for step in range(3):
        opt.zero_grad()
        x = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        grads = {n: getattr(model, n).grad.clone() for n in ref}
        opt.step()
        for n in ref:
            ref[n], bufs[n] = published_muon_step(ref[n], grads[n], bufs[n], lr, mu, wd)
            assert (getattr(model, n).detach() - ref[n]).abs().max() < 1e-10, (n, step)
    assert not torch.allclose(model.w, init["w"])


@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 24), (12, 1, 4)], ids=["square", "tall", "wide", "conv"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
def test_muon_default_is_the_published_rule(shape, scale):
    """Default Muon (summed momentum, NS in fp32 or wider) against the published rule, several shapes
    (the [C, 1, K] depthwise conv weight too) and gradient scales; at 1e-6 the EMA form's 20x smaller
    NS input makes the +eps visible, so an EMA default would fail here."""
    torch.manual_seed(0)
    w0 = torch.randn(*shape, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
    ref, buf = w0.clone(), torch.zeros_like(w0)
    for step in range(4):
        g = scale * torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        p.grad = g.clone()
        opt.step()
        ref, buf = published_muon_step(ref, g, buf, 0.02, 0.95, 0.01)
        assert (p.detach() - ref).abs().max() < 1e-10, step
    assert (opt.state[p]["momentum_buffer"] - buf).abs().max() <= 1e-12 * scale


def test_muon_ema_option_differs_where_eps_matters():
    """momentum_style="ema" (lerp) stays available; at a 1e-6 gradient scale it moves the weights
    measurably differently from the published summed form (relative difference > 1e-3)."""
    w0 = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    deltas = {}
    for style in ("sum", "ema"):
        p = nn.Parameter(w0.clone())
        opt = Muon([p], lr=0.02, momentum=0.95, momentum_style=style)
        for step in range(3):
            p.grad = 1e-6 * torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            opt.step()
        deltas[style] = p.detach() - w0
    rel = (deltas["sum"] - deltas["ema"]).norm() / deltas["sum"].norm()
    assert rel > 1e-3, rel
    with pytest.raises(ValueError, match="momentum_style"):
        Muon([nn.Parameter(w0.clone())], momentum_style="lerp")


def test_muon_vs_torch_optim_muon():
    """torch.optim.Muon (2.13) code: lerp momentum (our momentum_style="ema"), scale √max(1, rows/cols)
    (equal to ours for tall matrices), NS in bf16 (ours in fp32 on CPU) -> equal up to bf16 rounding."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon not in this torch")
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    ours_p = nn.Parameter(w0.clone())
    theirs_p = nn.Parameter(w0.clone())
    ours = Muon([ours_p], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, momentum_style="ema")
    theirs = torch.optim.Muon([theirs_p], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
    for step in range(3):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        ours_p.grad = g.clone()
        theirs_p.grad = g.clone()
        ours.step()
        theirs.step()
    delta_ours = ours_p.detach() - w0
    delta_theirs = theirs_p.detach() - w0
    rel = (delta_ours - delta_theirs).norm() / delta_theirs.norm()
    assert rel < 0.02, rel  # bf16 NS vs fp32 NS
    assert delta_ours.norm() > 0


def test_adamw8bit_falls_back_on_cpu(capsys):
    model = build_model(TINY)
    opt = build_optimizer(model, OptimSection(name="adamw8bit"), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert "adamw8bit unavailable" in capsys.readouterr().out
