"""Head + loss memory and time: full logits (today) vs the chunked linear + cross-entropy, at Argonne's
head (vocabulary 151,669, d_model 3,072, softcap 15). Goal: the head's peak memory at most 1/8 of the
full path's, at no more than 5% step-time cost.

    .venv/bin/python -m bench.loss                  # CPU: 2,048 tokens, chunks of 256, ~20 min on 2 cores
    .venv/bin/python -m bench.loss --device cuda    # bf16 autocast: the card's 38 x 1,024 tokens

A step is the forward and backward of head and loss from the final hidden states (what the model does
after its last norm); nothing else runs. Each variant runs in a fresh process, so one's allocations
cannot hide the other's. Memory: CUDA, torch.cuda.max_memory_allocated; CPU, the process's peak RSS
(getrusage; torch's CPU allocations are invisible to tracemalloc), both taken above what is held before
the first step (hidden states, weight, targets). "peak" is that rise; "kept" what is still held after
the step (the two gradients, which training needs anyway); "transient" = peak - kept. Time: median wall
and process-CPU seconds over --reps steps after the measured one (CPU time is robust to neighbours).

CPU scale-down: the card's 38,912 tokens would need ~100 GB for the full path, so the CPU run uses 2,048
tokens in 256-token chunks (8 chunks; the card's batch is 19 of the default 2,048). Fewer tokens would
mislead: below ~1,500 the full path's peak is its weight gradient, not its logits. And at this scale the
1.9 GB weight gradient, which both paths must produce, is a large part of either peak, so the JSON's
`projection` also carries the measurements to the card's batch and the default chunk: the full path's
peak along the line through 3/4 and all of the tokens, the chunked one's as its gradients (sizes known)
plus a transient along the line through half and all of the chunk. Writes bench/results/loss.json and
prints a table.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from trainer.loss import LOSS_CHUNK, compute_loss, linear_cross_entropy

VOCAB, D_MODEL, SOFTCAP = 151_669, 3_072, 15.0  # Argonne 3.0 (docs/models.md)
CARD_TOKENS = 38 * 1024                        # its micro-batch (curricula/argonne-3.0.yaml)


def full_head(h, w, y, chunk):
    """Today's path, as CausalLM.head then compute_loss: the whole [tokens, vocab] logits."""
    logits = F.linear(h, w).float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return compute_loss(logits, y, None)


def chunked_head(h, w, y, chunk):
    return linear_cross_entropy(h, w, y, None, SOFTCAP, chunk)


VARIANTS = {"full": full_head, "chunked": chunked_head}


class Memory:
    """Bytes held now and the peak so far: the CUDA allocator's counters, or the process's RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def inputs(tokens: int, device: torch.device):
    """Final hidden states (RMS 1, as after the final norm) and a weight at Argonne's init, N(0, d^-0.5)."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, D_MODEL, device=device, generator=g).requires_grad_()
    w = (torch.randn(VOCAB, D_MODEL, device=device, generator=g) * D_MODEL ** -0.5).requires_grad_()
    y = torch.randint(0, VOCAB, (tokens,), device=device, generator=g)
    return h, w, y


def step(fn, h, w, y, chunk, device) -> float:
    """One forward + backward of head and loss; returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = fn(h, w, y, chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item()


def worker(a) -> dict:
    """Runs in its own process: the memory of the first step, then the timed steps."""
    device = torch.device(a.device)
    fn = VARIANTS[a.worker]
    h, w, y = inputs(a.tokens, device)
    mem = Memory(device)
    base, peak_before = mem.now(), mem.peak()
    try:
        loss = step(fn, h, w, y, a.chunk, device)
    except torch.OutOfMemoryError as e:
        return {"oom": str(e).splitlines()[0]}
    r = {"loss": loss, "peak": mem.peak() - base, "kept": mem.now() - base,
         "peak_before_exceeded": peak_before > base}
    wall, cpu = [], []
    for _ in range(a.reps):
        h.grad = w.grad = None  # as zero_grad(set_to_none=True) leaves them
        t, c = time.perf_counter(), time.process_time()
        step(fn, h, w, y, a.chunk, device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if wall:
        r.update(sec_per_step=statistics.median(wall), cpu_sec_per_step=statistics.median(cpu))
    return r


def run_variant(name: str, a) -> dict:
    """The worker for `name` in a fresh interpreter (its peak is its own)."""
    cmd = [sys.executable, "-m", "bench.loss", "--worker", name, "--device", a.device, "--tokens", str(a.tokens),
           "--chunk", str(a.chunk), "--reps", str(a.reps)] + (["--threads", str(a.threads)] if a.threads else [])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)  # stderr goes in the message
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def line(p0: tuple[float, float], p1: tuple[float, float], x: float) -> float:
    """The straight line through two (x, y) points, at x."""
    (x0, y0), (x1, y1) = p0, p1
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def grads(tokens: int) -> int:
    """Bytes of the fp32 gradients of the head weight and of the hidden states."""
    return 4 * D_MODEL * (VOCAB + tokens)


def projection(a, full, part_full, chunked, half_chunk) -> dict:
    """fp32 peaks at the card's batch and the default chunk, from the measured ones: the full path's
    peak is linear in tokens; the chunked one holds the fp32 gradients of weight and hidden states (sizes
    known) plus a transient linear in the chunk (measured at two chunk sizes, tokens fixed)."""
    peak_full = line((a.tokens * 3 // 4, part_full["peak"]), (a.tokens, full["peak"]), CARD_TOKENS)
    transient = line((a.chunk // 2, half_chunk["peak"] - grads(a.tokens)),
                     (a.chunk, chunked["peak"] - grads(a.tokens)), LOSS_CHUNK)
    peak_chunked = grads(CARD_TOKENS) + transient
    return {"tokens": CARD_TOKENS, "chunk": LOSS_CHUNK, "full_peak_gb": round(peak_full / 1e9, 2),
            "chunked_peak_gb": round(peak_chunked / 1e9, 2), "peak_ratio": round(peak_chunked / peak_full, 4),
            "from": {f"full_{a.tokens * 3 // 4}_tokens_peak_gb": round(part_full["peak"] / 1e9, 3),
                     f"chunked_chunk_{a.chunk // 2}_peak_gb": round(half_chunk["peak"] / 1e9, 3)}}


def row(name, tokens, chunk, r, full=None) -> dict:
    out = {"name": name, "tokens": tokens, "chunk": chunk, "loss": round(r["loss"], 6),
           "peak_gb": round(r["peak"] / 1e9, 3), "kept_gb": round(r["kept"] / 1e9, 3),
           "transient_gb": round((r["peak"] - r["kept"]) / 1e9, 3),
           "sec_per_step": round(r["sec_per_step"], 3), "cpu_sec_per_step": round(r["cpu_sec_per_step"], 3)}
    if full is not None:
        out["peak_ratio"] = round(r["peak"] / full["peak"], 4)
        out["time_ratio"] = round(r["sec_per_step"] / full["sec_per_step"], 4)
        out["cpu_time_ratio"] = round(r["cpu_sec_per_step"] / full["cpu_sec_per_step"], 4)
    return out


def print_table(rows: list[dict]) -> None:
    cols = ["name", "tokens", "chunk", "peak_gb", "kept_gb", "transient_gb", "sec_per_step", "cpu_sec_per_step",
            "peak_ratio", "time_ratio", "cpu_time_ratio"]
    print(" | ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '')!s:>16}" for c in cols))


def measure(a) -> tuple[list[dict], dict | None]:
    """Both variants at the chosen size; on CPU also the points the card-scale projection needs."""
    full = run_variant("full", a)
    chunked = run_variant("chunked", a)
    if "oom" in chunked:
        raise SystemExit(f"chunked path out of memory: {chunked['oom']}")
    if "oom" in full:  # the bug this fixes: report it rather than fail
        return [{"name": "full", "tokens": a.tokens, "oom": full["oom"]},
                row("chunked", a.tokens, a.chunk, chunked)], None
    rows = [row("full", a.tokens, "", full), row("chunked", a.tokens, a.chunk, chunked, full)]
    if a.device != "cpu" or a.no_projection:
        return rows, None
    fit = argparse.Namespace(**{**vars(a), "reps": 0})
    part_full = run_variant("full", argparse.Namespace(**{**vars(fit), "tokens": a.tokens * 3 // 4}))
    half_chunk = run_variant("chunked", argparse.Namespace(**{**vars(fit), "chunk": a.chunk // 2}))
    return rows, projection(a, full, part_full, chunked, half_chunk)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (CPU 2048, CUDA 38912)")
    ap.add_argument("--chunk", type=int, default=None, help=f"tokens per chunk (CPU 256, CUDA {LOSS_CHUNK})")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (CPU 2, CUDA 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-projection", action="store_true", help="CPU: skip the two runs the projection needs")
    ap.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss.json"))
    a = ap.parse_args(argv)
    cpu = a.device == "cpu"
    a.tokens = a.tokens or (2048 if cpu else CARD_TOKENS)
    a.chunk = a.chunk or (256 if cpu else LOSS_CHUNK)
    a.reps = a.reps if a.reps is not None else (2 if cpu else 10)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} vocab={VOCAB} "
          f"d_model={D_MODEL} tokens={a.tokens} chunk={a.chunk} reps={a.reps}", flush=True)
    rows, proj = measure(a)
    print_table(rows)
    meta = {"device": a.device if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "vocab": VOCAB, "d_model": D_MODEL, "softcap": SOFTCAP,
            "amp_bf16": not cpu, "memory": "peak RSS (getrusage)" if cpu else "torch.cuda.max_memory_allocated",
            "platform": platform.platform(), "goal": {"peak_ratio_max": 0.125, "time_ratio_max": 1.05}}
    if proj:
        print(f"projected fp32 at {proj['tokens']:,} tokens, chunk {proj['chunk']}: full {proj['full_peak_gb']} GB, "
              f"chunked {proj['chunked_peak_gb']} GB (ratio {proj['peak_ratio']})")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "projection": proj}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
