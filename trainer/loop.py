"""One training stage: build it (preflight, model, optimizer, resume), then the loop of optimizer
steps with its evals and checkpoints.

One optimizer step = grad_accum micro-steps per rank (DDP `no_sync` on all but the last), then
clipping and the update. The step's loss is the mean over all its loss tokens (every micro-step,
every rank), so with `.ds.loss` masks a micro-batch or rank weighs by its number of target tokens.
Every batch is a deterministic function of (seed, step, micro_step, rank), so `--resume` from a
checkpoint reproduces the uninterrupted run bit for bit on the same hardware.
"""
from __future__ import annotations

import contextlib
import random
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import latest_checkpoint, load_model, load_model_weights, rng_state, save_checkpoint, step_dir
from .config import Config, ConfigError
from .data import MixtureLoader
from .evals.bpb import token_byte_lengths
from .evals.tasks import TaskResults, live_lm, run_tasks
from .evals.val import val_metrics
from .faults import CollectiveWatch, NoSpace, StopRequest, Stopped, any_rank, preflight_disk
from .guard import BadStep, GuardState, data_step, problem, remember
from .tools.generate import sample_generation
from .telemetry.console import log
from .telemetry.mirrors import open_loggers
from .loss import loss_tokens
from .lr_schedule import set_lr
from .telemetry.metrics import MetricsLog, Progress, fmt_count, peak_flops, peak_flops_note, plot
from .models import build_model
from .optim import build_optimizer
from .parallel import Dist, GradSync, gather_for_checkpoint, is_sharded, pick_device, shard_model
from .prefetch import Prefetcher
from .preflight import preflight
from .resume import TrainState, checkpoint_config, restore
from .upload import Uploader


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
            with autocast():  # the head and loss in chunks (train.loss_chunk): no [tokens, vocab] logits
                loss = model(x, targets=y, loss_mask=mask)
            # a division, so unmasked data (step_tokens = world * n * accum) computes `loss / accum` exactly
            scaled = loss / (step_tokens / (world * n)) if n else loss * 0.0
            scaled.backward()
        total += loss.detach().double() * n
    return total


@dataclass
class Stage:
    """Everything one stage trains with, built once by `build_stage`."""

    cfg: Config
    dir: Path
    d: Dist
    device: torch.device
    loader: MixtureLoader
    eval_sets: dict
    model: torch.nn.Module       # what runs forward/backward (DDP / compiled wrappers included)
    raw_model: torch.nn.Module   # the module itself: weights, clipping, eval, checkpoints, the sample
    ddp: object
    opt: torch.optim.Optimizer
    metrics: MetricsLog
    use_bf16: bool
    masked: bool                 # loss tokens counted from masks (SFT), else fixed per step
    tokenizer: object | None = None  # None: cannot be loaded here (no bpb, no tasks)
    byte_table: torch.Tensor | None = None  # UTF-8 bytes per id, for bpb (trainer/evals/bpb.py)
    start_step: int = 0
    uploader: Uploader | None = None  # checkpoint.upload (rank 0)
    guard: GuardState = field(default_factory=GuardState)  # skipped batches, spike window (trainer/guard.py)
    stop: StopRequest = field(default_factory=StopRequest)  # stop signals recorded (trainer/faults.py)
    watch: CollectiveWatch | None = None  # the step a collective's timeout names

    @property
    def world(self) -> int:
        return self.d.world

    @property
    def total_steps(self) -> int:
        return self.cfg.resolved.total_steps

    @property
    def tps(self) -> int:
        return self.cfg.resolved.tokens_per_step

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens drawn per source so far in this stage by all ranks: the loader's cursors (the
        mixture is a function of the row index, so nothing needs counting on the hot path)."""
        return {k: v * self.cfg.batch.seq_len for k, v in self.loader.state_dict()["cursors"].items()}


def build_model_and_optimizer(cfg: Config, device: torch.device, d: Dist, init_from: Path | None):
    """(what runs forward/backward, the module itself, its gradient-sync handle, the optimizer): the
    model seeded, its init weights loaded, sharded (fsdp) or wrapped (DDP), compiled if asked."""
    seed_all(cfg.train.seed)
    model = build_model(cfg.model, device=device)
    model.loss_chunk = cfg.train.loss_chunk
    if init_from is not None:
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
        model = ddp = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    return model, raw_model, ddp, opt


def build_stage(cfg: Config, stage_dir: Path, d: Dist, resume: bool, init_from: Path | None,
                strict_disk: bool = False) -> Stage:
    """Preflight (everything that can fail on bad input, before any model memory or training step),
    then model, optimizer, the disk check and, with --resume, the newest good checkpoint."""
    device = pick_device(cfg, d)
    d.init(device.type, cfg.train.dist_timeout)
    checked = preflight(cfg, d)
    if d.main and checked.task_counts:
        log.info("[eval] tasks: " + ", ".join(f"{t} ({n} examples)" for t, n in checked.task_counts.items()))

    resume_from = latest_checkpoint(stage_dir) if resume else None
    if resume and resume_from is None:
        log.info(f"[resume] no valid checkpoint in {stage_dir / 'checkpoints'}: starting from step 0")
    if not resume and (stage_dir / "checkpoints").exists() and any((stage_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{stage_dir}: already holds checkpoints; pass --resume to continue or --overwrite to start over")

    model, raw_model, ddp, opt = build_model_and_optimizer(cfg, device, d, init_from if resume_from is None else None)
    preflight_disk(cfg, stage_dir, d, device, raw_model, opt, strict_disk)  # needs the parameter counts
    if d.main and device.type == "cuda" and (note := peak_flops_note(device)):
        log.info(note)
    if cfg.train.dtype == "bf16" and device.type != "cuda":
        log.info("[dtype] bf16 autocast is a GPU path; training in fp32 on CPU")
    metrics = MetricsLog(stage_dir, enabled=d.main, loggers=open_loggers(cfg, stage_dir) if d.main else [],
                         flops_per_token=float(raw_model.flops_per_token(cfg.batch.seq_len)),
                         peak=(peak_flops(device) or 0.0) * d.world)
    loader, tok = checked.loader, checked.tokenizer
    s = Stage(cfg, stage_dir, d, device, loader, checked.eval_sets, model, raw_model, ddp, opt, metrics,
              use_bf16=cfg.train.dtype == "bf16" and device.type == "cuda",
              masked=cfg.data.packing != "stream" or any(src.has_loss for src in loader.sources), tokenizer=tok,
              byte_table=token_byte_lengths(tok, cfg.model.vocab_size).to(device) if tok is not None else None)
    if resume_from is not None:
        st = restore(resume_from, cfg, s.world, raw_model, opt, loader, device, d)
        s.start_step, s.guard = int(st.step), GuardState(**st.guard)
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


def save(s: Stage, step: int) -> Path:
    """A checkpoint after `step` steps (tokens_seen is step * tps: a resumed loader refuses another
    rows_per_step). Out of space: NoSpace on every rank (rank 0's names the folder)."""
    weights, folders, failed = s.raw_model, {}, None
    if s.cfg.train.parallel == "fsdp":  # every rank: full weights to rank 0, optimizer shards through DCP
        weights, folders = gather_for_checkpoint(s.raw_model, s.opt, step_dir(s.dir, step), s.d.main)
    if s.d.main:
        state = TrainState(step=step, tokens_seen=step * s.tps, optimizer={} if folders else s.opt.state_dict(),
                           loader=s.loader.state_dict(), rng=rng_state(), tokens_by_source=s.tokens_by_source(),
                           stage=s.cfg.name, world_size=s.world, total_steps=s.total_steps,
                           guard=dataclasses.asdict(s.guard))
        try:
            p = save_checkpoint(s.dir, step, weights, state.state_dict(), checkpoint_config(s.cfg, s.world),
                                s.cfg.checkpoint.keep_last, folders=folders)
        except NoSpace as e:  # its partial folder is gone already
            failed = e
        else:
            log.info(f"[checkpoint] saved {p}")
            if s.uploader is not None:
                s.uploader.push(p)
    if any_rank(s.d, failed is not None, s.device):  # in place of a barrier: every rank hears of a full disk
        raise failed or NoSpace("")
    return step_dir(s.dir, step)


def eval_due(cfg: Config, done: int, total: int) -> tuple[bool, bool]:
    """(val loss/bpb, tasks) due after `done` steps. The final step does both; tasks_every None: with
    every val eval."""
    if done == total:
        return True, bool(cfg.eval.tasks)
    val = bool(cfg.eval.every) and done % cfg.eval.every == 0
    every = cfg.eval.tasks_every
    tasks = bool(cfg.eval.tasks) and (val if every is None else bool(every) and done % every == 0)
    return val, tasks


def score_tasks(s: Stage) -> TaskResults | None:
    """The curriculum's tasks on the live model (eval mode, the run's autocast); every rank scores its
    share, rank 0 gets the results."""
    lm = live_lm(s.raw_model, s.tokenizer, device=s.device, autocast=s.autocast, batch_size=s.cfg.eval.tasks_batch_size,
                 rank=s.d.rank, world_size=s.world, sharded=is_sharded(s.raw_model))
    limit = s.cfg.eval.limit
    limit = int(limit) if limit is not None and limit >= 1 else limit  # lm-eval: an int counts, a float is a share
    return run_tasks(lm, s.cfg.eval.tasks, s.cfg.eval.include_path, limit)


def run_eval(s: Stage, step: int, val: bool = True, tasks: bool = False) -> None:
    res = val_metrics(s.raw_model, s.eval_sets, s.byte_table, s.device, s.autocast, s.d) \
        if val and s.eval_sets else None
    scores = score_tasks(s) if tasks else None
    if res is None and not tasks:
        return
    s.metrics.log_eval(step, step * s.tps, res.loss if res else {}, res.bpb if res else None,
                       scores.scores if scores else None, scores.seconds if scores else None)
    s.metrics.log({"type": "mixture", "step": step, "tokens": step * s.tps, "tokens_by_source": s.tokens_by_source()})
    if s.d.main:
        parts = [f"{k} {v:.4f} (bpb {res.bpb.get(k, float('nan')):.4f})" for k, v in res.loss.items()] if res else []
        parts += [f"{t} {m} {v:.4f}" for t, ms in (scores.scores if scores else {}).items()
                  for m, v in ms.items() if m in ("acc", "acc_norm")]
        log.info(f"[eval] step {step} | " + " | ".join(parts) + (f" | tasks {scores.seconds:.1f}s" if scores else ""))
        try:
            plot(s.dir)
        except Exception as e:  # noqa: BLE001 - a plotting problem must never stop training
            log.warning(f"[plot] failed: {e}")


def train_step(s: Stage, prefetch, step: int, prog: Progress) -> None:
    """One optimizer step: grad_accum micro-batches, clipping, the update, and its metrics row."""
    cfg, accum = s.cfg, s.cfg.resolved.grad_accum
    lr = set_lr(s.opt, step, cfg.optim.lr, s.total_steps, cfg.schedule)
    batches = [prefetch.batch(step, micro) for micro in range(accum)]  # ids checked by the loader
    weights = batches[0][3]["weights"]
    step_tokens = s.tps
    if s.masked:  # one all-reduce per step, before any backward pass
        n = sum(loss_tokens(y, mask) for _, y, mask, _ in batches)
        step_tokens = int(s.d.sum(torch.tensor(n, dtype=torch.int64, device=s.device)))
    loss_sum = forward_backward(s.model, batches, step_tokens, s.world, s.device, s.autocast, s.ddp)
    # the norm always (max_norm inf: measured, not clipped), so the guard sees a non-finite gradient
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip and cfg.optim.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), clip)
    # every rank: the same global figure; the ranks' stop votes ride on this all-reduce (trainer/faults.py)
    loss_val = float(s.stop.sum_with_vote(s.d, loss_sum)) / max(step_tokens, 1)
    rb = cfg.train.rollback
    if why := problem(loss_val, float(gnorm) if gnorm is not None else None, s.guard.history, rb.spike_sigma,
                      rb.min_history):
        s.opt.zero_grad(set_to_none=True)
        raise BadStep(step, why)  # before the update: the weights stay as they were
    remember(s.guard, loss_val, rb.window)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    done = step + 1
    if done % cfg.train.log_every == 0 or done == s.total_steps or done == s.start_step + 1:
        row = {"type": "train", "step": done, "tokens": done * s.tps, "loss": loss_val, "lr": lr,
               "weights": weights, "time": time.time()}
        if gnorm is not None:
            row["grad_norm"] = float(gnorm)
        s.metrics.log(row)
        if s.d.main and (done % cfg.train.print_every == 0 or done == s.total_steps or done == s.start_step + 1):
            log.info(prog.line(step, loss_val, lr))


def roll_back(s: Stage, bad: BadStep) -> int:
    """Every rank back to the newest good checkpoint, the bad step's batches skipped from now on;
    returns the step to continue from. Stops with one line after train.rollback.max_rollbacks."""
    rb, g = s.cfg.train.rollback, s.guard
    ckpt = latest_checkpoint(s.dir)
    if g.rollbacks >= rb.max_rollbacks or ckpt is None:
        why = (f"gave up after {g.rollbacks} rollbacks (train.rollback.max_rollbacks)" if ckpt is not None
               else "no checkpoint to roll back to (checkpoint.every)")
        raise FloatingPointError(f"{bad}: stopping, {why}; last checkpoint kept")
    skip = data_step(bad.step, g.skipped)
    st = restore(ckpt, s.cfg, s.world, s.raw_model, s.opt, s.loader, s.device, s.d)
    s.guard = GuardState(sorted(set(g.skipped) | {skip}), GuardState(**st.guard).history, g.rollbacks + 1)
    back = int(st.step)
    s.metrics.truncate_after(back)  # the steps after it are trained again: the files read as one run
    save(s, back)  # the same checkpoint with the skip list: a kill before the next save resumes past the bad batch
    s.metrics.log({"type": "rollback", "step": back, "at_step": bad.step + 1, "reason": bad.reason,
                   "skipped_data_step": skip, "rollbacks": s.guard.rollbacks})
    if s.d.main:
        log.warning(f"[rollback] {bad}: back to {ckpt.name}; data step {skip}'s batches skipped from now on "
                    f"(rollback {s.guard.rollbacks} of at most {rb.max_rollbacks})")
    return back


def finish(s: Stage, sample: bool) -> Path:
    """The final eval and checkpoint, DONE, and (last stage) the sample from the trained model."""
    final = step_dir(s.dir, s.total_steps)
    if s.start_step < s.total_steps:  # else resumed from the final checkpoint: its eval (logged first) and save are done
        run_eval(s, s.total_steps, *eval_due(s.cfg, s.total_steps, s.total_steps))
        save(s, s.total_steps)
    s.metrics.close()
    if s.d.main:
        if s.uploader is not None and (failed := s.uploader.close()):
            log.warning(f"[upload] not uploaded: {', '.join(failed)} (kept locally, see above)")
        (s.dir / "DONE").write_text(f"{final}\n")
        if sample:  # a sharded model's forward needs every rank: the sample reads the saved weights
            model = load_model(final, device=s.device)[0] if is_sharded(s.raw_model) else s.raw_model
            sample_generation(s.cfg, model)
    s.d.barrier()
    return final


def train_stage(cfg: Config, stage_dir: Path, d: Dist, resume: bool, init_from: Path | None,
                sample: bool = False, strict_disk: bool = False) -> Path:
    # while the stage runs, stop signals are only recorded and a collective's timeout is named
    with StopRequest(cfg.train.stop_signals) as stop, \
            CollectiveWatch(d, cfg.train.dist_timeout, stage_dir) as watch:
        s = build_stage(cfg, stage_dir, d, resume, init_from, strict_disk)
        s.stop, s.watch = stop, watch
        total = s.total_steps
        prog = Progress(total, s.start_step, s.tps, s.metrics.fpt, s.metrics.peak)  # the metrics' own MFU inputs
        if d.main:
            log.info(f"[train] {cfg.name or Path(cfg.source_file).stem}: {total} steps x {s.tps:,} tokens "
                     f"(grad_accum {cfg.resolved.grad_accum}, world {s.world}) on {s.device.type} -> {stage_dir}")
        s.model.train()
        step = s.start_step
        while step < total:
            # builds the next step's batches during this one
            prefetch = Prefetcher(s.loader, step, total, pin_memory=s.device.type == "cuda",
                                  data_step=lambda t, skipped=tuple(s.guard.skipped): data_step(t, skipped))
            try:
                step = train_steps(s, prefetch, step, prog)
            except BadStep as bad:
                prefetch.close()  # before the restore moves the loader
                step = roll_back(s, bad)
            finally:
                prefetch.close()
        return finish(s, sample)


def train_steps(s: Stage, prefetch: Prefetcher, start: int, prog: Progress) -> int:
    """Steps from `start` to the end, with their evals and checkpoints; returns the step reached."""
    cfg, total = s.cfg, s.total_steps
    for step in range(start, total):
        if s.watch is not None:
            s.watch.step = step + 1
        train_step(s, prefetch, step, prog)
        done = step + 1
        if done != total and any(due := eval_due(cfg, done, total)):
            run_eval(s, done, *due)
        saved = bool(cfg.checkpoint.every) and done % cfg.checkpoint.every == 0 and done != total
        if saved:
            save(s, done)
        if done != total and s.stop.agreed(s.d, s.device):  # after the step's eval: resumed, it reads as one run
            halt(s, done, saved)
    return total


def halt(s: Stage, done: int, saved: bool) -> None:
    """Every rank agreed to stop after `done` steps: a checkpoint (unless this step made one), metrics
    and uploads flushed, then Stopped (trainer.run prints its line and exits EXIT_STOPPED)."""
    ckpt = step_dir(s.dir, done) if saved else save(s, done)
    s.metrics.close()
    if s.d.main and s.uploader is not None and (failed := s.uploader.close()):
        log.warning(f"[upload] not uploaded: {', '.join(failed)} (kept locally, see above)")
    name = s.stop.signame or "a signal to another rank"
    raise Stopped(name, done, ckpt, requeue=s.cfg.train.requeue and name in s.cfg.train.requeue_signals)
