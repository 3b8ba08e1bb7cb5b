"""When the machine fails around a healthy run: a stop signal, a full disk, a rank that stops answering.

- Stop signals (`train.stop_signals`: SIGTERM, SIGINT, SIGUSR1 by default; what Slurm sends at a time
  limit, on preemption or `scancel`, and Kubernetes before it kills a pod). The handler only records
  the signal. The ranks agree once per step: the vote rides on the loss all-reduce every step already
  makes (no extra sync; a tiny all-reduce of its own where a step has none), so every rank stops after
  the same step. The loop then saves a checkpoint (the usual atomic save, the loader's position with
  it), flushes metrics and uploads, and the process exits with EXIT_STOPPED after one line. The stop
  changes no batch (the loader is a function of the step), so `--resume` is bit-exact. A signal during
  the save is recorded and nothing more: the save finishes. `train.requeue` then runs
  `scontrol requeue $SLURM_JOB_ID` after a stop by one of `train.requeue_signals`.
- Disk. Before step 0 the run folder's free space is compared with what the run keeps (`check_disk`).
  Out of space during a save is one line naming the folder, the bytes it needed and the free space,
  and the last good checkpoint (`NoSpace`, EXIT_NO_SPACE); the partial folder is removed at once.
- A hung rank. The process group gets `train.dist_timeout` minutes; a collective that times out is
  turned into one line per surviving rank naming the step and the ranks that did not answer a roll
  call through the process group's store (`CollectiveWatch`, EXIT_PEER_LOST), so torchrun's
  `--max-restarts` or the scheduler can start again with `--resume`.
"""
from __future__ import annotations

import errno
import re
import shutil
import signal
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Self

import torch

from .telemetry.console import log

# Exit statuses (sysexits.h names), distinct from 1 (a traceback), 2 (bad input) and 3 (bad steps)
EXIT_STOPPED = 75    # EX_TEMPFAIL: stopped by a signal, checkpoint saved; --resume continues
EXIT_NO_SPACE = 74   # EX_IOERR: the disk filled during a save; --resume continues once space is freed
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: a collective timed out waiting for another rank


class Stopped(Exception):
    """The run stopped on a signal after saving `checkpoint` (raised by the loop, exit EXIT_STOPPED)."""

    def __init__(self, signame: str, step: int, checkpoint: Path, requeue: bool):
        self.signame, self.step, self.checkpoint, self.requeue = signame, step, checkpoint, requeue
        super().__init__(f"{signame} after step {step}: saved {checkpoint}; --resume continues from it "
                         f"(exit {EXIT_STOPPED})")


class NoSpace(Exception):
    """Out of disk space while saving; the message is the one line to print ('' on a rank that only
    follows rank 0's failure)."""


class PeerTimeout(Exception):
    """A collective timed out; the message names the step and the ranks that did not answer."""


# ---- stop signals --------------------------------------------------------------------------------


class StopRequest:
    """Records the first of `signals` to arrive (a context manager installs and restores the handlers);
    `agreed` tells every rank, at the same step, whether any rank got one."""

    def __init__(self, signals=()):
        self.signals = [getattr(signal, name) for name in signals]
        self.signum: int | None = None
        self._vote: bool | None = None  # what this step's loss all-reduce carried, if it ran
        self._previous: dict = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        # only a flag: the handler may run between any two bytecodes, a save included; a second signal
        # changes nothing (under torchrun each worker gets the signal twice: the launcher forwards it)
        if self.signum is None:
            self.signum = signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def sum_with_vote(self, d, t: torch.Tensor) -> torch.Tensor:
        """`d.sum(t)` for a scalar `t`, this rank's stop vote carried in the same all-reduce."""
        if not d.enabled:
            self._vote = self.signum is not None
            return t
        both = d.sum(torch.stack([t, t.new_tensor(float(self.signum is not None))]))
        self._vote = bool(both[1] > 0)
        return both[0]

    def agreed(self, d, device) -> bool:
        """Whether any rank asked to stop: the vote of this step's loss all-reduce, else one of its own."""
        vote, self._vote = self._vote, None
        return any_rank(d, self.signum is not None, device) if vote is None else vote


def requeue(job: str | None) -> None:
    """`scontrol requeue JOB` (Slurm starts the same batch script again, which resumes with --resume)."""
    if not job:
        log.warning("[stop] train.requeue: not under Slurm (no SLURM_JOB_ID): not requeued")
        return
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] if r.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        why = [str(e)]
    if why is None:
        log.info(f"[stop] requeued Slurm job {job} (scontrol requeue)")
    else:
        log.warning(f"[stop] scontrol requeue {job} failed: {' '.join(why) or 'no message'} (not requeued)")


# ---- disk ----------------------------------------------------------------------------------------

MiB = 1 << 20


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free space for this user on the filesystem that holds (or will hold) `path`."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict or module; a tensor shared by two names once."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.numel()) if x.device.type != "meta" else id(x)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
    return total


def checkpoint_bytes(model: torch.nn.Module, opt) -> int:
    """One checkpoint's size from the counts, before any state exists: the weights (a tied tensor once;
    numel is the full size under FSDP too) and the optimizer state, per element: Adam's two moments,
    Muon's one momentum, an 8-bit Adam's two bytes; plus 64 KiB for config, loader and RNG state."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for o in getattr(opt, "optimizers", [opt]):
        kind = type(o).__name__.lower()
        for g in o.param_groups:
            for p in g["params"]:
                per = 2 if "8bit" in kind else p.element_size() * (1 if "muon" in kind else 2)
                state += p.numel() * per
    return weights + state + 64 * 1024


def kept_checkpoints_bytes(run_dir: Path) -> int:
    """What this run's checkpoints already take (a resumed run rotates them: that space counts as its own)."""
    from .checkpoint import list_checkpoints  # checkpoint.py imports this module

    return sum(f.stat().st_size for p in list_checkpoints(run_dir) for f in p.rglob("*") if f.is_file())


def check_disk(run_dir: Path, one: int, keep_last: int, saves: int, upload: bool) -> str | None:
    """One line when the run folder's disk cannot hold what the run keeps, else None: keep_last
    checkpoints plus the one being written (the oldest is pruned only after the rename), or `saves`
    if fewer, plus one with checkpoint.upload (a pruned checkpoint stays hard-linked under
    checkpoints/.upload until sent)."""
    copies = min(keep_last + 1, saves) + int(upload)
    need, kept = one * copies, kept_checkpoints_bytes(run_dir)
    have = free_bytes(run_dir) + kept
    if have >= need:
        return None
    return (f"[disk] {run_dir}: {fmt_bytes(have)} free{' with its own checkpoints' if kept else ''}, the run "
            f"keeps about {fmt_bytes(need)} ({copies} checkpoints of ~{fmt_bytes(one)} at a time with "
            f"checkpoint.keep_last {keep_last}, the one being written{' and one uploading' if upload else ''} "
            f"included); free space, lower checkpoint.keep_last or move --run-dir")


_NO_SPACE_TEXT = re.compile(r"no space left on device|disk quota exceeded|os error (28|122)", re.IGNORECASE)


def is_no_space(e: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space. safetensors and torch.save do not raise an OSError
    (torch.save's message says only 'unexpected pos'), so a filesystem left under 1 MiB free counts
    too; call this before the partial files are removed."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if _NO_SPACE_TEXT.search(str(e)):
        return True
    try:
        return free_bytes(where) < MiB
    except OSError:
        return False


def no_space(folder: Path, needed: int, last_good: Path | None) -> NoSpace:
    """The one line for a save that ran out of space (its partial folder already removed)."""
    good = f"the last good checkpoint is {last_good}" if last_good else "there is no checkpoint yet"
    return NoSpace(f"no space left on device saving {folder}: it needs ~{fmt_bytes(needed)}, "
                   f"{fmt_bytes(free_bytes(folder))} free (partial folder removed); {good}; free space, "
                   f"then --resume")


# ---- a rank that stops answering -----------------------------------------------------------------

# gloo: "Timed out waiting ... for recv"; NCCL: "collective operation timeout", "before timing out"
_TIMEOUT_TEXT = re.compile(r"\b(time ?out|timed out|timing out)\b", re.IGNORECASE)


def silent_ranks(d, step: int, wait_s: float) -> list[int] | None:
    """The ranks that do not answer a roll call through the process group's store within `wait_s`
    (every surviving rank times out in the same collective, so each answers within a step or so);
    None when the store itself cannot be reached (it lived on the rank that stopped)."""
    import torch.distributed as dist

    key = f"shardloom/roll_call/{step}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(key + str(d.rank), "here")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(d.world) if not store.check([key + str(r)])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - a dead store is an answer too
        return None


class CollectiveWatch:
    """A context whose collective timeouts become PeerTimeout: the step (`step`, kept current by the
    loop) and the ranks that did not answer. gloo raises them in Python; NCCL's watchdog aborts the
    process first unless TORCH_NCCL_BLOCKING_WAIT=1 (docs/scaling.md)."""

    def __init__(self, d, minutes: float, run_dir: Path):
        self.d, self.minutes, self.run_dir = d, minutes, Path(run_dir)
        self.step: int | None = None  # the step being worked on (None: before the first)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, tp, e, tb) -> bool:
        if isinstance(e, RuntimeError) and self.d.enabled and _TIMEOUT_TEXT.search(str(e)):
            raise PeerTimeout(self.describe()) from None
        return False

    def describe(self) -> str:
        from .checkpoint import list_checkpoints

        wait = min(30.0, max(2.0, self.minutes * 6))  # a tenth of the timeout, in seconds
        where = f"at step {self.step}" if self.step is not None else "before step 1"
        good = list_checkpoints(self.run_dir)
        return (f"rank {self.d.rank}: a collective {where} timed out after {self.minutes:g} min (train.dist_timeout) "
                f"waiting for {_who(silent_ranks(self.d, self.step or 0, wait))}; exiting (exit {EXIT_PEER_LOST}) "
                f"so the launcher can restart with --resume (from {good[-1].name if good else 'step 0'})")


def _who(silent: list[int] | None) -> str:
    if silent is None:
        return "a rank that the store cannot tell (it is unreachable)"
    if not silent:
        return "a rank that answered since (a slow rank, not a dead one)"
    return ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))


def any_rank(d, flag: bool, device) -> bool:
    """Whether `flag` holds on any rank (one tiny all-reduce; none at world size 1): ranks that must
    take the same branch (stop, fail a save, refuse a disk) decide on this."""
    if not d.enabled:
        return flag
    return bool(d.sum(torch.tensor([int(flag)], device=device))[0] > 0)


def preflight_disk(cfg, run_dir: Path, d, device, model, opt, strict: bool) -> None:
    """Before step 0: a warning naming both figures when the run folder's disk cannot hold what the run
    keeps; with --strict-disk an error (every rank decides alike)."""
    from .config import ConfigError

    total, every = cfg.resolved.total_steps, cfg.checkpoint.every
    saves = (total - 1) // every + 1 if every else 1  # the periodic ones before the end, and the final one
    short = check_disk(run_dir, checkpoint_bytes(model, opt), cfg.checkpoint.keep_last, saves,
                       bool(cfg.checkpoint.upload))
    if strict and any_rank(d, short is not None, device):
        raise ConfigError(f"{short or f'[disk] {run_dir}: too little space on another rank'} (--strict-disk)")
    if short and d.main:
        log.warning(f"{short} (--strict-disk makes this an error)")
