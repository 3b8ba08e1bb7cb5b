"""Train a model from a curriculum.

    python -m trainer.run curricula/atom.yaml [section.key=value ...] [--dry-run [--json] [--skip-data] [--gpu-mem GB]]
                          [--resume] [--run-dir DIR] [--overwrite] [--strict-disk]
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
import dataclasses
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from shards.s3 import is_s3_uri

from .budget import curriculum_budget, print_budget, stage_budget
from .checkpoint import STEP_RE, find_weights, load_model
from .config import Config, ConfigError, load_curriculum
from .data import DataError
from .faults import EXIT_NO_SPACE, EXIT_PEER_LOST, EXIT_STOPPED, NoSpace, PeerTimeout, Stopped, requeue
from .tools.generate import sample_generation
from .tools.hf import resolve_hub
from .telemetry.console import log, setup as setup_logging
from .loop import train_stage
from .models import build_model
from .telemetry.metrics import fmt_count
from .parallel import Dist, pick_device
from .preflight import (check_eval_tasks, check_sample_tokenizer, check_splits, decontamination_warning,
                        local_manifests, try_tokenizer)
from .upload import fetch_init, fetch_resume


def summary(cfg: Config) -> dict:
    model = build_model(cfg.model, device="meta")
    r = cfg.resolved
    tps, steps, world = r.tokens_per_step, r.total_steps, r.world_size
    return {
        "stage": cfg.name,
        "parameters": int(model.num_params()),
        "tokens_per_step": tps,
        "grad_accum": r.grad_accum,
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
        remote = is_s3_uri(src.path)
        state = "remote" if remote else ("ok" if (Path(src.path) / "manifest.json").exists() else "not built yet")
        print(f"    {src.name:24s} {src.path}  [{state}]")
    names = [src.name for src in cfg.data.sources]
    width = max(12, *(len(n) for n in names))
    print("  mixture schedule (normalised weights; linear between points)")
    print("    " + "at".rjust(7) + "  " + "  ".join(n.rjust(width) for n in names))
    for p in s["mixture"]:
        print("    " + f"{p['at']:7.3f}" + "  " + "  ".join(f"{p['weights'].get(n, 0.0):{width}.3f}" for n in names))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("curriculum")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--dry-run", action="store_true", help="validate, build on the meta device, print a summary")
    ap.add_argument("--json", action="store_true", help="with --dry-run: last stdout line is a JSON summary")
    ap.add_argument("--gpu-mem", type=float, default=None, metavar="GB",
                    help="with --dry-run: GPU memory per rank the memory plan must fit (default: the local GPU's); "
                         "WORLD_SIZE=N plans N ranks")
    ap.add_argument("--skip-data", action="store_true",
                    help="with --dry-run: no data budget (sources not opened; for a curriculum whose shards are not built)")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="S3_URI",
                    help="continue from the newest valid checkpoint (of the run dir, or of an s3:// run or "
                         "checkpoint, downloaded into the run dir first)")
    ap.add_argument("--run-dir", default=None, help="default: runs/<curriculum name>")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run dir first")
    ap.add_argument("--strict-disk", action="store_true",
                    help="too little free space for the checkpoints the run keeps is an error before step 0, "
                         "not a warning")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if isinstance(args.resume, str) and not is_s3_uri(args.resume):
        if "=" not in args.resume:
            ap.error(f"--resume takes no value or an s3:// URI, got {args.resume!r}")
        args.overrides.insert(0, args.resume)  # `--resume optim.lr=1e-3`: an override, not a URI
        args.resume = True
    return args


def print_tasks(cfg: Config, counts: dict[str, int]) -> None:
    if not counts:
        return
    when = f"every {cfg.eval.tasks_every} steps" if cfg.eval.tasks_every else (
        f"every {cfg.eval.every} steps" if cfg.eval.every and cfg.eval.tasks_every is None else "")
    print(f"  eval tasks ({when + ' and ' if when else ''}at the end; lm-eval, live model)")
    for task, n in counts.items():
        print(f"    {task:24s} {n:,} examples")


def dry_run(stages: list[Config], d: Dist, as_json: bool, skip_data: bool, gpu_mem: float | None = None) -> None:
    """Validate, build on the meta device, print each stage's summary, memory plan and data budget
    (and with as_json a last stdout line of JSON)."""
    from .memory import report as memory_report  # torch's memory trackers: only a dry run needs them

    sums, budgets, plans = [], [], {}
    for cfg in stages:
        s = summary(cfg)
        sums.append(s)
        if d.main:
            print_summary(s, cfg)
            s["memory"] = memory_report(cfg, gpu_mem, plans, d.local_rank)  # the same on every rank: rank 0 plans
        if not skip_data:  # a missing or empty source, or a task that cannot load, stops here (one line)
            budgets.append(stage_budget(cfg))
            s["sources"] = [dataclasses.asdict(b) for b in budgets[-1]]
            s["tasks"] = check_eval_tasks(cfg, *try_tokenizer(cfg))
            manifests = local_manifests(cfg)
            check_splits(cfg, manifests)
            if d.main:
                print_budget(budgets[-1])
                print_tasks(cfg, s["tasks"])
                if warning := decontamination_warning(cfg, manifests):
                    print(f"  {warning}")
        elif d.main and cfg.eval.tasks:
            print(f"  eval tasks      {', '.join(cfg.eval.tasks)} (not resolved: --skip-data)")
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
        out["memory"] = max((s["memory"] for s in sums), key=lambda m: m.get("per_rank_gb", 0.0))  # the largest stage
        print(json.dumps(out))


def init_path_of(cfg: Config, prev_final: Path | None) -> Path | None:
    """train.init_from resolved: the previous stage's final checkpoint, a run, a checkpoint (weights
    suffice), an HF folder, hf://org/name or s3://."""
    init = cfg.train.init_from
    if init == "@previous":
        if prev_final is None:
            raise ConfigError(f"{cfg.source_file}: train.init_from: '@previous' in the first stage")
        return prev_final
    return find_weights(resolve_hub(fetch_init(init, cfg))) if init else None


def finished_stage(cfg: Config, stage_dir: Path) -> Path:
    """The final checkpoint of a stage whose DONE marker exists (--resume), refused when these settings
    would make another number of steps."""
    final = Path((stage_dir / "DONE").read_text().strip())
    done = STEP_RE.match(final.name)
    if done and int(done.group(1)) != cfg.resolved.total_steps:
        raise ConfigError(
            f"{stage_dir}: finished at step {int(done.group(1))}, but these settings make "
            f"{cfg.resolved.total_steps} steps: --resume only continues an unfinished run (the LR "
            f"and mixture schedules span the whole run); to train further, start a new run with "
            f"train.init_from={final}")
    return final


def run_stages(stages: list[Config], run_dir: Path, resume, d: Dist, strict_disk: bool = False) -> None:
    prev_final: Path | None = None
    resumed_done: Path | None = None
    for i, cfg in enumerate(stages):
        stage_dir = run_dir if len(stages) == 1 else run_dir / f"{i}-{cfg.name}"
        init_path = init_path_of(cfg, prev_final)
        if isinstance(resume, str):  # s3://: the checkpoint comes into this stage's checkpoints/ first
            fetch_resume(resume, stage_dir, cfg, stage_dir.name if cfg.name else None)
        if resume and (stage_dir / "DONE").exists():
            prev_final = finished_stage(cfg, stage_dir)
            log.info(f"[stage] {cfg.name or i}: already done ({prev_final})")
            resumed_done = prev_final if i == len(stages) - 1 else None
            continue
        prev_final = train_stage(cfg, stage_dir, d, resume, init_path, sample=i == len(stages) - 1,
                                 strict_disk=strict_disk)
    if d.main and resumed_done is not None:  # the last stage had finished: sample its checkpoint
        sample_generation(stages[-1], load_model(resumed_done, device=pick_device(stages[-1], d))[0])


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    d = Dist()
    setup_logging(d.rank)
    try:
        stages = load_curriculum(args.curriculum, args.overrides, world_size=d.world)
        if args.dry_run:
            dry_run(stages, d, args.json, args.skip_data, args.gpu_mem)
            return 0
        check_sample_tokenizer(stages[-1])  # a bad tokenizer.path must not surface only after training
        run_dir = Path(args.run_dir or Path("runs") / Path(args.curriculum).stem)
        if args.overwrite:
            # rank 0 deletes; no rank may look at the run dir before that is done (the "already holds
            # checkpoints" check), hence the process group first and a barrier after
            if d.world > 1:
                d.init(pick_device(stages[0], d).type, stages[0].train.dist_timeout)
            if d.main and run_dir.exists():
                shutil.rmtree(run_dir)
            d.barrier()
        run_stages(stages, run_dir, args.resume, d, args.strict_disk)
        return 0
    except (Stopped, NoSpace, PeerTimeout) as e:  # faults of the machine (trainer/faults.py)
        return machine_fault(e, d)
    except (ConfigError, FileNotFoundError, DataError) as e:  # each names its file or field: no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as e:  # bad steps beyond what rollback may repair (trainer/guard.py)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except OSError as e:  # the disk filled outside a checkpoint save (metrics, the DONE marker)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.strerror} writing {e.filename or 'a file of the run'}; free space, then --resume",
              file=sys.stderr, flush=True)
        return EXIT_NO_SPACE
    finally:
        d.close()


def machine_fault(e: Exception, d: Dist) -> int:
    """One line and the exit status for a stop signal, a full disk or a rank that stopped answering."""
    if isinstance(e, Stopped):
        if d.main:  # every rank saved and flushed; one line for the run
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            if e.requeue:
                requeue(os.environ.get("SLURM_JOB_ID"))
        return EXIT_STOPPED
    if str(e):  # NoSpace: rank 0's names the folder; PeerTimeout: every surviving rank names its wait
        print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NO_SPACE if isinstance(e, NoSpace) else EXIT_PEER_LOST


if __name__ == "__main__":
    sys.exit(main())
