"""FSDP2 (`train.parallel: fsdp`): each rank holds 1/world of every parameter, gradient and
optimizer state, for models whose AdamW state does not fit replicated on every GPU (Argonne).

`fully_shard` per block, then the root (embedding, final norm, head): a block's parameters are
all-gathered for its forward and again for its backward, and freed after. On GPU with
`train.dtype: bf16` the MixedPrecisionPolicy computes in bf16 and reduce-scatters gradients in fp32
into fp32 master weights. Activation checkpointing stays the model's own (`train.activation_checkpointing`):
the recompute calls the block module again, so its pre-forward hook all-gathers again. Gradient
accumulation skips the reduce-scatter on all but the last micro-step, as DDP's `no_sync` does.

Checkpoints keep the layout every other tool reads: `model.safetensors` holds the full weights
(gathered to rank 0 on the CPU; the same file DDP writes), and the optimizer state is written
sharded through torch.distributed.checkpoint into `CKPT/optimizer/` (each rank its own part). DCP
reshards on load, so a run resumes at another world size (keeping its tokens per step). At world
size 1 nothing is sharded and the same checkpoint code runs. DCP needs every rank to see the
checkpoint folder: a shared filesystem on a multi-node run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, ConfigError

OPTIMIZER_DIR = "optimizer"  # DCP folder inside a checkpoint


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, cfg: Config, device: torch.device, world: int) -> None:
    """fully_shard in place (before the optimizer is built: it must hold the sharded parameters)."""
    if world == 1 or not dist.is_initialized():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and cfg.train.dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


class GradSync:
    """`no_sync()` as forward_backward takes it from DDP: no reduce-scatter inside the context."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def gather_for_checkpoint(model, opt, checkpoint_dir: Path, main: bool) -> tuple[dict | None, dict[str, Path]]:
    """Collective (every rank calls it): the full weights on rank 0 (CPU tensors, None elsewhere), and
    the optimizer state written sharded through DCP beside `checkpoint_dir`, into a folder that
    save_checkpoint moves into the checkpoint before it renames it into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    staging = checkpoint_dir.with_name(checkpoint_dir.name + f".{OPTIMIZER_DIR}.tmp")
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, _optimizers(opt))}, checkpoint_id=staging)
    return (full if main else None), {OPTIMIZER_DIR: staging}


def load_checkpoint(model, opt, ckpt: Path) -> None:
    """Full weights from model.safetensors (every rank reads the file and keeps its shard), the
    optimizer from its DCP folder, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    set_model_state_dict(model, load_file(str(ckpt / "model.safetensors")),
                         options=StateDictOptions(full_state_dict=True))
    state = {"optimizer": get_optimizer_state_dict(model, _optimizers(opt))}  # the layout DCP fills in place
    dcp.load(state, checkpoint_id=ckpt / OPTIMIZER_DIR)
    set_optimizer_state_dict(model, _optimizers(opt), state["optimizer"])


def _optimizers(opt):
    """What torch's state-dict helpers take: a torch Optimizer, or Muon's CombinedOptimizer as its parts
    (their states key on parameter names, so the parts merge into one DCP state and split on load)."""
    return tuple(opt.optimizers) if hasattr(opt, "optimizers") else opt



class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = False

    def init(self, device_type: str, timeout_minutes: float | None = None):
        """The process group; `timeout_minutes` (train.dist_timeout) bounds how long a collective waits
        for a rank that stopped (trainer/faults.py names it), instead of the backend's default."""
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
            timeout = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
            dist.init_process_group(backend=backend, **timeout)
            self.enabled = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(cfg: Config, d: Dist) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{cfg.source_file}: train.device: cuda requested but not available")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")
