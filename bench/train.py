"""Trainer overhead: tokens/s of `python -m trainer.run` vs a minimal plain-PyTorch loop over the same
model, optimizer and batches (goal: our overhead <= 5%). Writes bench/results/train.json.

    python bench/train.py [--steps 40] [--warmup 5] [--repeats 2] [--seq-len 128] [--micro-batch 4]
                          [--shards out/demo/shards/topics]

Both sides: Atom's exact architecture (3.4M params), AdamW with the same param groups, clipping,
fp32 on CPU, same threads. Ours is timed from its own per-step metrics rows (wall clock between the
end of warm-up step W and the last step), so process start, data validation and the final checkpoint
are not counted; everything inside the loop is (loader, LR schedule, loss logging with a sync every
step, DDP-ready code paths). The plain loop gets its batches from the same loader, materialised
before timing (the ideal: zero data cost). Runs alternate ours/plain to share machine noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATOM = dict(arch="dense", vocab_size=4096, d_model=192, n_layers=7, n_heads=3, n_kv_heads=1, head_dim=64,
            ffn_dim=480, max_seq_len=512, rope_theta=5000.0, xsa_layers="all", tie_embeddings=True)


def synth_shards(d: Path, seed: int = 0, tokens: int = 400_000) -> Path:
    from shards.format import ShardWriter
    from shards.manifest import TokenizerInfo, build_manifest, write_manifest

    rng = np.random.default_rng(seed)
    info = TokenizerInfo(name="bench", vocab_size=4096, vocab_hash="bench", eos_id=0)
    for split, n in (("train", tokens), ("val", tokens // 50)):
        with ShardWriter(d / split / "00000", np.dtype("<u2"), "bench") as w:
            done = 0
            while done < n:
                doc = rng.integers(1, 4096, int(rng.integers(50, 500)))
                w.write(doc)
                done += len(doc)
    write_manifest(d, build_manifest(d, info))
    return d


def curriculum(path: Path, shards: str, a: argparse.Namespace) -> Path:
    cur = {
        "model": ATOM, "tokenizer": {"name": "bench"},
        "data": {"sources": [{"name": "src", "path": shards}]},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup": 5},
        "batch": {"seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": 1},
        "train": {"steps": a.steps, "seed": 1, "dtype": "fp32", "log_every": 1},
        "eval": {"every": 0, "batches": 0}, "checkpoint": {"every": 0, "keep_last": 1},
    }
    path.write_text(yaml.safe_dump(cur))
    return path


def time_ours(cur: Path, run_dir: Path, a) -> float:
    from trainer.run import main

    rc = main([str(cur), "--run-dir", str(run_dir), "--overwrite"])
    assert rc == 0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["time"] for r in rows if r["type"] == "train"}
    toks = (a.steps - a.warmup) * a.seq_len * a.micro_batch
    return toks / (t[a.steps] - t[a.warmup])


def time_plain(cur: Path, a) -> float:
    """The minimal loop: model, AdamW (same groups), forward, CE, backward, clip, step. Nothing else."""
    from trainer.config import load_curriculum
    from trainer.models import build_model
    from trainer.optim import build_optimizer
    from trainer.run import make_loader, Dist

    (cfg,) = load_curriculum(cur)
    loader = make_loader(cfg, Dist(), 4096)
    batches = [loader.batch(s, 0)[:2] for s in range(a.steps)]
    torch.manual_seed(1)
    model = build_model(dict(ATOM))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    model.train()
    t0 = None
    for s, (x, y) in enumerate(batches):
        if s == a.warmup:
            t0 = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    dt = time.perf_counter() - t0
    return (a.steps - a.warmup) * a.seq_len * a.micro_batch / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--shards", default=None, help="a shard dir (default: synthetic tokens)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = a.shards or str(synth_shards(tmp / "shards"))
        cur = curriculum(tmp / "bench.yaml", shards, a)
        ours, plain = [], []
        for r in range(a.repeats):
            ours.append(time_ours(cur, tmp / f"run{r}", a))
            plain.append(time_plain(cur, a))
            print(f"repeat {r}: ours {ours[-1]:,.0f} tok/s, plain {plain[-1]:,.0f} tok/s", flush=True)
    o, p = statistics.median(ours), statistics.median(plain)
    overhead = 1 - o / p
    res = {
        "model": "atom (3,412,800 params)", "seq_len": a.seq_len, "micro_batch": a.micro_batch,
        "tokens_per_step": a.seq_len * a.micro_batch, "steps_timed": a.steps - a.warmup, "repeats": a.repeats,
        "ours_tokens_per_s": ours, "plain_tokens_per_s": plain,
        "ours_median": o, "plain_median": p, "overhead": overhead, "goal_overhead_max": 0.05,
        "meets_goal": overhead <= 0.05, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(f"\n{'':12s}{'tokens/s':>12s}\n{'ours':12s}{o:12,.0f}\n{'plain loop':12s}{p:12,.0f}\n"
          f"overhead {100 * overhead:+.1f}% (goal <= 5%) | load avg {res['load_avg_1m']:.1f} on {os.cpu_count()} cpus")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
