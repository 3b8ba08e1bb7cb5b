"""The command line every corpus module shares: download, filter, dedup, split, tokenize, run.

A corpus is a `Corpus` (hub repo, subset, column names, filter chain, score columns);
`pipelines/fineweb.py` is three lines over `main`. `--subset` picks another hub folder of the same
corpus; `--min-score` / `--min-int-score` threshold the corpus's own score columns in every stage that
reads rows, counted like the filters. Stages are datatrove pipelines run by datatrove's own executors
(local / slurm / ray); completion markers in the logging dir make a rerun skip finished tasks, and a rerun of an
unfinished task rewrites its shards from scratch (`TokenizeShards` removes its stale files first),
so an interrupted run, rerun, equals an uninterrupted one. Keep `--tasks` fixed between reruns:
the logging dir records the settings and refuses a rerun with different ones.

`--decontaminate TASK[,TASK]` (filter, split, tokenize, run; `pipelines.decont`) loads and indexes the
lm-eval tasks here, before any executor, and drops documents sharing an n-gram with them.

Output layout (`--output DIR`):
  download  DIR/<subset>/*.parquet                  (a local mirror)
  filter    DIR/kept/*.jsonl.gz, DIR/removed/<filter>/*.jsonl.gz, DIR/kept/shardloom-applied.yaml
  dedup     DIR/kept/, DIR/removed/minhash/, DIR/minhash/ (signatures, buckets, ids)
  split     DIR/train/*.jsonl.gz, DIR/val/*.jsonl.gz
  tokenize  DIR/train/NNNNN.ds*, DIR/val/NNNNN.ds*, DIR/manifest.json (written last)
  run       DIR/filtered/ (filter), DIR/dedup/ (with --dedup), DIR/shards/ (tokenize)
  --decontaminate  DIR/removed/decontaminate/ (the dropped documents)
Logs and completion markers: DIR/logs/<stage>/ unless --logging-dir; the task index in DIR/logs/decont/.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path

from shards.manifest import find_shards

from .readers import InputError, input_files, make_reader
from .spec import Corpus  # noqa: F401 - the corpus modules take it from here, beside main
from .spec import SCORE_FLAGS, Job, ReadSpec, is_remote, job_from_args, sub
from .steps import SPLIT_KEYS, HashSplit, TokenizeShards, WriteManifest

STAGES = ("download", "filter", "dedup", "split", "tokenize", "run")


# ------------------------------------------------------------------------------------------ parser


def build_parser(corpus: Corpus, stages: tuple[str, ...] = STAGES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m pipelines.{corpus.name.replace('-', '_')}",
        description=f"{corpus.description or corpus.name}: raw text -> filtered JSONL -> token shards "
                    f"(datatrove). Default input: {corpus.hub_input}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("stage", choices=stages, help=" | ".join(stages) + (" (run: every stage)" if "run" in stages else ""))
    io = p.add_argument_group("input/output")
    io.add_argument("--input", help="local parquet/jsonl/jsonl.gz/jsonl.zst file or folder, or s3:// URI "
                                    f"(default: {corpus.hub_input})")
    io.add_argument("--output", default=f"out/{corpus.name}", help="output folder or s3:// URI")
    io.add_argument("--subset", help=f"hub folder read when --input is not given, and mirrored by download, e.g. "
                                     f"data/CC-MAIN-2025-21 (default: {corpus.hub_subset})")
    io.add_argument("--limit", type=int, default=-1, help="documents to read per task (datatrove semantics); -1 all")
    io.add_argument("--text-key", default=corpus.text_key)
    io.add_argument("--id-key", default=corpus.id_key)
    io.add_argument("--endpoint-url", help="S3-compatible endpoint (Cloudflare R2: https://<account>.r2.cloudflarestorage.com)")
    io.add_argument("--profile", help="AWS profile for s3:// input/output (credentials come from the usual chain)")
    io.add_argument("--region", help="S3 region name (default: the usual chain; 'auto' for an R2 --endpoint-url)")
    io.add_argument("--staging-dir", help="local folder for shards bound for an s3:// --output (default: under the logs)")
    tk = p.add_argument_group("tokenize")
    tk.add_argument("--tokenizer", default="qwen3", help="qwen3 | cl100k | llama2 | path to tokenizer.json / .model")
    tk.add_argument("--tokenizer-path", help="file for a named tokenizer (llama2's tokenizer.model), or a tokenizer.json")
    tk.add_argument("--val-fraction", type=float, default=0.001)
    tk.add_argument("--split-seed", type=int, default=1337)
    tk.add_argument("--split-key", choices=SPLIT_KEYS, default="text",
                    help="text: the normalised text (NFC, whitespace collapsed), so a page carried by several "
                         "corpora is in the same split in each; id: the source id, or the raw text when the row "
                         "has none (the rule before text keys; auto is its old name)")
    tk.add_argument("--max-doc-tokens", type=int, default=1_000_000, help="longer documents are skipped (or cut)")
    tk.add_argument("--too-long", choices=("skip", "truncate"), default="skip")
    tk.add_argument("--invalid-utf8", choices=("skip", "replace"), default="skip")
    tk.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer call")
    tk.add_argument("--filter", action="store_true", help="tokenize/split: apply the filter chain inline first")
    fl = p.add_argument_group("filter / dedup")
    fl.add_argument("--language-threshold", type=float, default=0.65)
    fl.add_argument("--languages", default="en", help="comma list of fastText labels (en, fr, ...); 'any' keeps all")
    for flag, column in SCORE_FLAGS.items():
        fl.add_argument(f"--{flag.replace('_', '-')}", type=float, default=None, metavar="X",
                        help=f"keep rows whose {column} >= X (counted; every stage that reads rows)"
                             + (f"; {corpus.name}'s score columns: {', '.join(corpus.scores)}" if corpus.scores else ""))
    fl.add_argument("--dedup", action="store_true", help="run: add MinHash dedup between filter and tokenize")
    add_decont_args(p)
    fl.add_argument("--max-files", type=int, default=None, help="download: mirror only the first N parquet files")
    ex = p.add_argument_group("execution (datatrove executors)")
    ex.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    ex.add_argument("--tasks", type=int, default=1, help="keep fixed between reruns")
    ex.add_argument("--workers", type=int, default=-1, help="tasks at once (local/ray); -1: min(tasks, cores)")
    ex.add_argument("--threads", type=int, default=0,
                    help="tokenizer threads per task; 0: cores // workers")
    ex.add_argument("--logging-dir", help="logs, stats and completion markers (default: OUTPUT/logs)")
    ex.add_argument("--slurm-partition", help="slurm: partition (required for --executor slurm)")
    ex.add_argument("--slurm-time", default="24:00:00", help="slurm: time limit per job")
    ex.add_argument("--slurm-venv", metavar="DIR", help="slurm: virtualenv folder each job activates (e.g. .venv)")
    ex.add_argument("--executor-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra keyword for the executor's constructor, repeatable (e.g. cpus_per_task=4, "
                         "mem_per_cpu_gb=4, qos=high, sbatch_args={account: x}); VALUE parsed as YAML")
    return p


def add_decont_args(p: argparse.ArgumentParser) -> None:
    dc = p.add_argument_group("decontamination (filter, split, tokenize, run)")
    dc.add_argument("--decontaminate", metavar="TASK[,TASK]",
                    help="drop documents sharing an n-gram with these lm-eval tasks' examples (question + each "
                         "answer); counted per task, written to OUT/removed/decontaminate/, recorded in the manifest")
    dc.add_argument("--include-path", metavar="DIR",
                    help="folder of local lm-eval task YAMLs (as trainer.tools.evaluate)")
    dc.add_argument("--decont-ngram", type=int, default=None, metavar="N",
                    help="n-gram length in words (lowercased, punctuation stripped); default 13")


# ----------------------------------------------------------------------------------------- helpers


def check_run_settings(logging_dir: str, settings: dict, reader=None) -> list | None:
    """Completion markers are only meaningful for the same settings and the same input files (names
    and sizes, listed from `reader`): refuse a changed rerun. Returns that listing (None if not made),
    for the executor's idle-task warning to reuse."""
    if is_remote(logging_dir):
        return None
    if reader is not None:
        settings = {**settings, "input_files": input_files(reader)}
    p = Path(logging_dir) / "shardloom_settings.json"
    text = json.dumps(settings, sort_keys=True, indent=1)
    if p.exists() and p.read_text() != text:
        old = json.loads(p.read_text())
        old.setdefault("input_files", settings.get("input_files"))  # recorded since; absent: not compared
        diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k) and k != "input_files"}
        files = files_change(old.get("input_files"), settings.get("input_files"))
        if diff or files:
            what = "; ".join([f"other settings {diff} (old, new)"] * bool(diff) + [f"other input files: {files} "
                             "(each task's files go by position, so finished tasks would not read new ones)"] * bool(files))
            raise InputError(f"{logging_dir} holds completion markers from a run with {what}; rerun with the same "
                             "settings and input, or use a fresh --logging-dir / delete that folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return settings.get("input_files")


def files_change(old, new) -> str:
    """'1 added (c.jsonl); 1 changed size (a.jsonl)' between two `input_files` records, or ''."""
    o, n = dict(map(tuple, old or [])), dict(map(tuple, new or []))
    kinds = (("added", sorted(set(n) - set(o))), ("removed", sorted(set(o) - set(n))),
             ("changed size", sorted(k for k in set(o) & set(n) if o[k] != n[k])))
    return "; ".join(f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for kind, names in kinds if names)


def make_executor(job: Job, pipeline, logging_dir: str, tasks: int | None = None, depends=None,
                  skip_completed: bool = True, job_name: str = "shardloom", input_files: list | None = None):
    """The executor for `pipeline`; `input_files`: its reader's listing if already made."""
    ex = job.execution
    tasks = ex.tasks if tasks is None else tasks
    from .cluster import warn_idle_tasks

    warn_idle_tasks(pipeline, tasks, job_name, None if input_files is None else len(input_files))
    if ex.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(ex.local_workers(tasks), tasks),
                                     logging_dir=logging_dir, depends=depends, skip_completed=skip_completed,
                                     **ex.extra)
    if ex.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        kw = dict(partition=ex.slurm_partition, time=ex.slurm_time, job_name=job_name) | ex.extra
        if ex.workers > 0:
            kw.setdefault("workers", ex.workers)
        if ex.slurm_venv:
            kw["venv_path"] = ex.slurm_venv
        # each job waits (afterok) for the one submitted before it: `run` submits its stages as a chain
        job.chain.last = SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=logging_dir,
                                               depends=depends or job.chain.last, skip_completed=skip_completed, **kw)
        return job.chain.last
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=ex.workers, logging_dir=logging_dir,
                               depends=depends, skip_completed=skip_completed, **ex.extra)


def read_stats(logging_dir: str) -> list[tuple[str, dict]]:
    """Merge per-task stats files (those of skipped, already-finished tasks included): one
    (step name, {label: total}) per pipeline step."""
    merged: list[tuple[str, dict]] = []
    files = sorted(Path(logging_dir, "stats").glob("*.json")) if not is_remote(logging_dir) else []
    for f in files:
        for i, step in enumerate(json.loads(f.read_text())):
            totals = {k: (v["total"] if isinstance(v, dict) else v) for k, v in step.get("stats", {}).items()}
            if i >= len(merged):
                merged.append((step["name"], {}))
            for k, v in totals.items():
                merged[i][1][k] = merged[i][1].get(k, 0) + v
    return merged


def print_stats(title: str, logging_dir: str, out=None) -> list[tuple[str, dict]]:
    """A small table: kept/dropped per filter, counted skips per reader/writer."""
    out = out or sys.stdout
    stats = read_stats(logging_dir)
    if not stats:
        return stats
    print(f"\n{title}", file=out)
    print(f"  {'step':<44} {'in':>10} {'kept':>10} {'dropped':>10}  notes", file=out)
    for name, s in stats:
        if "forwarded" in s or "dropped" in s or "FILTER" in name:  # a datatrove filter (writers count "total" too)
            notes = ", ".join(f"{k[8:]}={v:,}" for k, v in sorted(s.items()) if k.startswith("dropped_"))
            notes += f"{', ' if notes else ''}no_url={s['no_url']:,} (passed)" if s.get("no_url") else ""
            print(f"  {name[:44]:<44} {s.get('total', 0):>10,} {s.get('forwarded', 0):>10,} "
                  f"{s.get('dropped', 0):>10,}  {notes}", file=out)
        else:
            notes = ", ".join(f"{k}={v:,}" for k, v in sorted(s.items()) if k not in ("doc_len", "documents", "total"))
            n = s.get("documents") or sum(v for k, v in s.items() if k.endswith("_documents")) \
                or s.get("train", 0) + s.get("val", 0) or s.get("total", 0)
            print(f"  {name[:44]:<44} {n:>10,} {'':>10} {'':>10}  {notes}", file=out)
    return stats


# ------------------------------------------------------------------------------------------ stages


def open_reader(job: Job, read: ReadSpec):
    """The counted reader over `read.path`, checked (exists, readable, has the text column) before any
    executor starts; a folder a queued Slurm job will write is read as that job writes it."""
    if read.path in job.chain.queued:
        from .cluster import queued_reader

        return queued_reader(read, job.storage.options())
    reader = make_reader(read.path, limit=read.limit, text_key=read.text_key, id_key=read.id_key,
                         invalid_utf8=read.invalid_utf8, storage_options=job.storage.options())
    check_text_column(reader, read.text_key)
    return reader


def our_output(read: ReadSpec, path: str) -> ReadSpec:
    """Reading what an earlier stage of `run` wrote: datatrove's JsonlWriter keeps the text under `text`
    and the id under `id` whatever the source columns were, and the --limit was applied on the raw input."""
    return replace(read, path=path, limit=-1, text_key="text", id_key="id")


def check_text_column(reader, text_key: str) -> None:
    """A local parquet input whose first file lacks the text column is a wrong --text-key (most
    corpora call it `text`, Ultra-FineWeb and UltraData-Math `content`): one line, before any executor,
    instead of every row counted as skipped_no_text."""
    from fsspec.implementations.local import LocalFileSystem

    from .readers import CountingParquetReader

    if not isinstance(reader, CountingParquetReader) or not isinstance(reader.data_folder.fs, LocalFileSystem):
        return
    import pyarrow.parquet as pq

    files = reader.data_folder.list_files(glob_pattern=reader.glob_pattern)
    if files:
        first = reader.data_folder.resolve_paths(files[0])
        names = pq.read_schema(first).names
        if text_key not in names:
            raise InputError(f"input {first}: no '{text_key}' column (columns: {', '.join(names[:12])}); "
                             "pass --text-key COLUMN")


def stage_download(job: Job) -> str:
    from huggingface_hub import snapshot_download

    corpus, dest = job.corpus, job.output
    pattern = f"{corpus.hub_subset}/*.parquet"
    allow = pattern
    try:
        if job.max_files:
            from huggingface_hub import HfApi

            files = sorted(f for f in HfApi().list_repo_files(corpus.hub_repo, repo_type="dataset")
                           if f.startswith(corpus.hub_subset + "/") and f.endswith(".parquet"))
            allow = files[: job.max_files]
        print(f"mirroring {corpus.hub_repo}/{pattern} -> {dest}")
        snapshot_download(corpus.hub_repo, repo_type="dataset", allow_patterns=allow, local_dir=dest)
    except Exception as e:  # offline, DNS, auth, a typo in the repo: one line, not a hub traceback
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise InputError(f"download {corpus.hub_repo}/{pattern}: cannot fetch from the Hugging Face hub "
                         f"({type(e).__name__}: {reason})") from None
    return sub(dest, corpus.hub_subset)


def decont_steps(job: Job, output: str) -> list:
    """The Decontaminate step for --decontaminate (its exclusions under OUTPUT/removed/), or none."""
    from . import decont

    return [decont.step(job.decont, output, job.storage.options() or None)] if job.decont else []


def decont_pass(job: Job, stats_dir: str) -> list[dict]:
    """This stage's decontamination pass as the manifest records it (dropped counts are read from
    `stats_dir` when the manifest is written), or none."""
    if not job.decont:
        return []
    from shards.ngrams import read_info

    from . import decont

    return [{**decont.record(read_info(job.decont.folder)), "stats_dir": stats_dir}]


def decont_settings(job: Job) -> dict:
    """What a rerun must share for its completion markers to hold: the tasks, n and the index itself."""
    if not job.decont:
        return {}
    from shards.ngrams import read_info

    return {"decontaminate": {"tasks": list(job.decont.tasks), "n": job.decont.n,
                              "index_sha256": read_info(job.decont.folder)["sha256"]}}


def stage_filter(job: Job, reader, output: str, logs: str) -> str:
    from datatrove.pipeline.writers import JsonlWriter

    from . import decont
    from .applied import read_applied, write_applied
    from .filters import folder

    names = job.filters.names() + ([decont.filter_name(job.decont)] if job.decont else [])
    files = check_run_settings(logs, reader=reader, settings=dict(
        stage="filter", input=job.read.path, tasks=job.execution.tasks, limit=job.read.limit,
        filters=names, **decont_settings(job)))
    kept = folder(output, job.storage.options() or None, "kept")
    pipeline = [reader, *job.filters.steps(output, job.storage), *decont_steps(job, output),
                JsonlWriter(kept, output_filename="${rank}.jsonl.gz")]
    make_executor(job, pipeline, logs, job_name=f"{job.corpus.name}-filter", input_files=files).run()
    if job.execution.executor != "slurm":  # it has run (slurm only queued it): record what it applied
        upstream = read_applied(job.read.path)
        write_applied(sub(output, "kept"), upstream["filters"] + names,
                      upstream["decontamination"] + decont_pass(job, logs))
    if job.execution.executor == "local":
        print_stats(f"filter: {job.read.path} -> {output}", logs)
    return sub(output, "kept")


def stage_dedup(job: Job, reader, output: str, logs: str) -> str:
    import copy

    from .applied import read_applied, write_applied
    from .filters import MINHASH_NAME, minhash_stages

    files = check_run_settings(logs, reader=reader, settings=dict(stage="dedup", input=job.read.path,
                                                                  tasks=job.execution.tasks, limit=job.read.limit))
    # stages 1 and 4 read the same input; a copy, so the input is checked once
    stages = minhash_stages(lambda: copy.deepcopy(reader), sub(output, "minhash"), output, job.storage.options() or None)
    prev = None
    for name, pipeline, tasks in stages:
        reads_input = isinstance(pipeline[0], type(reader))  # stages 1 and 4 (copies of `reader`)
        prev = make_executor(job, pipeline, sub(logs, name), tasks=tasks, depends=prev,
                             job_name=f"{job.corpus.name}-{name}", input_files=files if reads_input else None)
    prev.run()  # runs its dependencies first (local), or submits the chain (slurm)
    if job.execution.executor != "slurm":
        upstream = read_applied(job.read.path)
        write_applied(sub(output, "kept"), upstream["filters"] + [MINHASH_NAME], upstream["decontamination"])
    if job.execution.executor == "local":
        print_stats(f"dedup: {job.read.path} -> {output}", sub(logs, "minhash4_filter"))
    return sub(output, "kept")


def stage_split(job: Job, reader, output: str, logs: str) -> str:
    from datatrove.pipeline.writers import JsonlWriter

    from . import decont
    from .filters import folder

    sp, inline = job.split, job.filters.inline
    names = job.filters.names(inline) + ([decont.filter_name(job.decont)] if job.decont else [])
    files = check_run_settings(logs, reader=reader, settings=dict(
        stage="split", input=job.read.path, tasks=job.execution.tasks, limit=job.read.limit,
        val_fraction=sp.val_fraction, seed=sp.seed, key=sp.key, filters=names, **decont_settings(job)))
    pipeline = [reader, *job.filters.steps(output, job.storage, inline), *decont_steps(job, output),
                HashSplit(sp.val_fraction, sp.seed, sp.key),
                JsonlWriter(folder(output, job.storage.options() or None), output_filename="${split}/${rank}.jsonl.gz")]
    make_executor(job, pipeline, logs, job_name=f"{job.corpus.name}-split", input_files=files).run()
    if job.execution.executor == "local":
        print_stats(f"split: {job.read.path} -> {output}", logs)
    return output


def stage_tokenize(job: Job, reader, output: str, upstream: dict | None = None) -> str:
    """`upstream`: {filters, decontamination} already applied to the input (by `run`'s earlier stages);
    None: read from the input folder's shardloom-applied.yaml, if an earlier command left one."""
    from .applied import read_applied

    tk = job.tokenize
    upstream = upstream if upstream is not None else read_applied(job.read.path)
    applied = list(upstream["filters"]) + job.filters.names(job.filters.inline)

    def step(out_dir, num_threads):
        return TokenizeShards(out_dir, tk.tokenizer, tk.path, max_doc_tokens=tk.max_doc_tokens, too_long=tk.too_long,
                              invalid_utf8=job.read.invalid_utf8, batch_size=tk.batch_size, num_threads=num_threads)

    extra = {"corpus": job.corpus.name, "tasks": job.execution.tasks, **job.split.manifest_extra(),
             "max_doc_tokens": tk.max_doc_tokens, "too_long": tk.too_long, "invalid_utf8": job.read.invalid_utf8,
             "limit_per_task": job.read.limit}
    middle = job.filters.steps(output, job.storage, job.filters.inline)  # score thresholds, then the chain if inline
    return tokenize_job(job, reader, middle, step, output=output, filters=applied, extra=extra,
                        settings=dict(stage="tokenize", too_long=tk.too_long, invalid_utf8=job.read.invalid_utf8,
                                      filters=applied), decontaminated=upstream["decontamination"])


def tokenize_job(job: Job, reader, middle: list, make_step, *, output: str, filters: list[str], extra: dict,
                 settings: dict, source: str | None = None, decontaminated: list[dict] | None = None) -> str:
    """What every corpus's tokenize stage shares: reader -> middle steps -> [Decontaminate] -> HashSplit
    -> the step `make_step(out_dir, num_threads)` builds, then the manifest (in-process for local runs, a
    dependent 1-task job on Slurm/Ray), uploaded when `output` is s3://. `source` names the input in the
    manifest (default: the path read); `decontaminated`: passes already applied to the input."""
    from . import decont

    tk, sp, ex, logs = job.tokenize, job.split, job.execution, job.logs
    source = source or job.read.path
    remote = is_remote(output)
    local_out = (job.staging_dir or sub(logs, "staging")) if remote else output
    if job.decont:
        filters = filters + [decont.filter_name(job.decont)]
        settings = {**settings, "filters": filters, **decont_settings(job)}
    passes = list(decontaminated or []) + decont_pass(job, sub(logs, "tokenize"))
    files = check_run_settings(sub(logs, "tokenize"), reader=reader, settings=dict(
        input=source, output=output, tasks=ex.tasks, limit=job.read.limit, tokenizer=tk.tokenizer,
        tokenizer_path=tk.path, val_fraction=sp.val_fraction, split_seed=sp.seed,
        split_key=sp.key, max_doc_tokens=tk.max_doc_tokens, **settings))
    # The manifest marks completion: remove it before tasks start rewriting shards.
    Path(local_out, "manifest.json").unlink(missing_ok=True)
    pipeline = [reader, *middle, *decont_steps(job, output), HashSplit(sp.val_fraction, sp.seed, sp.key),
                make_step(local_out, ex.task_threads())]
    if tk.file:
        extra = {**extra, "tokenizer_path": tk.file}
    manifest_step = WriteManifest(
        local_out, tk.tokenizer, tk.path, source=source, filters=filters,
        seeds={"split_seed": sp.seed, "val_fraction": sp.val_fraction}, extra=extra,
        upload_to=output if remote else None, storage_kwargs=job.storage.kwargs() if remote else None,
        decontamination=passes,
    )
    tokenize = make_executor(job, pipeline, sub(logs, "tokenize"), job_name=f"{job.corpus.name}-tokenize",
                             input_files=files)
    if ex.executor == "local":
        tokenize.run()  # raises if a task failed: then no manifest, the output stays "incomplete"
        stats = print_stats(f"tokenize: {source} -> {output}", sub(logs, "tokenize"))
        if not any(find_shards(local_out, split) for split in ("train", "val")):  # a shard opens on its first document
            raise InputError(f"tokenize {source}: 0 documents out ({why_no_documents(stats)}); no manifest written")
        deque(manifest_step.run(None, 0, 1), maxlen=0)
        print_manifest_summary(local_out)
    else:  # a dependent 1-task job writes the manifest once every tokenize task has finished
        make_executor(job, [manifest_step], sub(logs, "manifest"), tasks=1, depends=tokenize,
                      skip_completed=False, job_name=f"{job.corpus.name}-manifest").run()
    return output


def why_no_documents(stats: list[tuple[str, dict]]) -> str:
    """The counted skips and drops that took every row, from a stage's merged stats."""
    gone = {}
    for _name, s in stats:
        for k, v in s.items():
            if k.startswith(("skipped_", "dropped_")):
                gone[k] = gone.get(k, 0) + v
    if gone:
        return "every row was skipped or dropped: " + ", ".join(f"{k}={v:,}" for k, v in sorted(gone.items()))
    files = stats[0][1].get("input_files", 0) if stats else 0
    return f"0 rows read from {files} input file(s)"


def print_manifest_summary(directory, out=None) -> None:
    out = out or sys.stdout
    from shards.manifest import read_manifest

    try:
        m = read_manifest(directory)
    except FileNotFoundError:
        return
    parts = [f"{s}: {st.documents:,} docs / {st.tokens:,} tokens in {len(st.shards)} shard(s)" for s, st in m.splits.items()]
    print(f"\n{directory}: {m.tokenizer.name} ({m.dtype}, eos {m.tokenizer.eos_id}) — " + "; ".join(parts), file=out)


# -------------------------------------------------------------------------------------------- main


def run_command(run, *args) -> int:
    """Exit status of run(*args): 0, or 2 with one "error: ..." line on stderr for bad input."""
    try:
        run(*args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_stage(job: Job) -> None:
    if job.stage == "download":
        stage_download(job)
        return
    reader = open_reader(job, job.read)  # input errors surface here, before any executor
    if job.decont:  # the tasks are loaded and indexed here, once: a task that cannot load stops the run now
        from . import decont

        decont.prepare(job.decont)
    logs = job.logs
    if job.stage == "filter":
        stage_filter(job, reader, job.output, sub(logs, "filter"))
    elif job.stage == "dedup":
        stage_dedup(job, reader, job.output, sub(logs, "dedup"))
    elif job.stage == "split":
        stage_split(job, reader, job.output, sub(logs, "split"))
    elif job.stage == "tokenize":
        stage_tokenize(job, reader, job.output)
    else:
        stage_run(job, reader)


def stage_run(job: Job, reader) -> None:
    """filter (with --decontaminate) -> [dedup] -> tokenize (hash split inside). Later stages read what
    the earlier wrote, with the limit, score thresholds and decontamination already applied."""
    from . import decont
    from .applied import read_applied
    from .filters import MINHASH_NAME

    path = stage_filter(job, reader, sub(job.output, "filtered"), sub(job.logs, "filter"))
    slurm = job.execution.executor == "slurm"
    if slurm:
        job.chain.queued.add(path)
    if not is_remote(path) and not any(Path(path).glob("*.jsonl.gz")) and job.execution.executor == "local":
        raise InputError(f"the filter stage kept no documents (see the table above); nothing to tokenize in {path}")
    upstream = read_applied(job.read.path)
    applied = upstream["filters"] + job.filters.names() + ([decont.filter_name(job.decont)] if job.decont else [])
    applied += [MINHASH_NAME] if job.dedup else []
    if job.dedup:
        dedup = replace(job, read=our_output(job.read, path), decont=None)
        path = stage_dedup(dedup, open_reader(dedup, dedup.read), sub(job.output, "dedup"), sub(job.logs, "dedup"))
        if slurm:
            job.chain.queued.add(path)
    rest = replace(job, read=our_output(job.read, path), filters=replace(job.filters, scores=(), inline=False),
                   decont=None)
    passes = upstream["decontamination"] + decont_pass(job, sub(job.logs, "filter"))
    stage_tokenize(rest, open_reader(rest, rest.read), sub(job.output, "shards"),
                   upstream={"filters": applied, "decontamination": passes})


def main(corpus: Corpus, argv=None) -> int:
    args = build_parser(corpus).parse_args(argv)
    return run_command(lambda: run_stage(job_from_args(args, corpus)))
