"""Loader throughput vs what an Atom training step consumes, on this machine's CPU.

    .venv/bin/python -m bench.loader [--tokens-per-source 8000000] [--batches 200]

Builds five synthetic uint16 sources (Atom's vocabulary, its five-source schedule from
curricula/atom.yaml), times `MixtureLoader.batch` at Atom's batch shape (512 x 64, grad_accum 4),
stream and document packing, then times Atom fwd+bwd+AdamW on the same batches (trainer.models,
curricula/atom.yaml's model section). Goals: loader tokens/s >= 100x the training step's, and >= 100M
tokens/s for the five-source stream (a plain np.memmap gather of random windows: ~137M here).
Prints a table; writes bench/results/loader.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.manifest import TokenizerInfo, write_source  # noqa: E402
from trainer.data import MixtureLoader, SourceSpec  # noqa: E402


def atom_curriculum():
    """curricula/atom.yaml as the trainer reads it (its schedule, batch and token budget derived by
    trainer.config, not here)."""
    from trainer.config import load_curriculum

    return load_curriculum(ROOT / "curricula" / "atom.yaml")[0]


def make_sources(root: Path, names, tokens_per_source: int, vocab: int, docs_per_shard=2000, shards=2):
    info = TokenizerInfo("bench-bpe", vocab, "bench", eos_id=vocab - 1)
    rng = np.random.default_rng(0)
    per = tokens_per_source // shards
    for name in names:
        docs = {}
        for split, n in (("train", per), ("val", max(per // 100, 4096))):
            for j in range(shards if split == "train" else 1):
                toks = rng.integers(0, vocab - 1, n, dtype=np.int64)
                cuts = np.sort(rng.choice(np.arange(1, n), size=min(docs_per_shard, n - 1), replace=False))
                docs[f"{split}/{j:05d}"] = np.split(toks, cuts)
        write_source(root / name, docs, info)
    return info


def time_loader(loader, n_batches: int, accum: int, repeats: int = 3) -> dict:
    """Best of `repeats` passes over the same n_batches batches (each pass does all their work, one
    schedule walk per step included): the pass least disturbed by other processes on a shared machine."""
    loader.batch(0, 0)  # page in, warm caches
    passes = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = 0
        for i in range(n_batches):
            x, _, _, _ = loader.batch(1 + i // accum, i % accum)
            tokens += x.numel()
        passes.append((time.perf_counter() - t0, time.process_time() - c0))
    dt, cpu = min(passes)
    return {"batches": n_batches, "tokens": tokens, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": tokens / dt,
            "ms_per_batch": 1e3 * dt / n_batches, "pass_seconds": [round(p[0], 4) for p in passes]}


def time_plain_gather(path: Path, seq_len: int, micro_batch: int, n_batches: int, repeats: int = 3) -> dict:
    """The reference: B random windows of seq_len+1 from one np.memmap'd shard by fancy indexing,
    int64 out, nothing else (no schedule, no permutation, one source)."""
    from shards.format import open_shard

    tokens = open_shard(sorted((path / "train").glob("*.ds"))[0]).tokens
    n = (len(tokens) - 1) // seq_len
    rng = np.random.default_rng(0)
    ar = np.arange(seq_len + 1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_batches):
            rows = tokens[(rng.integers(0, n, micro_batch) * seq_len)[:, None] + ar].astype(np.int64)
        best = min(best, time.perf_counter() - t0)
    total = n_batches * micro_batch * seq_len
    return {"batches": n_batches, "tokens": total, "seconds": best, "tokens_per_s": total / best,
            "ms_per_batch": 1e3 * best / n_batches, "rows_shape": list(rows.shape)}


def time_atom(cfg, loader, micro_batch: int, steps: int) -> dict:
    import torch

    from trainer.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x, y, _, _ = loader.batch(0, 0)
    x, y = x[:micro_batch], y[:micro_batch]

    def step():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = steps * x.numel()
    # cpu_seconds < seconds * threads means other processes shared the cores while timing
    return {"parameters": int(model.num_params()), "micro_batch": micro_batch, "seq_len": x.shape[1],
            "steps": steps, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": tokens / dt,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-source", type=int, default=8_000_000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--atom-micro-batch", type=int, default=8, help="rows per timed Atom fwd+bwd (tokens/s is per token)")
    p.add_argument("--atom-steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader.json"))
    args = p.parse_args(argv)

    cfg = atom_curriculum()
    names = [s.name for s in cfg.data.sources]
    schedule = cfg.resolved.mixture
    seq_len, mb, accum = cfg.batch.seq_len, cfg.batch.micro_batch, cfg.resolved.grad_accum
    vocab = cfg.model.vocab_size
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version(), "loadavg_start": os.getloadavg()},
                     "shape": {"seq_len": seq_len, "micro_batch": mb, "grad_accum": accum, "sources": names}}
    with tempfile.TemporaryDirectory(prefix="shardloom-bench-") as tmp:
        t0 = time.perf_counter()
        make_sources(Path(tmp), names, args.tokens_per_source, vocab)
        results["setup_seconds"] = time.perf_counter() - t0
        specs = [SourceSpec(n, str(Path(tmp) / n)) for n in names]
        total = cfg.resolved.total_tokens
        for packing in ("stream", "document"):
            loader = MixtureLoader(specs, schedule, seq_len, mb, seed=1337, rank=0, world_size=1,
                                   total_tokens=total, grad_accum=accum, packing=packing, vocab_size=vocab)
            results[f"loader_{packing}"] = time_loader(loader, args.batches, accum)
        # a rank of an 8-way job: same per-call work, rows spread over ranks
        loader8 = MixtureLoader(specs, schedule, seq_len, mb, seed=1337, rank=3, world_size=8, total_tokens=total,
                                grad_accum=1)
        results["loader_stream_rank3_of_8"] = time_loader(loader8, args.batches, 1)
        results["plain_memmap_gather"] = time_plain_gather(Path(tmp) / names[0], seq_len, mb, args.batches)
        stream = MixtureLoader(specs, schedule, seq_len, mb, seed=1337, total_tokens=total, grad_accum=accum)
        try:
            results["atom_train_step"] = time_atom(cfg, stream, args.atom_micro_batch, args.atom_steps)
        except Exception as e:  # models not importable yet: loader figures alone
            results["atom_train_step"] = {"error": f"{type(e).__name__}: {e}"}
    results["machine"]["loadavg_end"] = os.getloadavg()
    atom = results["atom_train_step"].get("tokens_per_s")
    if atom:
        results["ratio_loader_to_atom_step"] = results["loader_stream"]["tokens_per_s"] / atom
        results["goal_100x_met"] = results["ratio_loader_to_atom_step"] >= 100

    print(f"load average at start/end: {results['machine']['loadavg_start'][0]:.1f} / "
          f"{results['machine']['loadavg_end'][0]:.1f} on {os.cpu_count()} cores (shared machine: figures are noisy)")
    print(f"{'measure':<28} {'tokens/s':>14} {'ms/batch':>10}")
    for k in ("loader_stream", "loader_document", "loader_stream_rank3_of_8", "plain_memmap_gather"):
        r = results[k]
        print(f"{k:<28} {r['tokens_per_s']:>14,.0f} {r['ms_per_batch']:>10.2f}")
    if atom:
        print(f"{'atom fwd+bwd+adamw':<28} {atom:>14,.0f}   ({results['atom_train_step']['parameters']:,} params, "
              f"{results['atom_train_step']['torch_threads']} threads)")
        print(f"loader / atom step: {results['ratio_loader_to_atom_step']:,.0f}x (goal >= 100x: "
              f"{'met' if results['goal_100x_met'] else 'NOT met'})")
    else:
        print(f"atom step not measured: {results['atom_train_step']['error']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
