"""Train a model from a curriculum.

    python -m trainer.run curricula/atom.yaml [section.key=value ...] [--dry-run [--json] [--skip-data]]
                          [--resume] [--run-dir DIR] [--overwrite]
    torchrun --nproc_per_node=N -m trainer.run curricula/atom.yaml ...     (gloo on CPU, NCCL on GPU;
    multi-node through torchrun's --nnodes/--node_rank/--rdzv_endpoint)

One optimizer step = grad_accum micro-steps per rank (DDP `no_sync` on all but the last), then
clipping and the update. The step's loss is the mean over all its loss tokens (every micro-step,
every rank), so with `.ds.loss` masks a micro-batch or rank weighs by its number of target tokens. Every batch is a deterministic function of (seed, step, micro_step, rank),
so `--resume` from a checkpoint reproduces the uninterrupted run bit for bit on the same hardware.
Data and config problems stop before the first step with a message naming the file/field.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (STEP_RE, find_weights, latest_checkpoint, load_model_weights, load_train_state,
                         rng_state, save_checkpoint, set_rng_state, step_dir)
from .config import Config, ConfigError, load_curriculum
from .hf import resolve_hub
from .log import log, setup as setup_logging
from .loggers import open_loggers
from .parallel import GradSync, gather_for_checkpoint, is_sharded, load_checkpoint, shard_model
from .upload import Uploader, fetch_init, fetch_resume
from .metrics import MetricsLog, Progress, fmt_count, peak_flops, plot
from .optim import build_optimizer
from .prefetch import Prefetcher
from .lr_schedule import set_lr

# ---------------------------------------------------------------- distributed


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = False

    def init(self, device_type: str):
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
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


# ---------------------------------------------------------------- pieces


def model_section(cfg: Config) -> dict:
    m = dict(cfg.model)
    if cfg.train.activation_checkpointing:
        m["activation_checkpointing"] = True
    return m


def build_meta_model(cfg: Config):
    from trainer.models import build_model

    try:
        model = build_model(model_section(cfg), device="meta")
    except ValueError as e:
        raise ConfigError(f"{cfg.source_file}: {e}") from None
    if cfg.batch.seq_len > model.config.max_seq_len:  # positions past the model's context: refused, not extrapolated
        raise ConfigError(f"{cfg.source_file}: batch.seq_len: {cfg.batch.seq_len} is longer than the model's context "
                          f"(model.max_seq_len {model.config.max_seq_len}); raise model.max_seq_len to train longer windows")
    return model


def compute_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the tokens that count: all of them, or where the `.ds.loss` mask is 1."""
    V = logits.size(-1)
    if mask is None:
        return F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
    ce = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def loss_tokens(y: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many targets of a micro-batch count towards the loss."""
    return int(mask.sum()) if mask is not None else y.numel()


def forward_backward(model, batches, step_tokens: int, world: int, device: torch.device,
                     autocast=contextlib.nullcontext, ddp=None) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of the step's loss: the mean over all `step_tokens` loss
    tokens of every micro-batch on every rank (a micro-batch or rank with few SFT answer tokens
    weighs little). Returns this rank's summed token loss (float64) for logging.

    Micro-batch m with n_m loss tokens and mean loss l_m contributes l_m * n_m / step_tokens; DDP then
    averages gradients over the ranks, so each rank also multiplies by `world`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for micro, (x, y, mask, _) in enumerate(batches):
        n = loss_tokens(y, mask)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True) if mask is not None else None
        # DDP all-reduces gradients only on the last micro-step of the optimizer step
        sync = ddp.no_sync() if (ddp is not None and micro < len(batches) - 1) else contextlib.nullcontext()
        with sync:
            with autocast():
                logits = model(x)
            loss = compute_loss(logits, y, mask)
            # a division, so unmasked data (step_tokens = world * n * accum) computes `loss / accum` exactly
            scaled = loss / (step_tokens / (world * n)) if n else loss * 0.0
            scaled.backward()
        total += loss.detach().double() * n
    return total


def checkpoint_config(cfg: Config, world: int) -> dict:
    """The config.json stored with each checkpoint. A relative tokenizer path is made absolute: it was
    relative to where training ran, and `trainer.generate` may be run from anywhere."""
    out = {**cfg.to_dict(), "world_size": world}
    tok = dict(out.get("tokenizer") or {})
    if tok.get("path") and Path(tok["path"]).exists():
        tok["path"] = str(Path(tok["path"]).resolve())
    out["tokenizer"] = tok
    return out


def pick_device(cfg: Config, d: Dist) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{cfg.source_file}: train.device: cuda requested but not available")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(cfg: Config, d: Dist, vocab_size: int):
    from trainer.data import MixtureLoader, SourceSpec

    return MixtureLoader(
        [SourceSpec(s.name, s.path) for s in cfg.data.sources], cfg.mixture(d.world),
        seq_len=cfg.batch.seq_len, micro_batch=cfg.batch.micro_batch, seed=cfg.train.seed,
        rank=d.rank, world_size=d.world, total_tokens=cfg.total_tokens(d.world), split="train",
        cache_dir=cfg.data.cache_dir, grad_accum=cfg.grad_accum(d.world), packing=cfg.data.packing,
        vocab_size=vocab_size,
    )


def verify_sources(cfg: Config) -> None:
    """Optional full check: sha256 of every shard file against its manifest (data.verify_checksums),
    hashed in threads by `shards verify`'s own file check. A missing file is left to the loader."""
    from shards.check import check_files
    from shards.manifest import read_manifest

    from trainer.data import DataError

    for s in cfg.data.sources:
        if str(s.path).startswith("s3://"):
            continue  # the s3 cache is verified on download
        try:
            m = read_manifest(s.path)
        except (FileNotFoundError, ValueError) as e:  # names the manifest: one line, no traceback
            raise DataError(f"source '{s.name}' ({s.path}): {e}") from None
        for problem in check_files(s.path, m, checksums=True):
            f = Path(s.path) / problem.rel
            if problem.kind == "size":
                raise DataError(f"source '{s.name}' ({s.path}): {f} is {problem.got} bytes, manifest says {problem.want}")
            if problem.kind == "sha256":
                raise DataError(f"source '{s.name}' ({s.path}): {f} fails its sha256 check against manifest.json (corrupted shard)")


def check_tokenizer(cfg: Config, loader, d: Dist) -> None:
    """Every source must have been tokenized with the curriculum's tokenizer, compared by vocabulary
    hash (one vocabulary may be named, or its file typed, two ways). A tokenizer that cannot be
    loaded here is compared with the manifests by name only, and the log says so."""
    from trainer.generate import load_tokenizer

    want = cfg.tokenizer.path or cfg.tokenizer.name
    try:
        info, why = load_tokenizer(cfg.to_dict()).info(), ""
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        info, why = None, (str(e).splitlines() or [type(e).__name__])[0]
    for src in loader.sources:
        t = src.reader.manifest.tokenizer
        where = f"source '{src.name}' ({src.reader.directory / 'manifest.json'})"
        if info is not None and t.vocab_hash != info.vocab_hash:
            raise ConfigError(f"{cfg.source_file}: tokenizer: {want} (vocab_hash {info.vocab_hash[:12]}) is not the "
                              f"tokenizer of {where}: {t.name} (vocab_hash {t.vocab_hash[:12]})")
        if info is None and t.name != cfg.tokenizer.name:
            raise ConfigError(f"{cfg.source_file}: tokenizer: '{cfg.tokenizer.name}' cannot be loaded here to compare "
                              f"its vocabulary ({why}), and {where} names another: '{t.name}'")
    if info is None:
        log.info(f"[tokenizer] {want} cannot be loaded here ({why}): checked against the sources' manifests by name only")


def load_eval_sets(cfg: Config, d: Dist):
    from trainer.data import DataError, val_batches

    if cfg.eval.batches <= 0:
        return {}
    mb = cfg.eval.micro_batch or cfg.batch.micro_batch
    out = {}
    for s in cfg.data.sources:
        try:
            out[s.name] = val_batches(s.path, cfg.batch.seq_len, mb, cfg.eval.batches, split="val",
                                      packing=cfg.data.packing, cache_dir=cfg.data.cache_dir, name=s.name)
        except DataError as e:
            if "split 'val'" in str(e) or "fewer than one batch" in str(e):
                log.info(f"[eval] no val data for '{s.name}': {e}")
                continue
            raise
    return out


@torch.no_grad()
def evaluate(model, eval_sets, device, autocast, d: Dist) -> dict[str, float]:
    was = model.training
    model.eval()
    out = {}
    tot = torch.zeros(2, dtype=torch.float64)
    for name, batches in eval_sets.items():
        acc = torch.zeros(2, dtype=torch.float64)  # sum of loss*tokens, tokens
        mine = batches[d.rank :: d.world]
        # FSDP: each forward all-gathers, so every rank runs as many as the busiest (extra ones not counted)
        rounds = -(-len(batches) // d.world) if is_sharded(model) else len(mine)
        for i in range(rounds):
            x, y, mask = mine[i] if i < len(mine) else batches[0]
            x, y = x.to(device), y.to(device)
            mask = mask.to(device) if mask is not None else None
            with autocast():
                logits = model(x)
            if i >= len(mine):
                continue
            n = float(mask.sum()) if mask is not None else float(y.numel())
            acc += torch.tensor([compute_loss(logits, y, mask).item() * n, n], dtype=torch.float64)
        d.sum(acc)
        if acc[1] > 0:
            out[name] = float(acc[0] / acc[1])
            tot += acc
    if tot[1] > 0:
        out["overall"] = float(tot[0] / tot[1])
    model.train(was)
    return out


def summary(cfg: Config, world: int) -> dict:
    model = build_meta_model(cfg)
    tps = cfg.tokens_per_step(world)
    steps = cfg.total_steps(world)
    return {
        "stage": cfg.name,
        "parameters": int(model.num_params()),
        "tokens_per_step": tps,
        "grad_accum": cfg.grad_accum(world),
        "world_size": world,
        "steps": steps,
        "tokens": steps * tps,
        "flops_per_token": float(model.flops_per_token(cfg.batch.seq_len)),
        "optimizer": cfg.optim.name,
        "schedule": cfg.schedule.kind,
        "mixture": [{"at": at, "weights": w} for at, w in cfg.mixture_points(world)],
    }


def print_summary(s: dict, cfg: Config) -> None:
    name = f" [{s['stage']}]" if s["stage"] else ""
    print(f"{cfg.source_file}{name}")
    print(f"  parameters      {s['parameters']:,}")
    print(f"  tokens/step     {s['tokens_per_step']:,} (seq_len {cfg.batch.seq_len} x micro_batch "
          f"{cfg.batch.micro_batch} x grad_accum {s['grad_accum']} x world {s['world_size']})")
    print(f"  steps           {s['steps']:,} ({fmt_count(s['tokens'])} tokens)")
    print(f"  optimizer       {cfg.optim.name} lr {cfg.optim.lr:g}, schedule {cfg.schedule.kind} "
          f"(warmup {cfg.schedule.warmup})")
    print("  sources")
    for src in cfg.data.sources:
        remote = str(src.path).startswith("s3://")
        state = "remote" if remote else ("ok" if (Path(src.path) / "manifest.json").exists() else "not built yet")
        print(f"    {src.name:24s} {src.path}  [{state}]")
    names = [src.name for src in cfg.data.sources]
    width = max(12, *(len(n) for n in names))
    print("  mixture schedule (normalised weights; linear between points)")
    print("    " + "at".rjust(7) + "  " + "  ".join(n.rjust(width) for n in names))
    for p in s["mixture"]:
        print("    " + f"{p['at']:7.3f}" + "  " + "  ".join(f"{p['weights'].get(n, 0.0):{width}.3f}" for n in names))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'section.key old -> new' for every value that differs between two checkpoint config dicts."""
    out = []
    for k in sorted(set(old) | set(new) - {"source_file"}):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {json.dumps(a)} -> {json.dumps(b)}")
    return out


@dataclass
class TrainState:
    """What train_state.pt holds (plain types and tensors, so it loads with weights_only=True)."""

    step: int
    tokens_seen: int
    optimizer: dict
    loader: dict
    rng: dict
    tokens_by_source: dict
    stage: str
    world_size: int
    total_steps: int

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def load(cls, ckpt: Path) -> "TrainState":
        raw = load_train_state(ckpt)
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing:
            raise ConfigError(f"{ckpt / 'train_state.pt'}: not a train state of this trainer (missing {missing})")
        return cls(**{n: raw[n] for n in names})


def restore(ckpt: Path, cfg: Config, world: int, model, opt, loader, device, d: Dist) -> int:
    """Load a checkpoint for --resume; returns its step. What would change the batches (steps, schedule,
    batch, world size) or cannot carry over (another optimizer, another model shape) is refused in one
    line; any other change (optim.lr, schedule, ...) is applied from this step on, and printed."""
    st = TrainState.load(ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    changes = config_changes(saved, checkpoint_config(cfg, world))
    # the optimizer state is one optimizer's, and a DCP folder under fsdp but a tensor dict under ddp
    for section, key, now, default in (("optim", "name", cfg.optim.name, None),
                                       ("train", "parallel", cfg.train.parallel, "ddp")):
        was = saved.get(section, {}).get(key, default)
        if was != now:
            raise ConfigError(f"{ckpt}: cannot resume with {section}.{key} {now}: the run's optimizer state was "
                              f"saved with {section}.{key} {was}; resume with {section}.{key}={was}, or start a "
                              f"new run with train.init_from={ckpt}")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        if cfg.train.parallel == "fsdp":  # sharded optimizer state through DCP, resharded to this world
            load_checkpoint(model, opt, ckpt)
        else:
            load_model_weights(model, ckpt, device=device)
            opt.load_state_dict(st.optimizer)
        loader.load_state_dict(st.loader)
    except ValueError as e:  # changed steps/schedule/batch/world size: the batches would differ
        hint = ""
        if st.world_size != world:
            tps = st.loader["rows_per_step"] * st.loader["seq_len"]
            hint = (f"; to resume at world size {world}, keep the tokens per step: batch.tokens_per_step={tps} "
                    f"batch.grad_accum=null (grad_accum then follows the world size)")
        raise ConfigError(
            f"{ckpt}: cannot resume with these settings: {e}. Resume with the settings the run started with "
            f"(train.steps {st.total_steps}, world size {st.world_size}){hint}, or start a new run "
            f"from its weights with train.init_from={ckpt}") from None
    if changes:  # the saved param groups carry the old lr/betas/decay: the settings given now win
        for g, f in zip(opt.param_groups, fresh):
            g.update(f)
        log.info(f"[resume] changed since {ckpt.name}, applied from step {int(st.step)} on: {', '.join(changes)}")
    set_rng_state(st.rng)
    return int(st.step)


# ---------------------------------------------------------------- one stage


@dataclass
class Stage:
    """Everything one stage trains with, built once by `build_stage`."""

    cfg: Config
    dir: Path
    d: Dist
    device: torch.device
    loader: object
    eval_sets: dict
    model: torch.nn.Module       # what runs forward/backward (DDP / compiled wrappers included)
    raw_model: torch.nn.Module   # the module itself: weights, clipping, eval, checkpoints, the sample
    ddp: object
    opt: torch.optim.Optimizer
    metrics: MetricsLog
    use_bf16: bool
    masked: bool                 # loss tokens counted from masks (SFT), else fixed per step
    start_step: int = 0
    uploader: Uploader | None = None  # checkpoint.upload (rank 0)

    @property
    def world(self) -> int:
        return self.d.world

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps(self.world)

    @property
    def tps(self) -> int:
        return self.cfg.tokens_per_step(self.world)

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens drawn per source so far in this stage by all ranks: the loader's cursors (the
        mixture is a function of the row index, so nothing needs counting on the hot path)."""
        return {k: v * self.cfg.batch.seq_len for k, v in self.loader.state_dict()["cursors"].items()}


def build_stage(cfg: Config, stage_dir: Path, d: Dist, resume: bool, init_from: Path | None) -> Stage:
    """Preflight (everything that can fail on bad input, before any model memory or training step),
    then model, optimizer and, with --resume, the newest good checkpoint."""
    device = pick_device(cfg, d)
    d.init(device.type)
    meta = build_meta_model(cfg)
    vocab = int(meta.config.vocab_size)
    if cfg.data.verify_checksums:
        verify_sources(cfg)
    loader = make_loader(cfg, d, vocab)  # opens every source, validates dtype/sizes/tokenizer/vocab
    check_tokenizer(cfg, loader, d)
    eval_sets = load_eval_sets(cfg, d)
    del meta

    resume_from = latest_checkpoint(stage_dir) if resume else None
    if resume and resume_from is None:
        log.info(f"[resume] no valid checkpoint in {stage_dir / 'checkpoints'}: starting from step 0")
    if not resume and (stage_dir / "checkpoints").exists() and any((stage_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{stage_dir}: already holds checkpoints; pass --resume to continue or --overwrite to start over")

    seed_all(cfg.train.seed)
    from trainer.models import build_model

    model = build_model(model_section(cfg), device=device)
    if init_from is not None and resume_from is None:
        try:
            load_model_weights(model, init_from, device=device)
        except ValueError as e:  # another architecture, an unreadable file: name it before step 0
            raise ConfigError(f"{cfg.source_file}: train.init_from: {e}") from None
        log.info(f"[init] model weights from {init_from} (fresh optimizer"
               f"{', data cursor reset' if cfg.train.reset_data_cursor else ''})")
    if cfg.train.parallel == "fsdp":
        shard_model(model, cfg, device, d.world)  # in place, before the optimizer takes the parameters
    opt = build_optimizer(model, cfg.optim, device.type)
    raw_model, ddp = model, None
    if is_sharded(model):
        ddp = GradSync(model)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = ddp = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    if cfg.train.dtype == "bf16" and device.type != "cuda":
        log.info("[dtype] bf16 autocast is a GPU path; training in fp32 on CPU")
    metrics = MetricsLog(stage_dir, enabled=d.main, loggers=open_loggers(cfg, stage_dir) if d.main else [],
                         flops_per_token=float(raw_model.flops_per_token(cfg.batch.seq_len)),
                         peak=peak_flops(device) * d.world)
    s = Stage(cfg, stage_dir, d, device, loader, eval_sets, model, raw_model, ddp, opt, metrics, use_bf16=cfg.train.dtype == "bf16" and device.type == "cuda",
              masked=cfg.data.packing == "document" or any(src.has_loss for src in loader.sources))
    if resume_from is not None:
        s.start_step = restore(resume_from, cfg, s.world, raw_model, opt, loader, device, d)
        log.info(f"[resume] {resume_from} (step {s.start_step}, {fmt_count(s.start_step * s.tps)} tokens)")
    elif init_from is not None and cfg.train.reset_data_cursor:
        loader.reset_data_cursor(0)
    # rows past start_step belong to a run that died after them: the resumed (or restarted) run logs them again
    if dropped := s.metrics.truncate_after(s.start_step):
        log.info(f"[metrics] dropped {dropped} rows logged after step {s.start_step} by an interrupted run")
    if cfg.checkpoint.upload and d.main:
        uri = cfg.checkpoint.upload  # a stage of a multi-stage run: under its own folder, as locally
        uri = f"{uri.rstrip('/')}/{stage_dir.name}" if cfg.name else uri
        s.uploader = Uploader(uri, cfg.checkpoint.keep_last, cfg.checkpoint.endpoint_url)
    return s


def save(s: Stage, step: int) -> None:
    """A checkpoint after `step` steps (tokens_seen is step * tps: a resumed loader refuses another
    rows_per_step)."""
    weights, folders = s.raw_model, {}
    if s.cfg.train.parallel == "fsdp":  # every rank: full weights to rank 0, optimizer shards through DCP
        weights, folders = gather_for_checkpoint(s.raw_model, s.opt, step_dir(s.dir, step), s.d.main)
    if s.d.main:
        state = TrainState(step=step, tokens_seen=step * s.tps, optimizer={} if folders else s.opt.state_dict(),
                           loader=s.loader.state_dict(), rng=rng_state(), tokens_by_source=s.tokens_by_source(),
                           stage=s.cfg.name, world_size=s.world, total_steps=s.total_steps)
        p = save_checkpoint(s.dir, step, weights, state.state_dict(), checkpoint_config(s.cfg, s.world),
                            s.cfg.checkpoint.keep_last, folders=folders)
        log.info(f"[checkpoint] saved {p}")
        if s.uploader is not None:
            s.uploader.push(p)
    s.d.barrier()


def run_eval(s: Stage, step: int) -> None:
    if not s.eval_sets:
        return
    losses = evaluate(s.raw_model, s.eval_sets, s.device, s.autocast, s.d)
    s.metrics.log_eval(step, step * s.tps, losses)
    s.metrics.log({"type": "mixture", "step": step, "tokens": step * s.tps, "tokens_by_source": s.tokens_by_source()})
    if s.d.main:
        log.info("[eval] step {} | ".format(step) + " | ".join(
            f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.1f})" for k, v in losses.items()))
        try:
            plot(s.dir)
        except Exception as e:  # noqa: BLE001 - a plotting problem must never stop training
            log.warning(f"[plot] failed: {e}")


def train_step(s: Stage, prefetch, step: int, prog: Progress) -> None:
    """One optimizer step: grad_accum micro-batches, clipping, the update, and its metrics row."""
    cfg, accum = s.cfg, s.cfg.grad_accum(s.world)
    lr = set_lr(s.opt, step, cfg.optim.lr, s.total_steps, cfg.schedule)
    batches = [prefetch.batch(step, micro) for micro in range(accum)]  # ids checked by the loader
    weights = batches[0][3]["weights"]
    step_tokens = s.tps
    if s.masked:  # one all-reduce per step, before any backward pass
        n = sum(loss_tokens(y, mask) for _, y, mask, _ in batches)
        step_tokens = int(s.d.sum(torch.tensor(n, dtype=torch.int64, device=s.device)))
    loss_sum = forward_backward(s.model, batches, step_tokens, s.world, s.device, s.autocast, s.ddp)
    gnorm = None
    if cfg.optim.grad_clip and cfg.optim.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), cfg.optim.grad_clip)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    done = step + 1
    if done % cfg.train.log_every == 0 or done == s.total_steps or done == s.start_step + 1:
        loss_val = float(s.d.sum(loss_sum)) / max(step_tokens, 1)
        row = {"type": "train", "step": done, "tokens": done * s.tps, "loss": loss_val, "lr": lr,
               "weights": weights, "time": time.time()}
        if gnorm is not None:
            row["grad_norm"] = float(gnorm)
        s.metrics.log(row)
        if s.d.main and (done % cfg.train.print_every == 0 or done == s.total_steps or done == s.start_step + 1):
            log.info(prog.line(step, loss_val, lr))
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"loss is {loss_val} at step {done}: stopping (last checkpoint kept)")


def finish(s: Stage, sample: bool) -> Path:
    """The final eval and checkpoint, DONE, and (last stage) the sample from the trained model."""
    final = step_dir(s.dir, s.total_steps)
    if s.start_step < s.total_steps:  # else resumed from the final checkpoint: its eval (logged first) and save are done
        run_eval(s, s.total_steps)
        save(s, s.total_steps)
    s.metrics.close()
    if s.d.main:
        if s.uploader is not None and (failed := s.uploader.close()):
            log.warning(f"[upload] not uploaded: {', '.join(failed)} (kept locally, see above)")
        (s.dir / "DONE").write_text(f"{final}\n")
        if sample:  # a sharded model's forward needs every rank: the sample reads the saved weights
            from .checkpoint import load_model

            model = load_model(final, device=s.device)[0] if is_sharded(s.raw_model) else s.raw_model
            sample_generation(s.cfg, model)
    s.d.barrier()
    return final


def train_stage(cfg: Config, stage_dir: Path, d: Dist, resume: bool, init_from: Path | None,
                sample: bool = False) -> Path:
    s = build_stage(cfg, stage_dir, d, resume, init_from)
    total = s.total_steps
    prog = Progress(total, s.start_step, s.tps, s.metrics.fpt, s.metrics.peak)  # the metrics' own MFU inputs
    if d.main:
        log.info(f"[train] {cfg.name or Path(cfg.source_file).stem}: {total} steps x {s.tps:,} tokens "
                 f"(grad_accum {cfg.grad_accum(s.world)}, world {s.world}) on {s.device.type} -> {stage_dir}")
    s.model.train()
    # builds the next step's batches during this one
    prefetch = Prefetcher(s.loader, s.start_step, total, pin_memory=s.device.type == "cuda")
    for step in range(s.start_step, total):
        train_step(s, prefetch, step, prog)
        done = step + 1
        if cfg.eval.every and done % cfg.eval.every == 0 and done != total:
            run_eval(s, done)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != total:
            save(s, done)
    prefetch.close()
    return finish(s, sample)


def encode_with_specials(tok, text: str) -> list[int]:
    """encode() treats special-token strings as text; a ChatML sample prompt needs their real ids."""
    import re

    specials = {k: v for k, v in (getattr(tok, "special_tokens", None) or {}).items() if k and k in text}
    if not specials:
        return tok.encode(text)
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tok.encode(part))
    return ids


def check_sample_tokenizer(cfg: Config) -> None:
    """The end-of-run sample needs the tokenizer: load it before training (cached, so no cost later)."""
    if not cfg.sample.prompt:
        return
    from trainer.generate import load_tokenizer

    try:
        load_tokenizer(cfg.to_dict())
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{cfg.source_file}: tokenizer: {e} (the sample.prompt at the end of the run needs it)") from None


def sample_generation(cfg: Config, model) -> None:
    """Print a short sample from the trained model, where it is (the training device), with the one
    generation engine (trainer.generate)."""
    if not cfg.sample.prompt:
        return
    from shards.chat import IM_START, has_chatml
    from trainer.generate import GenerationConfig, generate, load_tokenizer, stop_ids

    tok = load_tokenizer(cfg.to_dict())
    ids = encode_with_specials(tok, cfg.sample.prompt)
    if getattr(tok, "add_bos", False) and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    chat = IM_START in cfg.sample.prompt and has_chatml(tok)  # a ChatML prompt stops at <|im_end|> too
    gen = GenerationConfig(max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
                           top_k=cfg.sample.top_k or None, stop_ids=stop_ids(tok, chat), seed=cfg.train.seed)
    new = generate(model, ids, gen)
    log.info(f"[sample]\n{cfg.sample.prompt}{tok.decode(list(new))}")


# ---------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("curriculum")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--dry-run", action="store_true", help="validate, build on the meta device, print a summary")
    ap.add_argument("--json", action="store_true", help="with --dry-run: last stdout line is a JSON summary")
    ap.add_argument("--skip-data", action="store_true",
                    help="with --dry-run: no data budget (sources not opened; for a curriculum whose shards are not built)")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="S3_URI",
                    help="continue from the newest valid checkpoint (of the run dir, or of an s3:// run or "
                         "checkpoint, downloaded into the run dir first)")
    ap.add_argument("--run-dir", default=None, help="default: runs/<curriculum name>")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run dir first")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if isinstance(args.resume, str) and not args.resume.startswith("s3://"):
        if "=" not in args.resume:
            ap.error(f"--resume takes no value or an s3:// URI, got {args.resume!r}")
        args.overrides.insert(0, args.resume)  # `--resume optim.lr=1e-3`: an override, not a URI
        args.resume = True
    return args


def dry_run(stages: list[Config], d: Dist, as_json: bool, skip_data: bool) -> None:
    """Validate, build on the meta device, print each stage's summary and data budget (and with
    as_json a last stdout line of JSON)."""
    from .budget import curriculum_budget, print_budget, stage_budget

    sums, budgets = [], []
    for cfg in stages:
        s = summary(cfg, d.world)
        sums.append(s)
        if d.main:
            print_summary(s, cfg)
        if not skip_data:  # a missing or empty source stops here (DataError, one line)
            budgets.append(stage_budget(cfg, d.world))
            s["sources"] = [dataclasses.asdict(b) for b in budgets[-1]]
            if d.main:
                print_budget(budgets[-1])
    if as_json and d.main:
        first = sums[0]
        out = {k: first[k] for k in ("parameters", "tokens_per_step", "grad_accum", "world_size",
                                     "flops_per_token")}
        # steps/tokens: the whole curriculum (all stages); per-stage figures under "stages"
        out["steps"] = sum(s["steps"] for s in sums)
        out["tokens"] = sum(s["tokens"] for s in sums)
        out["stages"] = sums
        if budgets:  # the whole curriculum: a shard dir read in several stages sums up
            out["sources"] = [dataclasses.asdict(b) for b in curriculum_budget(budgets)]
        print(json.dumps(out))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    d = Dist()
    setup_logging(d.rank)
    try:
        stages = load_curriculum(args.curriculum, args.overrides, world_size=d.world)
        if args.dry_run:
            dry_run(stages, d, args.json, args.skip_data)
            return 0
        check_sample_tokenizer(stages[-1])  # a bad tokenizer.path must not surface only after training
        run_dir = Path(args.run_dir or Path("runs") / Path(args.curriculum).stem)
        if args.overwrite:
            # rank 0 deletes; no rank may look at the run dir before that is done (the "already holds
            # checkpoints" check), hence the process group first and a barrier after
            if d.world > 1:
                d.init(pick_device(stages[0], d).type)
            if d.main and run_dir.exists():
                shutil.rmtree(run_dir)
            d.barrier()
        prev_final: Path | None = None
        resumed_done: Path | None = None
        for i, cfg in enumerate(stages):
            stage_dir = run_dir if len(stages) == 1 else run_dir / f"{i}-{cfg.name}"
            init = cfg.train.init_from
            init_path = None
            if init == "@previous":
                if prev_final is None:
                    raise ConfigError(f"{cfg.source_file}: train.init_from: '@previous' in the first stage")
                init_path = prev_final
            elif init:  # a run, a checkpoint (weights suffice), an HF folder, hf://org/name or s3://
                init_path = find_weights(resolve_hub(fetch_init(init, cfg)))
            if isinstance(args.resume, str):  # s3://: the checkpoint comes into this stage's checkpoints/ first
                fetch_resume(args.resume, stage_dir, cfg, stage_dir.name if cfg.name else None)
            if args.resume and (stage_dir / "DONE").exists():
                prev_final = Path((stage_dir / "DONE").read_text().strip())
                done = STEP_RE.match(prev_final.name)
                if done and int(done.group(1)) != cfg.total_steps(d.world):
                    raise ConfigError(
                        f"{stage_dir}: finished at step {int(done.group(1))}, but these settings make "
                        f"{cfg.total_steps(d.world)} steps: --resume only continues an unfinished run (the LR "
                        f"and mixture schedules span the whole run); to train further, start a new run with "
                        f"train.init_from={prev_final}")
                log.info(f"[stage] {cfg.name or i}: already done ({prev_final})")
                resumed_done = prev_final if i == len(stages) - 1 else None
                continue
            prev_final = train_stage(cfg, stage_dir, d, args.resume, init_path, sample=i == len(stages) - 1)
        if d.main and resumed_done is not None:  # the last stage had finished: sample its checkpoint
            from .checkpoint import load_model

            sample_generation(stages[-1], load_model(resumed_done, device=pick_device(stages[-1], d))[0])
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from trainer.data import DataError

        if isinstance(e, DataError):  # names the source and file already: no traceback
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        d.close()


if __name__ == "__main__":
    sys.exit(main())
