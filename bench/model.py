"""Model throughput: forward+backward tokens/s per architecture, and ours vs transformers' Llama.

    .venv/bin/python -m bench.model              # CPU, small sizes, ~2-3 min on 2 cores
    .venv/bin/python -m bench.model --quick      # fewer repetitions
    .venv/bin/python -m bench.model --device cuda [--compile]   # bf16 autocast, adds MFU

Atom runs at full size; Axiom, Argonne and Llama Think keep their shapes (head layout, GQA ratio,
norms, mixers) at reduced width/depth/vocab so a CPU step stays short. The comparison rows load
identical weights into transformers' LlamaForCausalLM (SDPA attention) and time the two models
interleaved, step by step, so background load hits both alike; the ratio is ours/theirs throughput
(>= 1.0 means we are not slower). On CPU the default is one thread and the ratio uses process CPU
time per step: on a shared machine wall time mostly measures the neighbours, CPU time the work.
Wall-clock tokens/s are reported too. Writes bench/results/model.json and prints a table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from trainer.models import build_model

# Shapes: the presets' structure at sizes a CPU can step through.
ARCHS = {
    "atom": {"arch": "dense", "preset": "atom"},  # full size (3.4M)
    "axiom-small": {"arch": "dense", "preset": "axiom-380m", "vocab_size": 8192, "d_model": 512,
                    "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 1408},
    "argonne-small": {"arch": "dense", "preset": "argonne-3.0", "vocab_size": 8192, "d_model": 512,
                      "n_layers": 4, "n_heads": 3, "n_kv_heads": 1, "head_dim": 128, "ffn_dim": 1365},
    "llama-think-small": {"arch": "hybrid", "preset": "llama-think-95m", "vocab_size": 8192, "n_layers": 4},
}
VS_LLAMA = {
    "atom-noxsa": {"arch": "dense", "preset": "atom", "xsa_layers": None},
    "axiom-small": ARCHS["axiom-small"],
}


def hf_llama_like(model):
    """transformers LlamaForCausalLM of identical config holding the same weights (the export's
    mapping: q/k rows permuted for an interleaved-RoPE model, so both compute the same function)."""
    from trainer.tools.hf import transformers_llama

    return transformers_llama(model, attn_implementation="sdpa")


def make_step(forward, params, ids, device, amp):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss
    return step


def time_interleaved(steps: dict, warmup: int, reps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds per step for each callable, alternating every repetition."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}


def peak_flops(device, override_tflops):
    """The MFU denominator: --peak-tflops, else the device's dense bf16 peak (trainer.telemetry.metrics' table)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    from trainer.telemetry.metrics import peak_flops as device_peak

    return device_peak(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2 CPU, 16 GPU)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile our models (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the MFU denominator")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "model.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    amp = device.type == "cuda"
    batch = args.batch or (2 if device.type == "cpu" else 16)
    reps = args.reps or (3 if args.quick else 9)
    warmup = 1 if args.quick else 2
    peak = peak_flops(device, args.peak_tflops)
    g = torch.Generator().manual_seed(0)
    rows = []

    def ids_for(model):
        return torch.randint(0, model.config.vocab_size, (batch, args.seq + 1), generator=g).to(device)

    def row(name, model, sec, extra=None):
        (wall, cpu) = sec
        tps = batch * args.seq / wall
        r = {"name": name, "params": model.num_params(), "tokens_per_step": batch * args.seq,
             "sec_per_step": round(wall, 4), "tokens_per_s": round(tps, 1),
             "tokens_per_cpu_s": round(batch * args.seq / cpu, 1)}
        if peak:
            r["mfu"] = round(model.flops_per_token(args.seq) * tps / peak, 4)
        r.update(extra or {})
        rows.append(r)
        return r

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"batch={batch} seq={args.seq} reps={reps}", flush=True)
    for name, cfg in ARCHS.items():
        torch.manual_seed(0)
        try:
            model = build_model(cfg).to(device).train()
        except (ImportError, ValueError) as e:
            print(f"skip {name}: {e}")
            continue
        fwd = torch.compile(model) if args.compile else model
        per_arch_reps = max(2, reps // 3)  # no comparison here: fewer repetitions suffice
        sec = time_interleaved({"ours": make_step(fwd, list(model.parameters()), ids_for(model), device, amp)},
                               1, per_arch_reps)["ours"]
        r = row(name, model, sec)
        print(f"  {name}: {r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_cpu_s']:,.0f} per CPU-s)", flush=True)

    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers not installed: skipping the Llama comparison")
    for name, cfg in (VS_LLAMA.items() if have_hf else []):
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        hf = hf_llama_like(model).train()
        ids = ids_for(model)
        with torch.no_grad():  # same function: the ratio compares equal work
            diff = (model(ids[:1, :64]) - hf(ids[:1, :64]).logits).abs().max().item()
        fwd = torch.compile(model) if args.compile else model
        t = time_interleaved({
            "ours": make_step(fwd, list(model.parameters()), ids, device, amp),
            "hf": make_step(lambda x: hf(x).logits, list(hf.parameters()), ids, device, amp),
        }, warmup, reps)
        k = 1 if device.type == "cpu" else 0  # CPU: CPU-time ratio; GPU: wall (synchronised)
        ratio, ratio_wall = t["hf"][k] / t["ours"][k], t["hf"][0] / t["ours"][0]
        print(f"  {name}: ours {batch * args.seq / t['ours'][k]:,.0f}, transformers Llama "
              f"{batch * args.seq / t['hf'][k]:,.0f} tok/{'CPU-' if k else ''}s -> ratio {ratio:.3f} "
              f"(wall {ratio_wall:.3f}; max |dlogit| {diff:.1e})", flush=True)
        row(f"{name} (ours)", model, t["ours"], {"vs": "transformers.LlamaForCausalLM", "ratio": round(ratio, 3),
                                                  "ratio_wall": round(ratio_wall, 3), "max_abs_logit_diff": diff})
        row(f"{name} (transformers)", model, t["hf"])

    cols = ["name", "params", "tokens_per_step", "sec_per_step", "tokens_per_s", "tokens_per_cpu_s", "ratio"] + (["mfu"] if peak else [])
    print()
    print(" | ".join(f"{c:>22}" if i == 0 else f"{c:>14}" for i, c in enumerate(cols)))
    for r in rows:
        print(" | ".join(f"{str(r.get(c, '')):>22}" if i == 0 else f"{str(r.get(c, '')):>14}"
                         for i, c in enumerate(cols)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch, "seq": args.seq,
            "reps": reps, "amp_bf16": amp, "compile": args.compile, "platform": platform.platform()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
