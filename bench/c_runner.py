"""Decode tokens/s of the C runner (c/run.c) at Llama Think's full size, beside trainer.tools.generate.

    .venv/bin/python -m bench.c_runner            # ~1-2 min on 2 cores
    .venv/bin/python -m bench.c_runner --new 32 --reps 1

Llama Think (95,715,408 params, random weights: build_model({"arch": "hybrid"})) is exported once as
fp32 to a temporary model.bin; the runner is built by `make c` (c/run: -O3 -march=native,
OpenMP). Both generate greedily from the same 16-token prompt, on 1 and 2 threads (-j / torch threads).
Decode tokens/s = (new - 1) / (time of the last new token - time of the first), so the prompt pass is
left out of both; tokens per CPU-second divide by the process's CPU time over the same span instead,
which a busy neighbour disturbs less (on 1 thread it is the work alone). Each figure is the median of --reps runs, interleaved C / PyTorch so background load
hits both alike. Writes bench/results/c_runner.json and prints a table.

Both run with OMP_WAIT_POLICY=PASSIVE (set here before torch loads libgomp): on a shared 2-core machine
a spinning OpenMP barrier waits a whole time slice for a descheduled thread, which took the 2-thread
C runner from 24 to 2.6 tok/s (and PyTorch's likewise) while a neighbour held one core. The load
average before and after is recorded; a 2-thread figure under load measures one core and a share.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its libgomp) is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

from trainer.tools.export_c import export_c
from trainer.tools.generate import GenerationConfig, generate
from trainer.models import build_model

REPO = Path(__file__).resolve().parents[1]
def compile_runner() -> tuple[Path, str]:
    """c/run built by `make c` (the README's build: its flags, OpenMP when the compiler has it), and
    the compiler's version line."""
    cc = shutil.which("cc")
    if cc is None:
        raise SystemExit("bench.c_runner: no C compiler (`cc`) on PATH")
    subprocess.run(["make", "-s", "-C", str(REPO), "c"], check=True)
    return REPO / "c" / "run", subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def c_decode(exe: Path, model: Path, prompt: list[int], new: int, threads: int) -> tuple[float, float, list[int]]:
    r = subprocess.run([str(exe), str(model), "-t", ",".join(map(str, prompt)), "-n", str(new), "-T", "0",
                        "-m", "ids", "-E", "-j", str(threads)], capture_output=True, text=True, check=True)
    m = re.search(r"decode ([0-9.]+) tok/s, ([0-9.]+) tok per CPU-s", r.stderr)
    return float(m.group(1)), float(m.group(2)), [int(t) for t in r.stdout.split()]


def torch_decode(model, prompt: list[int], new: int, threads: int) -> tuple[float, float, list[int]]:
    torch.set_num_threads(threads)
    stamps = []
    out = generate(model, prompt, GenerationConfig(greedy=True, max_new_tokens=new),
                   on_token=lambda _t: stamps.append((time.perf_counter(), time.process_time())))
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    return (len(stamps) - 1) / (w1 - w0), (len(stamps) - 1) / (c1 - c0), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.c_runner", description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "c_runner.json"))
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = build_model({"arch": "hybrid"}).eval()
    prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    rows, same = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        exe, cc = compile_runner()
        t0 = time.perf_counter()
        export_c(model, {"model": {"arch": "hybrid"}}, None, path)
        export_s = time.perf_counter() - t0
        size = path.stat().st_size
        for threads in (1, 2):
            runs = {"c": [], "pytorch": []}
            for _ in range(args.reps):
                *c_rates, c_ids = c_decode(exe, path, prompt, args.new, threads)
                runs["c"].append(c_rates)
                *t_rates, t_ids = torch_decode(model, prompt, args.new, threads)
                runs["pytorch"].append(t_rates)
            same[threads] = c_ids == t_ids
            for runner, rates in runs.items():
                rows.append({"runner": runner, "threads": threads,
                             "decode_tok_s": round(statistics.median(r[0] for r in rates), 2),
                             "decode_tok_per_cpu_s": round(statistics.median(r[1] for r in rates), 2),
                             "runs_tok_s": [round(r[0], 2) for r in rates]})
    meta = {"model": "llama-think-95m (random weights)", "params": model.num_params(), "file_bytes": size,
            "dtype": "fp32", "export_s": round(export_s, 2), "prompt_tokens": len(prompt), "new_tokens": args.new,
            "reps": args.reps, "greedy_ids_equal": same, "cc": cc, "build": "make c",
            "torch": torch.__version__, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)], "platform": platform.platform(), "processor": _cpu_name()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"{'runner':<8} {'threads':>7} {'decode tok/s':>13} {'tok/CPU-s':>10}   runs (tok/s)")
    for r in rows:
        print(f"{r['runner']:<8} {r['threads']:>7} {r['decode_tok_s']:>13.2f} {r['decode_tok_per_cpu_s']:>10.2f}"
              f"   {r['runs_tok_s']}")
    print(f"greedy ids equal (C vs PyTorch): {same}; wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
