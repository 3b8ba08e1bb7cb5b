"""The memory plan of a run before launch: the per-rank peak of one training step at the curriculum's
real sizes, measured without allocating anything.

`plan_memory(cfg)` builds the model under FakeTensorMode (tensors with shapes, dtypes and storages but
no data) and runs the step the loop runs (the forward of one micro-batch under the run's autocast, the
loss, the backward, clipping, the optimizer step) under torch's own memory tracker,
torch.distributed._tools.mem_tracker.MemTracker (FSDPMemTracker for fsdp, with `fully_shard` over a
fake process group of the run's world size), which counts every live tensor storage by category.
The step is the steady one: optimizer state exists, and with grad accumulation the gradients exist
before the forward (fsdp: one micro-step without gradient sync, then the last one with it).

Measured: weights (fp32), gradients, optimizer state, activations (with or without activation
checkpointing), the loss, and fsdp's unsharded parameters and gradients, all-gather and
reduce-scatter buffers. The loss part is the head + cross-entropy working set (train.loss_chunk's
path: chunked, or the full logits at 0), measured on its own on the final hidden states and split out
of the activations at the peak. Counted, not measured
(`MemoryPlan.analytical`): DDP's gradient buckets at world > 1 (a flat fp32 copy of the gradients;
DDP cannot be built without real ranks).

A GPU run is planned on the CPU: bf16 autocast as CPU autocast (matmuls in bf16, weights fp32),
attention through the CPU flash kernel, which keeps what CUDA's flash kernel keeps (the output and
the log-sum-exp). Outside the plan: torch.compile (the plan is eager; compiled steps usually need
less), fla's Triton kernels (the hybrid plans our chunked Gated DeltaNet), bitsandbytes' 8-bit state
(adamw8bit is planned as fp32 AdamW, the loop's fallback: an upper bound), and the CUDA context,
NCCL and cuBLAS buffers and allocator fragmentation, which `RESERVE_GB` keeps free in the fit test.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker

GB = 1e9  # decimal, as bench.gpu's peak_mem_gb
RESERVE_GB = 2.0  # CUDA context, NCCL and cuBLAS buffers, fragmentation: not tensors, not in the plan

# the trackers' categories (MemTracker's _MemRefType, FSDPMemTracker's _FSDPRefType) -> the plan's parts;
# any other (Activation, Temp, Inputs, Other) is "activations"
PART = {"Parameter": "weights", "Buffer": "weights", "Sharded Param": "weights",
        "Gradient": "gradients", "Sharded Grad": "gradients", "Optstate": "optimizer", "OptState": "optimizer",
        "Unsharded Param": "fsdp_unsharded", "Unsharded Grad": "fsdp_unsharded",
        "All Gather": "fsdp_unsharded", "Reduce Scatter": "fsdp_unsharded"}


@dataclass
class MemoryPlan:
    parallel: str  # "ddp" | "fsdp"
    world: int
    device: str  # planned for: "cuda" (bf16 autocast where train.dtype is bf16) | "cpu"
    dtype: str  # train.dtype as planned ("fp32" on a CPU)
    micro_batch: int
    activation_checkpointing: bool
    loss_chunk: int  # tokens per chunk of the fused head + cross-entropy; 0: full logits
    parts: dict[str, int]  # bytes per rank at the peak; they sum to it
    analytical: tuple[str, ...] = ()  # parts counted, not measured
    peak_in: str = "forward/backward"  # or "optimizer step"

    @property
    def per_rank_gb(self) -> float:
        return sum(self.parts.values()) / GB

    def fits(self, gpu_mem_gb: float) -> bool:
        return self.per_rank_gb + RESERVE_GB <= gpu_mem_gb

    def to_json(self) -> dict:
        return {"per_rank_gb": round(self.per_rank_gb, 3),
                "parts": {k: round(v / GB, 3) for k, v in self.parts.items()},
                "parallel": self.parallel, "world_size": self.world, "device": self.device, "dtype": self.dtype,
                "micro_batch": self.micro_batch, "activation_checkpointing": self.activation_checkpointing,
                "loss_chunk": self.loss_chunk, "analytical": list(self.analytical), "peak_in": self.peak_in}


class PeakTracker(MemTracker):
    """MemTracker keeping the whole-step peak only: its per-module peaks cost O(modules) per op."""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)


class FSDPPeakTracker(FSDPMemTracker):
    """FSDPMemTracker, the whole-step peak only, over several optimizers (Muon + AdamW)."""

    _update_peak_stats = PeakTracker._update_peak_stats

    def __init__(self, mod, optims: list) -> None:
        super().__init__(mod, None)
        self._optms = optims

    def _instrument_optimizer(self) -> None:
        handles = []
        for optim in self._optms:
            self._optm = optim
            super()._instrument_optimizer()
            handles += self._optimizer_hook_handles
        self._optimizer_hook_handles = tuple(handles)


def target_device(cfg) -> str:
    """What a run of `cfg` trains on: a GPU unless train.device says cpu (a CPU machine plans for it)."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def plan_memory(cfg, world: int | None = None, parallel: str | None = None, micro_batch: int | None = None,
                checkpointing: bool | None = None, loss_chunk: int | None = None, device: str | None = None,
                grad_accum: int | None = None) -> MemoryPlan:
    """The per-rank peak of one steady training step of `cfg` (the given values replace the config's;
    loss_chunk is train.loss_chunk's: tokens per chunk of the fused head + cross-entropy, 0 full logits)."""
    world = world or cfg.resolved.world_size
    parallel = parallel or cfg.train.parallel
    device = device or target_device(cfg)
    ckpt = cfg.train.activation_checkpointing if checkpointing is None else checkpointing
    mb = micro_batch or cfg.batch.micro_batch
    loss_chunk = cfg.train.loss_chunk if loss_chunk is None else loss_chunk
    bf16 = device == "cuda" and cfg.train.dtype == "bf16"
    mcfg = dataclasses.replace(cfg.model, activation_checkpointing=ckpt)
    shape = (mb, cfg.batch.seq_len)
    sharded = parallel == "fsdp" and world > 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fake_group(world) if sharded else contextlib.nullcontext() as mesh, FakeTensorMode():
        model = fake_model(mcfg, mesh, bf16)
        from .optim import build_optimizer

        opt = build_optimizer(model, dataclasses.replace(cfg.optim, name="adamw") if cfg.optim.name == "adamw8bit"
                              else cfg.optim, device)
        accum = grad_accum or cfg.resolved.grad_accum
        snap, peak_in = measure_step(model, opt, shape, bf16, accum, cfg.optim.grad_clip, loss_chunk)
        loss = loss_bytes(mcfg, shape, bf16, loss_chunk) if peak_in == "forward/backward" else 0
    parts = split_parts(snap, loss)
    analytical = ()
    if parallel == "ddp" and world > 1:  # DDP's flat buckets, one fp32 copy of every gradient
        parts["ddp_buckets"], analytical = param_bytes(mcfg), ("ddp_buckets",)
    return MemoryPlan(parallel, world, device, "bf16" if bf16 else "fp32", mb, ckpt, loss_chunk, parts, analytical,
                      peak_in)


@contextlib.contextmanager
def fake_group(world: int):
    """A fake process group of `world` ranks (this process is rank 0; collectives move no data) and
    its 1-D CPU mesh, for fully_shard on fake tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan_memory: fsdp is planned over a fake process group; one is initialised already")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def fake_model(mcfg, mesh, bf16: bool) -> torch.nn.Module:
    """The model on fake CPU tensors (under FakeTensorMode), fully_shard as trainer.parallel does
    when `mesh` is given. Built on the meta device (no init), then given fake storage."""
    from .models import build_model

    model = build_model(mcfg, device="meta")
    if mesh is None:
        memo = {}  # tied weights stay one tensor
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[name] = memo.setdefault(id(p), torch.nn.Parameter(
                        torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
            for name, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[name] = torch.empty_like(b, device="cpu")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mp = mp or MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model.to_empty(device="cpu")


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def micro_step(model, x, y, bf16: bool, loss_chunk: int) -> None:
    """One micro-batch as trainer.loop.forward_backward runs it: the model computes its loss."""
    model.loss_chunk = loss_chunk  # as trainer.loop sets it from train.loss_chunk
    with autocast(bf16):
        loss = model(x, targets=y)
    loss.backward()


def measure_step(model, opt, shape, bf16: bool, accum: int, clip: float | None, loss_chunk: int):
    """The peak snapshot (category -> bytes) of one steady step, and whether it falls in the
    forward/backward or the optimizer step."""
    from .parallel import is_sharded

    optims = getattr(opt, "optimizers", [opt])  # trainer.optim.CombinedOptimizer (Muon + AdamW)
    sharded = is_sharded(model)
    for p in model.parameters():  # a first update, so the optimizer state exists
        p.grad = torch.zeros_like(p)
    opt.step()
    if sharded or accum == 1:  # else the gradients of the earlier micro-steps are there
        opt.zero_grad(set_to_none=True)
    x = torch.zeros(shape, dtype=torch.long)
    y = torch.zeros(shape, dtype=torch.long)
    if sharded:
        tracker = FSDPPeakTracker(model, optims)
        tracker.track_inputs((x, y))
    else:
        tracker = PeakTracker()
        tracker.track_external(model, *optims, x, y)
    with tracker:
        for micro in range(2 if sharded and accum > 1 else 1):
            if sharded:
                model.set_requires_gradient_sync(micro == 1 or accum == 1)
            micro_step(model, x, y, bf16, loss_chunk)
            tracker.reset_mod_stats()
        fwd_bwd = tracker.get_tracker_snapshot("peak")
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
    (snap,), (before,) = peak.values(), fwd_bwd.values()
    return snap, ("optimizer step" if snap["Total"] > before["Total"] else "forward/backward")


def loss_bytes(mcfg, shape, bf16: bool, loss_chunk: int) -> int:
    """The loss's own working set (under FakeTensorMode): the head's logits, the cross-entropy and
    their backward on [micro_batch, seq_len, d_model] final hidden states, inputs and weight excluded."""
    from .loss import linear_cross_entropy

    h = torch.zeros(*shape, mcfg.d_model, requires_grad=True)
    w = torch.zeros(mcfg.vocab_size, mcfg.d_model, requires_grad=True)
    y = torch.zeros(shape, dtype=torch.long)
    cap = getattr(mcfg, "logit_softcap", None)
    tracker = PeakTracker()
    tracker.track_external(h, w, y)
    with tracker:
        with autocast(bf16):  # as CausalLM._loss computes it
            loss = linear_cross_entropy(h, w, y, None, cap, loss_chunk) if loss_chunk else full_loss(h, w, y, cap)
        loss.backward()
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    return snap["Activation"] + snap["Temp"]


def full_loss(h, w, y, cap: float | None) -> torch.Tensor:
    """CausalLM's head then compute_loss: fp32 [tokens, vocab] logits, softcapped where the model is."""
    from .loss import compute_loss

    logits = F.linear(h, w).float()
    return compute_loss(cap * torch.tanh(logits / cap) if cap is not None else logits, y, None)


def split_parts(snap: dict, loss: int) -> dict[str, int]:
    """A tracker's peak snapshot as the plan's parts; the loss's bytes come out of the activations."""
    parts = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "loss": 0}
    for kind, n in snap.items():
        if kind != "Total":
            key = PART.get(getattr(kind, "value", kind), "activations")
            parts[key] = parts.get(key, 0) + n
    parts["loss"] = min(loss, parts["activations"])
    parts["activations"] -= parts["loss"]
    return parts


def param_bytes(mcfg) -> int:
    from .models import build_model

    return sum(p.numel() * p.element_size() for p in build_model(mcfg, device="meta").parameters())


def suggest(cfg, plan: MemoryPlan, gpu_mem_gb: float) -> tuple[str, MemoryPlan | None]:
    """What would fit `gpu_mem_gb` when `plan` does not, each candidate planned the same way: one of
    the chunked loss (if off), fsdp (ddp at world > 1), activation checkpointing; then all of them;
    then with them the largest smaller micro-batch that keeps the tokens per step.
    ("overrides", its plan), or (why not, None)."""
    from .loss import LOSS_CHUNK

    kw = {"world": plan.world, "parallel": plan.parallel, "checkpointing": plan.activation_checkpointing,
          "micro_batch": plan.micro_batch, "device": plan.device, "loss_chunk": plan.loss_chunk}
    can_shard = plan.parallel == "ddp" and plan.world > 1 and cfg.optim.name != "adamw8bit"  # fsdp refuses it
    options = [(f"train.loss_chunk={LOSS_CHUNK}", {"loss_chunk": LOSS_CHUNK}, not plan.loss_chunk),
               ("train.parallel=fsdp", {"parallel": "fsdp"}, can_shard),
               ("train.activation_checkpointing=true", {"checkpointing": True}, not plan.activation_checkpointing)]
    options = [(o, change) for o, change, when in options if when]
    every = {k: v for _, change in options for k, v in change.items()}
    changes = [o for o, _ in options]
    for names, change in [([o], c) for o, c in options] + ([(changes, every)] if len(options) > 1 else []):
        p = plan_memory(cfg, **{**kw, **change})
        if p.fits(gpu_mem_gb):
            return " ".join(names), p
    if options:  # the last one planned has every change
        kw.update(every)
        plan = p
    rows = plan.micro_batch * cfg.resolved.grad_accum  # per rank and step
    per_row = (plan.parts["activations"] + plan.parts["loss"]) / plan.micro_batch
    fixed = sum(plan.parts.values()) - per_row * plan.micro_batch
    room = (gpu_mem_gb - RESERVE_GB) * GB - fixed
    tries = [m for m in range(plan.micro_batch - 1, 0, -1) if rows % m == 0 and m * per_row <= room][:3]
    for m in tries:  # the largest the scaling allows first; each checked by its own plan
        p = plan_memory(cfg, **{**kw, "micro_batch": m}, grad_accum=rows // m)
        if p.fits(gpu_mem_gb):
            return " ".join(changes + [f"batch.micro_batch={m}"]), p
    if per_row > room:
        more = "; shard over more GPUs (train.parallel=fsdp)" if cfg.optim.name != "adamw8bit" else ""
        return (f"even micro_batch 1 needs {(fixed + per_row) / GB:.1f} GB per rank (weights, gradients and "
                f"optimizer state {fixed / GB:.1f}){more}"), None
    tried = " ".join(changes) or "no fsdp or checkpointing to add"
    return f"nothing found ({tried}; micro_batch {tries or 'none'} planned)", None


def local_gpu_gb(local_rank: int = 0) -> float | None:
    """The local GPU's memory in GB, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(local_rank).total_memory / GB


def plan_lines(plan: MemoryPlan, gpu_mem_gb: float | None, fix: tuple | None) -> list[str]:
    """The dry run's lines: the plan, then whether it fits and, if not, what would (`fix`: suggest's)."""
    parts = ", ".join(f"{k} {v / GB:.3g}" + "*" * (k in plan.analytical) for k, v in plan.parts.items()
                      if v >= GB / 1000)
    loss = f"loss_chunk {plan.loss_chunk}" if plan.loss_chunk else "full logits"
    how = (f"{plan.parallel}, world {plan.world}, {plan.device} {plan.dtype}, micro_batch {plan.micro_batch}, {loss}, "
           f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}; peak in the {plan.peak_in}")
    lines = [f"  memory/rank     {plan.per_rank_gb:.1f} GB planned: {parts} GB"
             + (" (* counted, not measured)" if plan.analytical else ""), f"                  ({how})"]
    if gpu_mem_gb is None:
        return lines + ["                  no GPU here: --gpu-mem GB says whether it fits"]
    if plan.fits(gpu_mem_gb):
        spare = gpu_mem_gb - RESERVE_GB - plan.per_rank_gb
        fits = f"fits {gpu_mem_gb:g} GB ({spare:.1f} GB to spare beside {RESERVE_GB:g} GB for CUDA context and NCCL)"
        return [*lines, "                  " + fits]
    what, p = fix if fix is not None else ("", None)
    tail = f"fits with {what} ({p.per_rank_gb:.1f} GB per rank)" if p is not None else what
    head = f"{gpu_mem_gb:g} GB per GPU ({plan.per_rank_gb:.1f} + {RESERVE_GB:g} GB reserve)"
    return [*lines, f"  DOES NOT FIT    {head}: {tail}"]


def report(cfg, gpu_mem_gb: float | None = None, cache: dict | None = None, local_rank: int = 0) -> dict:
    """The dry run's memory section of one stage: plan, print its lines, return its JSON (stages with
    the same model, batch, optimizer and parallelism share one plan through `cache`)."""
    gpu = gpu_mem_gb if gpu_mem_gb is not None else local_gpu_gb(local_rank)
    t = cfg.train
    key = repr((cfg.model, cfg.batch, cfg.optim, t.parallel, t.dtype, t.device, t.activation_checkpointing,
                t.loss_chunk, cfg.resolved.grad_accum, cfg.resolved.world_size, gpu))
    cache = {} if cache is None else cache
    if key not in cache:
        try:
            plan = plan_memory(cfg)
        except Exception as e:  # noqa: BLE001 - an op without a fake kernel must not stop the dry run
            print(f"  memory/rank     not planned: {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}"}
        cache[key] = plan, (suggest(cfg, plan, gpu) if gpu is not None and not plan.fits(gpu) else None)
    plan, fix = cache[key]
    print("\n".join(plan_lines(plan, gpu, fix)))
    out = {**plan.to_json(), "gpu_mem_gb": gpu, "fits": None if gpu is None else plan.fits(gpu)}
    if fix is not None:
        out["suggestion"] = {"change": fix[0], "per_rank_gb": round(fix[1].per_rank_gb, 3) if fix[1] else None}
    return out
