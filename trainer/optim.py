"""Optimizers: AdamW (decoupled), AdamW8bit (bitsandbytes, CUDA only, else logged fallback), and
Muon for matrix weights with AdamW for the rest.

Parameter roles come from the model: `model.param_kinds()` maps each parameter name to
"embedding" | "matrix" | "vector". AdamW decays the kinds in `optim.decay_kinds` (default embedding
+ matrix, not norms/gains/biases). Muon takes every "matrix" param of >= 2 dims (a 3-D depthwise
conv weight is viewed as [out, in*k]); embeddings and vectors go to AdamW.

Every param group carries `base_lr` (its peak lr) and `kind`; `trainer.lr_schedule.set_lr` scales
base_lr by the schedule multiplier.
"""
from __future__ import annotations

import math
import typing

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .config import MuonMomentumStyle, MuonNSDtype, OptimName, OptimSection
from .telemetry.console import log


NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """Approximately orthogonalise G (UΣVᵀ -> ~UVᵀ) with the quintic Newton–Schulz iteration.

    X ← G/‖G‖_F, then `steps` times X ← aX + (b·A + c·A²)X with A = XXᵀ. Each singular value σ
    (after the Frobenius normalisation) maps through p(x) = ax + bx³ + cx⁵ five times. The
    coefficients maximise the slope at 0, so p⁵ does not converge to 1: for normalised σ >= ~3e-3 it
    lands in [0.68, 1.21] (checked numerically in tests/trainer/test_optim.py), tiny σ stay small.
    """
    a, b, c = NS_COEFFS
    X = G.to(dtype or G.dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # work with the wide orientation so A = XXᵀ is the small Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum + Newton–Schulz orthogonalised update) for matrix parameters.

    Per param p with gradient g (viewed 2-D as [rows, cols]), in the default form (Llama Think's):
        buf ← μ·buf + g                            (summed momentum, μ = 0.95)
        u   ← g + μ·buf  if nesterov else buf
        O   ← NS5(u)                               (in fp32)
        p   ← p·(1 − lr·wd) − lr·√(max(r,c)/min(r,c))·O     (decoupled weight decay)
    momentum_style="ema" is KellerJordan/Muon's form, buf ← lerp(buf, g, 1−μ), u ← lerp(g, buf, μ): the
    same direction up to a factor (1−μ), but NS then sees an input ~1/(1−μ) = 20x smaller, so the
    +eps in its Frobenius normalisation matters at small gradient norms. ns_dtype="bf16" runs NS in
    bf16 on CUDA (fp32 elsewhere). torch.optim.Muon's code (2.13) keeps lerp momentum (its
    docstring's formula shows the summed form), runs NS in bf16 and scales by √max(1, rows/cols)
    (equal to ours for tall matrices).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 momentum_style: str = "sum", ns_dtype: str = "fp32"):
        if momentum_style not in typing.get_args(MuonMomentumStyle):
            raise ValueError(f"Muon momentum_style must be one of {typing.get_args(MuonMomentumStyle)}, "
                             f"got {momentum_style!r}")
        if ns_dtype not in typing.get_args(MuonNSDtype):
            raise ValueError(f"Muon ns_dtype must be one of {typing.get_args(MuonNSDtype)}, got {ns_dtype!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        momentum_style=momentum_style, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs >= 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            sharded = [p for p in params if isinstance(p, DTensor)]  # FSDP2 at world > 1
            for p in params:
                if not isinstance(p, DTensor):
                    rows, cols = _matrix_shape(p)
                    O = _orthogonalise(self._momentum(p, group), group)
                    _apply_update(p, O, group, rows, cols)
            if sharded:
                _sharded_step(self, sharded, group)
        return loss

    def _momentum(self, p, group) -> torch.Tensor:
        """Update p's momentum buffer and return the direction to orthogonalise as [rows, cols] (this
        rank's rows under FSDP2: the update is elementwise, so each rank keeps only its shard)."""
        mu, g, state = group["momentum"], p.grad, self.state[p]
        if "momentum_buffer" not in state:  # a DTensor under FSDP2: DCP saves and reshards it
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        if isinstance(g, DTensor):  # local shards: no DTensor dispatch for pointwise work
            g, buf = g.to_local(), buf.to_local()
        if group["momentum_style"] == "sum":
            buf.mul_(mu).add_(g)
            u = g.add(buf, alpha=mu) if group["nesterov"] else buf
        else:
            buf.lerp_(g, 1 - mu)
            u = g.lerp(buf, mu) if group["nesterov"] else buf
        return u.reshape(u.size(0), _matrix_shape(p)[1])  # cols from the full shape: a shard may hold 0 rows


def _matrix_shape(p) -> tuple[int, int]:
    """The full parameter's [rows, cols] (a 3-D conv weight [out, in, k] is [out, in*k])."""
    return p.shape[0], p.numel() // p.shape[0]


def _orthogonalise(u2: torch.Tensor, group) -> torch.Tensor:
    bf16 = group["ns_dtype"] == "bf16" and u2.is_cuda
    ns_dtype = torch.bfloat16 if bf16 else torch.promote_types(u2.dtype, torch.float32)
    return zeropower_newton_schulz(u2, steps=group["ns_steps"], dtype=ns_dtype)


def _apply_update(p: torch.Tensor, O: torch.Tensor, group, rows: int, cols: int) -> None:
    """p ← p·(1 − lr·wd) − lr·√(max/min)·O, with the full matrix's aspect ratio (p may be a shard)."""
    lr, wd = group["lr"], group["weight_decay"]
    scale = math.sqrt(max(rows, cols) / min(rows, cols))
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(O.view_as(p).to(p.dtype), alpha=-lr * scale)


# ---- Muon over FSDP2 shards. Newton–Schulz needs the whole matrix, FSDP2 gives each rank rows
# [Shard(0)]. As nanochat's DistMuon and torchtitan's dist Muon spread the work, the params go in
# blocks of `world`: in a block rank r owns param r, gathers its momentum rows from every rank,
# orthogonalises it alone, and scatters the rows back; each rank then updates its own shard. The
# traffic is one gather and one scatter of each matrix (an all-gather's worth), the NS work is 1/world.

def _shard_rows(rows: int, world: int) -> list[int]:
    """Rows per rank of FSDP2's Shard(0) split (torch.chunk: ceil(rows/world) each, the last short or empty)."""
    step = -(-rows // world)
    return [max(0, min(step, rows - r * step)) for r in range(world)]


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Collectives need equal sizes on every rank: pad a short shard with zero rows."""
    if t.size(0) == n:
        return t.contiguous()
    return torch.cat([t, t.new_zeros(n - t.size(0), *t.shape[1:])])


def _sharded_step(opt: Muon, params: list, group) -> None:
    from torch.distributed.tensor import Shard

    mesh = params[0].device_mesh
    if mesh.ndim != 1 or any(p.placements != (Shard(0),) for p in params):
        raise ValueError("sharded Muon needs FSDP2's 1-D mesh with Shard(0) parameters")
    pg = mesh.get_group()
    for start in range(0, len(params), pg.size()):
        block = params[start:start + pg.size()]
        us = [opt._momentum(p, group) for p in block]
        for p, u in zip(block, us):
            if u.size(0) != _shard_rows(p.shape[0], pg.size())[pg.rank()]:
                raise ValueError(f"sharded Muon: shard of {tuple(p.shape)} holds {u.size(0)} rows, not torch.chunk's")
        mine = _gather_to_owners(block, us, pg)
        O = _orthogonalise(mine, group) if mine is not None else None
        for p, o in zip(block, _scatter_from_owners(block, us, O, pg)):
            _apply_update(p.to_local(), o, group, *_matrix_shape(p))


def _gather_to_owners(block: list, us: list, pg) -> torch.Tensor | None:
    """Every rank sends its rows of block[j] to rank j (all gathers in flight at once); returns the
    full matrix this rank owns, or None when the block is shorter than the world."""
    works, mine = [], None
    for owner, (p, u) in enumerate(zip(block, us)):
        sizes = _shard_rows(p.shape[0], pg.size())
        send = _pad_rows(u, sizes[0])
        recv = [torch.empty_like(send) for _ in sizes] if owner == pg.rank() else None
        works.append(dist.gather(send, recv, group=pg, group_dst=owner, async_op=True))
        if recv is not None:
            mine = (recv, sizes)
    for w in works:
        w.wait()
    if mine is None:
        return None
    recv, sizes = mine
    return torch.cat([r[:n] for r, n in zip(recv, sizes)])


def _scatter_from_owners(block: list, us: list, O: torch.Tensor | None, pg) -> list[torch.Tensor]:
    """Rank j sends each rank its rows of the orthogonalised block[j]; returns this rank's rows of each."""
    works, outs = [], []
    for owner, (p, u) in enumerate(zip(block, us)):
        sizes = _shard_rows(p.shape[0], pg.size())
        out = u.new_empty(sizes[0], u.size(1))
        send = [_pad_rows(c, sizes[0]) for c in O.to(u.dtype).split(sizes)] if owner == pg.rank() else None
        works.append(dist.scatter(out, send, group=pg, group_src=owner, async_op=True))
        outs.append(out)
    for w in works:
        w.wait()
    return [o[:u.size(0)] for o, u in zip(outs, us)]


class CombinedOptimizer:
    """Several optimizers stepped together (Muon + AdamW), one state_dict, one `param_groups` list."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, sd):
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(sd[str(i)])


def named_params_by_kind(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Group trainable params by `model.param_kinds()` (tied weights appear once)."""
    kinds = model.param_kinds() if hasattr(model, "param_kinds") else {}
    out: dict[str, list] = {"embedding": [], "matrix": [], "vector": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = kinds.get(name)
        if kind is None:  # fall back on shape: a model without param_kinds still trains
            kind = "matrix" if p.ndim >= 2 else "vector"
        if kind not in out:
            raise ValueError(f"{type(model).__name__}.param_kinds(): {name}: unknown kind {kind!r}")
        out[kind].append((name, p))
    return out


def _adamw(groups, betas, eps, device_type: str):
    kw = dict(betas=tuple(betas), eps=eps)
    if device_type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw)


def adamw_groups(by_kind, lr: float, weight_decay: float, decay_kinds=("embedding", "matrix")) -> list[dict]:
    decay = [p for k in ("embedding", "matrix", "vector") if k in decay_kinds for _, p in by_kind[k]]
    no_decay = [p for k in ("embedding", "matrix", "vector") if k not in decay_kinds for _, p in by_kind[k]]
    groups = []
    if decay:
        groups.append(dict(params=decay, lr=lr, base_lr=lr, weight_decay=weight_decay, kind="decay"))
    if no_decay:
        groups.append(dict(params=no_decay, lr=lr, base_lr=lr, weight_decay=0.0, kind="no_decay"))
    return groups


def _build_adamw8bit(by_kind, cfg: OptimSection, device_type: str):
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception:
        bnb = None
    if bnb is None or device_type != "cuda":
        why = "bitsandbytes is not installed" if bnb is None else "not on CUDA"
        log.info(f"[optim] adamw8bit unavailable ({why}); using AdamW")
        return _build_adamw(by_kind, cfg, device_type)
    groups = adamw_groups(by_kind, cfg.lr, cfg.weight_decay, cfg.decay_kinds)
    return bnb.optim.AdamW8bit(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def _build_adamw(by_kind, cfg: OptimSection, device_type: str):
    groups = adamw_groups(by_kind, cfg.lr, cfg.weight_decay, cfg.decay_kinds)
    return _adamw(groups, cfg.betas, cfg.eps, device_type)


def _build_muon(by_kind, cfg: OptimSection, device_type: str):
    m = cfg.muon
    muon_lr = m.lr if m.lr is not None else cfg.lr
    muon_wd = m.weight_decay if m.weight_decay is not None else cfg.weight_decay
    # Llama Think's training loop set EVERY group's lr to the Muon schedule (peak 0.02), so the
    # card's AdamW lr 0.002 was never used: its curriculum leaves muon.adamw_lr unset (= optim.lr).
    adamw_lr = m.adamw_lr if m.adamw_lr is not None else cfg.lr
    matrices = [p for _, p in by_kind["matrix"] if p.ndim >= 2]
    rest = [p for _, p in by_kind["matrix"] if p.ndim < 2] + [p for _, p in by_kind["embedding"]] + [
        p for _, p in by_kind["vector"]
    ]
    opts = []
    if matrices:
        opts.append(Muon([dict(params=matrices, lr=muon_lr, base_lr=muon_lr, kind="muon")],
                         lr=muon_lr, momentum=m.momentum, nesterov=m.nesterov, ns_steps=m.ns_steps,
                         weight_decay=muon_wd, momentum_style=m.momentum_style, ns_dtype=m.ns_dtype))
    if rest:
        opts.append(_adamw([dict(params=rest, lr=adamw_lr, base_lr=adamw_lr, weight_decay=m.adamw_weight_decay,
                                 kind="adamw")], m.adamw_betas, m.adamw_eps, device_type))
    return CombinedOptimizer(opts)


# optim.name -> builder; the names themselves are the config's OptimName (the converter refuses others)
BUILDERS = {"adamw": _build_adamw, "adamw8bit": _build_adamw8bit, "muon": _build_muon}
assert set(BUILDERS) == set(typing.get_args(OptimName)), "every OptimName needs a builder"


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, device_type: str = "cpu"):
    return BUILDERS[cfg.name](named_params_by_kind(model), cfg, device_type)
