"""One prepared GPU run: training throughput, MFU and memory of the seed models, and the fla kernels
against our chunked Gated DeltaNet. Written for one H100/H200-class GPU; the whole run stays under
8 minutes (`--budget`, default 450 s), and bench/results/gpu.json is rewritten after every row.

    python -m bench.gpu                    # needs CUDA; bench/gpu_run.sh sets up fla from carried wheels
    python -m bench.gpu --only atom,axiom-380m --budget 200
    python -m bench.gpu --smoke [--inline] # the same code on CPU at tiny shapes (tests/trainer/test_bench_gpu.py)

Every row runs in its own process with its own time cap (killed with its process group when over
it), so a crash, an out-of-memory or a hung compile costs that row only; its partial figures are kept.
A row trains the real model the way its curriculum says (bf16 autocast, torch.compile, activation
checkpointing, the curriculum's optimizer through trainer.optim) with the trainer's own
`forward_backward`, on synthetic token shards read by the real loader through the prefetching
thread (pinned memory, non-blocking copies). Micro-batches are chosen to fit one GPU (a row halves
its micro-batch once on out-of-memory); grad accumulation is the curriculum's, capped (8; Argonne 2).

Per row: tokens/s (median step), "mfu" (model FLOPs per token x tokens/s over the dense bf16 peak of
the device from trainer.telemetry.metrics.peak_flops), "peak_mem_gb" (max allocated), "compile_s" (first step
minus a steady one), the loader's share of a step ("loader_share_sync": its synchronous cost per step
over the step time; "loader_wait_share": the time training waited for the prefetcher), and "fla": true
when the fla kernels ran. The "gated-deltanet: fla vs chunked" row compares outputs and gradients of
fla's chunk_gated_delta_rule (bf16 inputs) and ours (fp32 on the same inputs), both also against the
fp32 token-by-token rule, and the whole GatedDeltaNet layer with use_fla on and off.

The trainer's GPU path needs torch, numpy, safetensors and pyyaml only: no datatrove here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    name: str
    curriculum: str
    micro_batch: int
    cap_s: float  # seconds this row's process may run (start-up and compile included)
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    max_accum: int = 8  # the curriculum's grad accumulation, at most this (the optimizer step's share)


FLA_ROW = "gated-deltanet: fla vs chunked"
ROWS = [  # most wanted first: the budget may run out before the last. Caps sum to the 450 s budget;
    # the first fla call autotunes its Triton kernels (tens of seconds on a fresh machine)
    Row(FLA_ROW, "", 0, 70),
    Row("llama-think-95m", "curricula/llama-think-95m.yaml", 32, 90,
        note="card: 64 x 1024 per B300 (275 GB); 32 here"),
    Row("axiom-380m", "curricula/axiom-380m.yaml", 16, 70, ["train.compile=true", "train.activation_checkpointing=false"],
        note="tuned: micro-batch 16, compiled, no activation checkpointing"),
    Row("axiom-380m (curriculum)", "curricula/axiom-380m.yaml", 1, 40,
        note="as the card trained: 1 x 1024, activation checkpointing, no compile"),
    Row("llama-think-95m (fla off)", "curricula/llama-think-95m.yaml", 32, 60, ["model.use_fla=false"]),
    Row("atom", "curricula/atom.yaml", 64, 40),
    Row("argonne-3.0", "curricula/argonne-3.0.yaml", 16, 80, max_accum=2,
        note="card: 38 x 1024 per GPU; full fp32 logits of 151,669 ids do not fit that here"),
]
SMOKE = {  # tiny shapes of the same structure, for CPU
    "dense": ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
              "model.n_kv_heads=2", "model.head_dim=16", "model.ffn_dim=128", "model.max_seq_len=64"],
    "hybrid": ["model.preset=hybrid-tiny"],
    "all": ["batch.seq_len=32", "train.compile=false"],
}


# ------------------------------------------------------------------------------ one model row


def synthetic_source(folder: Path, vocab: int, tokens: int) -> Path:
    """A shard dir of uniform random ids below `vocab` (throughput does not depend on the text)."""
    import numpy as np

    from shards.manifest import TokenizerInfo, write_source

    info = TokenizerInfo("synthetic", vocab, "synthetic", eos_id=0)
    ids = np.random.default_rng(0).integers(1, vocab, tokens)
    return write_source(folder, {"train/00000": np.array_split(ids, max(1, tokens // 4096))}, info)


def load_row_config(row: Row, smoke: bool):
    from trainer.config import load_curriculum

    overrides = list(row.overrides)
    if smoke:
        family = "hybrid" if "llama-think" in row.curriculum else "dense"
        overrides += SMOKE[family] + SMOKE["all"]
    return load_curriculum(ROOT / row.curriculum, overrides)[0]


def measure(row: Row, smoke: bool, micro_batch: int, partial) -> dict:
    import torch

    from trainer.data import MixtureLoader, MixturePoint, SourceSpec
    from trainer.telemetry.metrics import peak_flops
    from trainer.models import build_model, gated_deltanet
    from trainer.optim import build_optimizer
    from trainer.prefetch import Prefetcher
    from trainer.loop import forward_backward

    cfg = load_row_config(row, smoke)
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    seq, accum = cfg.batch.seq_len, min(cfg.resolved.grad_accum, 2 if smoke else row.max_accum)
    torch.manual_seed(0)
    model = build_model(cfg.model, device=device)
    opt = build_optimizer(model, cfg.optim, device.type)
    fwd = torch.compile(model) if cfg.train.compile and cuda else model
    bf16 = cfg.train.dtype == "bf16" and cuda

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    vocab = int(model.config.vocab_size)
    out = {"model": row.name, "curriculum": row.curriculum, "params": int(model.num_params()), "seq_len": seq,
           "micro_batch": micro_batch, "grad_accum": accum, "tokens_per_step": seq * micro_batch * accum,
           "dtype": "bf16" if bf16 else "fp32", "compile": bool(cfg.train.compile and cuda),
           "activation_checkpointing": bool(cfg.train.activation_checkpointing), "optimizer": cfg.optim.name,
           "fla": bool(cuda and getattr(model.config, "use_fla", False) and gated_deltanet._fla_chunk is not None),
           "flops_per_token": float(model.flops_per_token(seq)), "peak_flops": peak_flops(device)}
    if row.note:
        out["note"] = row.note
    partial(out)
    max_steps = 5 if smoke else 40
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        n_tok = min((max_steps + 2) * accum * micro_batch * (seq + 1), 8_000_000) + seq + 1
        src = synthetic_source(Path(tmp), vocab, n_tok)
        loader = MixtureLoader([SourceSpec("synthetic", str(src))], [MixturePoint(0.0, {"synthetic": 1.0})], seq,
                               micro_batch, seed=0, grad_accum=accum, vocab_size=vocab)
        t = time.perf_counter()
        for m in range(accum):  # the loader's synchronous cost of one step, for the share below
            loader.prepare(1, m)
        out["loader_ms_per_step"] = 1e3 * (time.perf_counter() - t)
        out.update(train_steps(model, fwd, opt, cfg, loader, Prefetcher(loader, 0, max_steps, pin_memory=cuda),
                               device, autocast, forward_backward, max_steps, smoke, partial, out))
    out["loader_share_sync"] = out["loader_ms_per_step"] / out["step_ms"]
    out["mfu"] = out["flops_per_token"] * out["tokens_per_s"] / out["peak_flops"] if out["peak_flops"] else None
    return out


def train_steps(model, fwd, opt, cfg, loader, prefetch, device, autocast, forward_backward, max_steps, smoke,
                partial, out) -> dict:
    """Steps 0 and 1 warm up (compile, autotuning); then timed steps for ~5 s (3 at least)."""
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tokens = out["tokens_per_step"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    timed_from = 2
    for step in range(max_steps):
        if step == timed_from:
            prefetch.wait_seconds, t_timed = 0.0, time.perf_counter()
        t = time.perf_counter()
        batches = [prefetch.batch(step, m) for m in range(loader.grad_accum)]
        loss = forward_backward(fwd, batches, tokens, 1, device, autocast)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss) / tokens)
        if step == 0:
            partial({**out, "first_step_s": times[0]})
        timed = times[timed_from:]
        if len(timed) >= 3 and (smoke or sum(timed) > 5.0):
            break
    wall = time.perf_counter() - t_timed
    prefetch.close()
    step_s = statistics.median(timed)
    res = {"steps_timed": len(timed), "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
           "tokens_per_s_mean": tokens * len(timed) / sum(timed), "first_step_s": times[0],
           "compile_s": max(0.0, times[0] - step_s), "loader_wait_share": prefetch.wait_seconds / wall,
           "loss_first": losses[0], "loss_last": losses[-1]}
    if cuda:
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["peak_mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    return res


def run_model_row(row: Row, smoke: bool, partial) -> dict:
    """measure(), halving the micro-batch once on CUDA out-of-memory."""
    import torch

    mb = 2 if smoke else row.micro_batch
    try:
        return measure(row, smoke, mb, partial)
    except torch.cuda.OutOfMemoryError as e:
        if mb < 2:
            raise
        first = f"out of memory at micro_batch {mb}: {str(e).splitlines()[0][:160]}"
    torch.cuda.empty_cache()
    out = measure(row, smoke, mb // 2, partial)
    out["retried"] = first
    return out


# --------------------------------------------------------------------- fla vs our chunked rule


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def delta_rule_grads(fn, inputs, do):
    """(output, grads of (q, k, v, g, beta)) of fn on fresh leaf copies of `inputs`."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = fn(*leaves)
    o.backward(do)
    return o.detach(), [x.grad for x in leaves]


def fla_vs_chunked(smoke: bool, partial) -> dict:
    import torch
    import torch.nn.functional as F

    from trainer.models import gated_deltanet as gdn

    cuda = torch.cuda.is_available() and not smoke
    dev = torch.device("cuda" if cuda else "cpu")
    B, T, H, D = (1, 96, 2, 16) if smoke else (2, 1024, 9, 112)  # Llama Think: 9 heads of 112, ctx 1024
    g0 = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g0, device=dev)

    q, k, v = (rnd(B, T, H, D).bfloat16() for _ in range(3))
    g = -torch.exp(rnd(H) * 0.5 + 0.5) * F.softplus(rnd(B, T, H))  # as the layer forms it: fp32, <= 0
    beta = torch.sigmoid(rnd(B, T, H)).bfloat16()
    do = rnd(B, T, H, D).bfloat16()
    scale = D ** -0.5

    def ours(q, k, v, g, beta, rule=gdn.chunk_gated_delta_rule):
        qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))
        o, _ = rule(gdn.l2_normalize(qh) * scale, gdn.l2_normalize(kh), vh, g.float().transpose(1, 2),
                    beta.float().transpose(1, 2))
        return o.transpose(1, 2)

    inputs = (q, k, v, g, beta)
    names = ("q", "k", "v", "g", "beta")

    def compare(a, b) -> dict:  # (output, gradients) of two implementations: max abs differences
        return {"out": max_diff(a[0], b[0]), **{f"grad_{n}": max_diff(x, y) for n, x, y in zip(names, a[1], b[1])}}

    ref = ref_o, ref_g = delta_rule_grads(lambda *a: ours(*a, rule=gdn.recurrent_gated_delta_rule), inputs, do.float())
    our = delta_rule_grads(ours, inputs, do.float())
    out = {"model": FLA_ROW, "shape": {"B": B, "T": T, "H": H, "D": D}, "inputs": "q, k, v, beta bf16; g fp32",
           "max_abs_out": float(ref_o.abs().max()),
           "chunked_vs_recurrent_fp32": compare(our, ref),
           "max_abs_grad": {n: float(b.abs().max()) for n, b in zip(names, ref_g)},
           "fla": gdn._fla_chunk is not None and cuda}
    partial(out)
    if not out["fla"]:
        out["note"] = "fla not importable or no CUDA: chunked vs token-by-token only"
        return out

    def fla(q, k, v, g, beta):
        return gdn._fla_chunk(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True)[0]

    theirs = delta_rule_grads(fla, inputs, do)
    out["fla_vs_chunked"] = compare(theirs, our)
    out["fla_vs_recurrent_fp32"] = compare(theirs, ref)
    out["layer_bf16_autocast"] = layer_fla_on_off(dev)
    return out


def layer_fla_on_off(dev) -> dict:
    """A Llama Think GatedDeltaNet layer, same weights and input, use_fla on vs off, under bf16 autocast."""
    import torch

    from trainer.models.gated_deltanet import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(576, 9, 112).to(dev)
    layer.init_weights()
    x = torch.randn(2, 1024, 576, device=dev)
    res = {}
    for use in (True, False):
        layer.use_fla = use
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().pow(2).mean().backward()
        res[use] = (y.detach(), {n: p.grad.detach().clone() for n, p in layer.named_parameters()})
    (y1, g1), (y0, g0) = res[True], res[False]
    return {"out": max_diff(y1, y0), "max_abs_out": float(y0.abs().max()),
            "grad_max_abs_diff": {n: max_diff(g1[n], g0[n]) for n in g0},
            "grad_max_abs": {n: float(g0[n].abs().max()) for n in g0}}


# ------------------------------------------------------------------------------ orchestration


def child_row(name: str, smoke: bool, partial) -> dict:
    if name == FLA_ROW:
        return fla_vs_chunked(smoke, partial)
    return run_model_row(next(r for r in ROWS if r.name == name), smoke, partial)


def child(name: str, smoke: bool, partial_path: str) -> dict:
    return child_row(name, smoke, lambda row: Path(partial_path).write_text(json.dumps(row)))


def run_capped(name: str, cap: float, smoke: bool) -> dict:
    """The row in a fresh process group, killed after `cap` seconds; partial figures survive."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
        partial_path = f.name
    cmd = [sys.executable, "-m", "bench.gpu", "--child", name, "--partial", partial_path] + (["--smoke"] if smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    try:
        stdout, _ = proc.communicate(timeout=cap)
        row = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
        error = None if row else f"exit status {proc.returncode} (see the log above)"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # compile workers too
        proc.communicate()
        row, error = None, f"timed out after {cap:.0f} s (its time cap)"
    if row is None:
        text = Path(partial_path).read_text() if Path(partial_path).exists() else ""
        row = {**(json.loads(text) if text else {"model": name}), "error": error}
    Path(partial_path).unlink(missing_ok=True)
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_inline(name: str, smoke: bool) -> dict:
    """The row in this process, no time cap (--inline: the quick smoke test)."""
    t0 = time.perf_counter()
    last: dict = {"model": name}

    def partial(row: dict) -> None:
        last.clear()
        last.update(row)

    try:
        row = child_row(name, smoke, partial)
    except Exception as e:  # noqa: BLE001 - one row's failure is that row's result
        row = {**last, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    row["wall_s"] = time.perf_counter() - t0
    return row


def meta(smoke: bool, budget: float) -> dict:
    import torch

    m = {"torch": torch.__version__, "cuda": torch.version.cuda, "smoke": smoke, "budget_s": budget,
         "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        m["device"] = torch.cuda.get_device_name(0)
    try:
        import fla

        m["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - recorded, the rows say what ran
        m["fla"] = f"not importable ({type(e).__name__}: {str(e)[:120]})"
    return m


def print_row(r: dict) -> None:
    if r["model"] == FLA_ROW:
        cmp = r.get("fla_vs_chunked") or r.get("chunked_vs_recurrent_fp32") or {}
        print(f"  {r['model']:<28} fla={r.get('fla')} max|dout| {cmp.get('out', float('nan')):.2e} "
              f"{r.get('error', '')}", flush=True)
        return
    if "tokens_per_s" not in r:
        print(f"  {r['model']:<28} {r.get('error') or r.get('skipped')}", flush=True)
        return
    mem = f"{r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else "-"
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "  n/a (unknown GPU peak)"
    print(f"  {r['model']:<28} {r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu}  mem {mem:>8}  "
          f"compile {r['compile_s']:5.1f}s  loader {100 * r['loader_share_sync']:.2f}% sync, "
          f"{100 * r['loader_wait_share']:.2f}% waited  fla={r['fla']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds")
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--out", help="default bench/results/gpu.json (gpu-smoke.json with --smoke)")
    ap.add_argument("--inline", action="store_true", help="rows in this process, without time caps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--partial", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.smoke, args.partial)), flush=True)
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: bench.gpu needs CUDA (use --smoke on CPU)", file=sys.stderr)
        return 2
    wanted = args.only.split(",") if args.only else [r.name for r in ROWS]
    unknown = sorted(set(wanted) - {r.name for r in ROWS})
    if unknown:
        print(f"error: --only: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "bench" / "results" / ("gpu-smoke.json" if args.smoke else "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta(args.smoke, args.budget), "rows": []}
    start = time.perf_counter()
    for row in (r for r in ROWS if r.name in wanted):
        left = args.budget - (time.perf_counter() - start)
        cap = row.cap_s * (4 if args.smoke else 1)  # CPU start-up is slower than the model
        if left < min(cap, 20):
            r = {"model": row.name, "skipped": f"time budget: {left:.0f} s left of {args.budget:.0f}"}
        elif args.inline:
            r = run_inline(row.name, args.smoke)
        else:
            r = run_capped(row.name, min(cap, left), args.smoke)
        result["rows"].append(r)
        result["meta"]["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1) + "\n")
        print_row(r)
    print(f"wrote {out} ({result['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
