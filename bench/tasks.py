"""Cost of scoring lm-eval tasks in the training loop: `trainer.evals.tasks` (the live model, no
export) against `trainer.tools.evaluate.evaluate` (export, lm-eval's HF backend) on the same
checkpoint and the same examples (goal: at least as fast), and the share of a run's time that task
scoring takes at each seed curriculum's default cadence.

    .venv/bin/python -m bench.tasks                  # ~2-4 min on 2 shared cores
    .venv/bin/python -m bench.tasks --quick          # fewer repetitions
    .venv/bin/python -m bench.tasks --examples 77 --batch-size 8 --reps 5

Model: Atom's exact architecture (curricula/atom.yaml's model section, 3.4M params, random init),
a 4,096-id byte-level BPE (`pipelines.train_tokenizer`) trained offline on Python's docs, saved with
the trainer's own checkpoint code. Task: `demo_pydoc` (`pipelines.demo.write_demo_task`), N
four-way multiple-choice examples (4N loglikelihood requests), local, zero-shot, CPU, fp32, one
torch thread (--threads).

Measured (wall and process CPU seconds; on a shared machine CPU time is the work, wall time also the
neighbours): in-loop `run_tasks(live_lm(...))` per round, its first call (task-index warm-up)
apart; the same `run_tasks` on lm-eval's `HFLM` over the export (scoring alone: the harness path is
identical, only the LM differs); the export and the HF load; and `evaluate(...)` end to end, as
`python -m trainer.evaluate` calls it (export + lm-eval's full task index + HF load + scoring). The
in-loop round is also split into task loading, request encoding, forwards and the rest (lm-eval).
Both sides must give the same acc/acc_norm (checked).

Extrapolated (labelled so in the table and the JSON): the share of a run's time at each seed
curriculum's cadence: (requests per scoring round x measured CPU seconds per in-loop request x the
model's forward FLOPs relative to Atom's) against the training time between rounds (tokens per step x
steps between rounds / training tokens/s: Atom's from bench/results/train.json, scaled by FLOPs per
token from its seq_len to the curriculum's, and cross-checked by a few plain-loop steps timed here).
The real tasks (arc_easy, arc_challenge, hellaswag, piqa) are not on this machine: their requests are
counted as documents x choices and assumed as long as demo_pydoc's. Only Atom's row is a CPU
figure for a CPU-sized model; the others need a GPU figure (bench.gpu), their CPU extrapolation is a
FLOPs ratio and says nothing about GPU efficiency at eval batch sizes.

Writes bench/results/tasks.json (machine info, os.getloadavg() at start and end) and prints a table.

Seen here (2 cores shared with other agents, load ~5, 1 thread, 40 examples = 160 requests of ~55
tokens, batch 8, medians of 5, CPU seconds): in-loop 1.21 s per round (32.9 examples/s; first call
2.17 s with the task index), HF backend scoring alone 1.30 s (30.9/s), export 1.39 s, HFLM load 0.89 s,
evaluate() end to end 8.8 s (4.6/s; mostly lm-eval's full task index), the CLI 14.0 s (2.9/s): in-loop
1.07x the HF scoring alone, 7.2x evaluate(). Forwards are ~88% of an in-loop round. Share of a run
(CPU extrapolation): Atom 0.04% (53 s per 7,000-request round every 2,000 steps vs ~37 h of training),
demo-atom 2.7% (measured task seconds, every 100 steps); Argonne/Axiom need a GPU figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and transformers' progress bars (read at tqdm's import)
import torch

ROOT = Path(__file__).resolve().parents[1]
CURRICULA = ["atom", "demo-atom", "argonne-3.0", "axiom-380m", "axiom-380m-sft", "llama-think-95m"]
# Choices per document of the seed curricula's lm-eval tasks (arc: 4 for nearly every question).
CHOICES = {"arc_easy": 4, "arc_challenge": 4, "hellaswag": 4, "piqa": 2, "demo_pydoc": 4}


class Clock:
    """Wall and process CPU seconds of a block (children's CPU too, for a subprocess)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        self.k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        k = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0 + (k.ru_utime + k.ru_stime) - (self.k0.ru_utime + self.k0.ru_stime)


def setup(root: Path, examples: int):
    """Tokenizer, Atom checkpoint (the trainer's own save_checkpoint), the demo_pydoc task folder."""
    from pydoc_data.topics import topics

    from pipelines.demo import write_demo_task
    from pipelines.train_tokenizer import train
    from shards.tokenizers import get_tokenizer
    from trainer.checkpoint import save_checkpoint
    from trainer.config import load_curriculum
    from trainer.models import build_model, model_section

    tok_path = train([topics[k] for k in sorted(topics)], root / "tokenizer")
    section = model_section(load_curriculum(ROOT / "curricula" / "atom.yaml")[0].model)
    torch.manual_seed(0)
    model = build_model(section).eval()
    run = root / "atom"
    save_checkpoint(run, 1, model, {}, {"model": section, "tokenizer": {"name": str(tok_path)}})
    tasks = write_demo_task(root / "tasks", n=examples)
    n = sum(1 for _ in (tasks / "demo_pydoc.jsonl").open())
    return get_tokenizer(str(tok_path)), model, run, tasks, n


def request_pairs(tok, tasks: Path) -> list:
    """(context ids, continuation ids) of every request, encoded as the live LM encodes them."""
    from trainer.evals.tasks import encode_request

    pairs = []
    for line in (tasks / "demo_pydoc.jsonl").open():
        d = json.loads(line)
        pairs += [encode_request(tok, d["query"], c) for c in d["choices"]]  # doc_to_text + " " target delimiter
    return pairs


def acc(res) -> tuple:
    return res.scores["demo_pydoc"]["acc"], res.scores["demo_pydoc"]["acc_norm"]


def time_rounds(a, tok, model, run, tasks: Path, n_docs: int) -> dict:
    from lm_eval.models.huggingface import HFLM

    from trainer.evals import tasks as T
    from trainer.tools.export import export

    inc = str(tasks)
    live = T.live_lm(model, tok, batch_size=a.batch_size)
    with Clock() as first:  # builds the include path's task index (cached per process after this)
        res_first = T.run_tasks(live, ["demo_pydoc"], inc)
    with Clock() as c_exp:
        export(run, a.tmp / "export")
    with Clock() as c_load:
        hflm = HFLM(pretrained=str(a.tmp / "export"), trust_remote_code=True, dtype="float32", device="cpu",
                    batch_size=a.batch_size)
    ours, theirs, seen = [], [], set()
    for r in range(a.reps):  # interleaved: both sides share the machine's noise; order alternates
        for side in (("live", "hf") if r % 2 == 0 else ("hf", "live")):
            with Clock() as c:
                res = T.run_tasks(live if side == "live" else hflm, ["demo_pydoc"], inc)
            (ours if side == "live" else theirs).append((c.wall, c.cpu))
            seen.add((side, acc(res)))
    if len({s[1] for s in seen} | {acc(res_first)}) != 1:
        raise AssertionError(f"live and HF backends disagree on demo_pydoc: {sorted(seen)}")

    # one in-loop round split: task loading, request encoding, forwards (the rest is lm-eval's own work)
    with Clock() as c_task:
        T._prepare(T._load(["demo_pydoc"], inc)["tasks"].values())
    with Clock() as c_enc:
        pairs = request_pairs(tok, tasks)
    with Clock() as c_fwd:
        T.score(live.live, pairs)
    toks = sum(len((c + k)[:-1]) for c, k in pairs)

    # trainer.tools.evaluate.evaluate end to end, in-process as `python -m trainer.evaluate` runs it
    # (lm-eval's full task index is built on every call); and the CLI once, process start included.
    from trainer.tools.evaluate import evaluate

    whole = []
    for i in range(a.whole_reps):
        with Clock() as c, contextlib.redirect_stderr(io.StringIO()):  # HFLM's progress bars ignore TQDM_DISABLE
            out = evaluate(run, ["demo_pydoc"], inc, None, a.batch_size, "cpu", a.tmp / f"lm_eval{i}.json")
        whole.append((c.wall, c.cpu))
        got = (out["results"]["demo_pydoc"]["acc,none"], out["results"]["demo_pydoc"]["acc_norm,none"])
        if got != acc(res_first):
            raise AssertionError(f"evaluate() disagrees with the live scores: {got} vs {acc(res_first)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with Clock() as c_cli:
        subprocess.run([sys.executable, "-m", "trainer.evaluate", str(run), "--tasks", "demo_pydoc", "--include-path",
                        inc, "--batch-size", str(a.batch_size), "--output", str(a.tmp / "cli.json")],
                       cwd=ROOT, env=env, check=True, capture_output=True)

    def stats(xs):
        w, c = [x[0] for x in xs], [x[1] for x in xs]
        return {"wall_s": [round(x, 4) for x in w], "cpu_s": [round(x, 4) for x in c],
                "median_wall_s": statistics.median(w), "median_cpu_s": statistics.median(c),
                "best_wall_s": min(w), "best_cpu_s": min(c)}

    return {
        "examples": n_docs, "requests": len(pairs), "tokens_forwarded": toks, "tokens_per_request": toks / len(pairs),
        "acc": acc(res_first)[0], "acc_norm": acc(res_first)[1],
        "in_loop_first_call": {"wall_s": first.wall, "cpu_s": first.cpu,
                               "note": "includes the include path's task index (once per process)"},
        "in_loop": stats(ours),
        "in_loop_split_cpu_s": {"task_load": c_task.cpu, "encode_requests": c_enc.cpu, "forwards": c_fwd.cpu},
        "hf_scoring_only": stats(theirs),
        "hf_export": {"wall_s": c_exp.wall, "cpu_s": c_exp.cpu},
        "hf_load": {"wall_s": c_load.wall, "cpu_s": c_load.cpu},
        "evaluate_whole": stats(whole),
        "cli_whole": {"wall_s": c_cli.wall, "cpu_s": c_cli.cpu, "note": "python -m trainer.evaluate, process start "
                      f"and imports included, OMP_NUM_THREADS={a.threads}"},
    }


def train_tokens_per_s(model, a) -> dict:
    """Atom's training tokens/s: bench/results/train.json (its seq_len) and a few plain-loop steps here
    at Atom's own seq_len (fwd, CE, bwd, clip, AdamW; fp32)."""
    out = {}
    tj = ROOT / "bench" / "results" / "train.json"
    if tj.exists():
        t = json.loads(tj.read_text())
        out["train_json"] = {"tokens_per_s": t["ours_tokens_per_s"], "seq_len": t["seq_len"],
                             "micro_batch": t["micro_batch"], "threads": t.get("threads"),
                             "load_avg_1m": t.get("load_avg_1m")}
    seq, mb = model.config.max_seq_len, 4
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(a.train_steps + 1):
        x = torch.randint(1, 4096, (mb, seq + 1), generator=g)
        with Clock() as c:
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append((c.wall, c.cpu))
    model.eval()
    times = times[1:]
    out["here"] = {"seq_len": seq, "micro_batch": mb, "steps": len(times),
                   "tokens_per_s_wall": seq * mb / statistics.median(t[0] for t in times),
                   "tokens_per_s_cpu": seq * mb / statistics.median(t[1] for t in times)}
    return out


def cadence(atom_model, sec_per_request: float, req_tokens: float, train: dict) -> list[dict]:
    """Per seed curriculum: task seconds per scoring round vs training seconds between rounds (CPU,
    extrapolated from Atom's measured figures by FLOPs)."""
    from trainer.config import load_curriculum
    from trainer.models import build_model

    t_req = max(1, round(req_tokens))
    atom_fwd = atom_model.flops_per_token(t_req)
    if "train_json" in train:
        base_tps, base_seq = train["train_json"]["tokens_per_s"], train["train_json"]["seq_len"]
        base_src = "bench/results/train.json"
    else:
        base_tps, base_seq = train["here"]["tokens_per_s_cpu"], train["here"]["seq_len"]
        base_src = "measured here"
    atom_train = atom_model.flops_per_token(base_seq)
    rows = []
    for name in CURRICULA:
        stages = load_curriculum(ROOT / "curricula" / f"{name}.yaml")
        cfg = stages[0]
        ev = cfg.eval
        row = {"curriculum": name, "stage": 1 if len(stages) > 1 else None, "tasks": list(ev.tasks)}
        if not ev.tasks:
            row["note"] = "no eval.tasks: no in-loop task scoring"
            rows.append(row)
            continue
        model = build_model(cfg.model, device="meta")
        every = ev.tasks_every if ev.tasks_every is not None else ev.every
        total = cfg.resolved.total_steps
        docs = {t: (int(ev.limit) if ev.limit is not None and ev.limit >= 1 else None) for t in ev.tasks}
        if name == "demo-atom":
            docs = {"demo_pydoc": 40}  # write_demo_task's default; limit None: all of them
        if any(v is None for v in docs.values()):
            row["note"] = "eval.limit is not a count: documents per round unknown here"
            rows.append(row)
            continue
        requests = sum(n * CHOICES.get(t, 4) for t, n in docs.items())
        ratio = model.flops_per_token(t_req) / atom_fwd
        round_s = requests * sec_per_request * ratio
        seq = cfg.batch.seq_len
        tps = base_tps * atom_train / model.flops_per_token(seq)  # same FLOP rate as Atom's measured training
        between_s = cfg.resolved.tokens_per_step * every / tps
        rounds = total // every + (total % every != 0) if every else 1  # the final eval always scores them
        train_s = cfg.resolved.tokens_per_step * total / tps
        row.update({
            "params": model.num_params(), "tasks_every_steps": every, "total_steps": total, "rounds_per_run": rounds,
            "docs_per_round": sum(docs.values()), "requests_per_round": requests, "fwd_flops_ratio_vs_atom": ratio,
            "task_s_per_round": round_s, "train_tokens_per_s": tps, "train_s_between_rounds": between_s,
            "share_of_run": rounds * round_s / (rounds * round_s + train_s),
            "basis": (f"task s measured on CPU (this bench's task, Atom); training: {base_src} scaled to seq {seq}"
                      if name == "demo-atom" else
                      f"CPU, extrapolated: measured s/request x requests; training: {base_src} scaled to seq {seq}"
                      if name == "atom" else
                      "CPU, extrapolated by FLOPs from Atom: needs a GPU figure (bench.gpu)"),
        })
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=40, help="demo_pydoc documents (at most 77 exist)")
    ap.add_argument("--batch-size", type=int, default=8, help="requests per forward, both sides (loop default 8)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--whole-reps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tasks.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.whole_reps, a.train_steps = 2, 1, 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "metric acc is defined, but aggregation is not"
    torch.set_num_threads(a.threads)
    load_start, t_start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = Path(tmp)
        tok, model, run, tasks, n_docs = setup(a.tmp, a.examples)
        m = time_rounds(a, tok, model, run, tasks, n_docs)
        train = train_tokens_per_s(model, a)
    n = m["examples"]
    sec_per_request = m["in_loop"]["median_cpu_s"] / m["requests"]
    rows = cadence(model, sec_per_request, m["tokens_per_request"], train)
    load_end = os.getloadavg()

    def eps(s):
        return n / s

    il, hs, ew = m["in_loop"], m["hf_scoring_only"], m["evaluate_whole"]
    table = [
        ("in-loop run_tasks(live_lm) per round", il["median_wall_s"], il["median_cpu_s"]),
        ("  first call (+ task-index warm-up)", m["in_loop_first_call"]["wall_s"], m["in_loop_first_call"]["cpu_s"]),
        ("HF backend, scoring only (run_tasks(HFLM))", hs["median_wall_s"], hs["median_cpu_s"]),
        ("  export", m["hf_export"]["wall_s"], m["hf_export"]["cpu_s"]),
        ("  HFLM load", m["hf_load"]["wall_s"], m["hf_load"]["cpu_s"]),
        ("evaluate() end to end (export+index+load+score)", ew["median_wall_s"], ew["median_cpu_s"]),
        ("python -m trainer.evaluate (process incl.)", m["cli_whole"]["wall_s"], m["cli_whole"]["cpu_s"]),
    ]
    print(f"\ndemo_pydoc: {n} examples, {m['requests']} requests, {m['tokens_per_request']:.1f} tokens/request, "
          f"batch {a.batch_size}, {a.threads} thread(s), Atom 3.4M fp32 CPU; medians of {a.reps} (evaluate: "
          f"{a.whole_reps})")
    print(f"{'':50s} {'wall s':>8s} {'cpu s':>8s} {'ex/s wall':>10s} {'ex/s cpu':>9s}")
    for label, w, c in table:
        print(f"{label:50s} {w:8.2f} {c:8.2f} {eps(w):10.1f} {eps(c):9.1f}")
    sp = m["in_loop_split_cpu_s"]
    print(f"in-loop round split (cpu s): task load {sp['task_load']:.2f}, encode {sp['encode_requests']:.2f}, "
          f"forwards {sp['forwards']:.2f}, lm-eval rest {max(0.0, il['median_cpu_s'] - sum(sp.values())):.2f}")
    speed = {"vs_hf_scoring_only_cpu": hs["median_cpu_s"] / il["median_cpu_s"],
             "vs_evaluate_whole_cpu": ew["median_cpu_s"] / il["median_cpu_s"],
             "vs_hf_scoring_only_wall": hs["median_wall_s"] / il["median_wall_s"],
             "vs_evaluate_whole_wall": ew["median_wall_s"] / il["median_wall_s"]}
    print(f"in-loop speed-up (cpu time): {speed['vs_hf_scoring_only_cpu']:.2f}x vs HF scoring alone, "
          f"{speed['vs_evaluate_whole_cpu']:.1f}x vs evaluate() whole (goal >= 1x, no export)")
    tr = train.get("train_json", {})
    print(f"\nAtom training tokens/s: train.json {tr.get('tokens_per_s', float('nan')):,.0f} (seq {tr.get('seq_len')}); "
          f"here {train['here']['tokens_per_s_cpu']:,.0f} cpu / {train['here']['tokens_per_s_wall']:,.0f} wall "
          f"(seq {train['here']['seq_len']}, micro-batch {train['here']['micro_batch']})")
    print(f"{'curriculum':16s} {'every':>6s} {'req/round':>9s} {'task s/round':>12s} {'train s between':>16s} "
          f"{'share':>8s}  basis")
    for r in rows:
        if "share_of_run" not in r:
            print(f"{r['curriculum']:16s} {'-':>6s} {'-':>9s} {'-':>12s} {'-':>16s} {'-':>8s}  {r['note']}")
            continue
        print(f"{r['curriculum']:16s} {r['tasks_every_steps']:6d} {r['requests_per_round']:9d} {r['task_s_per_round']:12.1f} "
              f"{r['train_s_between_rounds']:16,.0f} {100 * r['share_of_run']:7.3f}%  {r['basis']}")
    print(f"load avg (1m) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end, on {os.cpu_count()} cpus "
          "(shared: wall times are noisy; CPU times are the work)")
    import lm_eval
    import transformers

    res = {
        "bench": "tasks", "device": "cpu", "threads": a.threads, "batch_size": a.batch_size, "reps": a.reps,
        "whole_reps": a.whole_reps, "model": "atom (curricula/atom.yaml model, 3,412,800 params, random init, fp32)",
        "task": "demo_pydoc (pipelines.demo.write_demo_task), 4 choices, zero-shot",
        "measured": m, "examples_per_s": {
            "in_loop_wall": eps(il["median_wall_s"]), "in_loop_cpu": eps(il["median_cpu_s"]),
            "hf_scoring_only_wall": eps(hs["median_wall_s"]), "hf_scoring_only_cpu": eps(hs["median_cpu_s"]),
            "evaluate_whole_wall": eps(ew["median_wall_s"]), "evaluate_whole_cpu": eps(ew["median_cpu_s"]),
            "cli_whole_wall": eps(m["cli_whole"]["wall_s"]), "cli_whole_cpu": eps(m["cli_whole"]["cpu_s"])},
        "in_loop_speedup": speed, "meets_goal": speed["vs_evaluate_whole_cpu"] >= 1.0,
        "train_tokens_per_s": train, "seconds_per_request_cpu": sec_per_request,
        "cadence_extrapolated": rows,
        "cadence_assumptions": "requests = docs x choices (arc 4, hellaswag 4, piqa 2), each as long as a demo_pydoc "
                               "request; task seconds scale with forward FLOPs per token vs Atom, training tokens/s "
                               "with training FLOPs per token vs Atom at train.json's seq_len; val evals, "
                               "checkpoints and task-dataset loading not counted; CPU only (GPU figures needed)",
        "load_avg_start": list(load_start), "load_avg_end": list(load_end), "cpus": os.cpu_count(),
        "wall_s_total": time.perf_counter() - t_start, "torch": torch.__version__,
        "transformers": transformers.__version__, "lm_eval": lm_eval.__version__, "machine": platform.machine(),
        "python": platform.python_version(),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
