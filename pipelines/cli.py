"""The command line every corpus module shares: download, filter, dedup, split, tokenize, run.

A corpus is a `Corpus` (hub repo, subset, column names, filter chain, score columns);
`pipelines/fineweb.py` is three lines over `main`. `--subset` picks another hub folder of the same
corpus; `--min-score` / `--min-int-score` threshold the corpus's own score columns in every stage that
reads rows, counted like the filters. Stages are datatrove pipelines run by datatrove's own executors
(local / slurm / ray); completion markers in the logging dir make a rerun skip finished tasks, and a rerun of an
unfinished task rewrites its shards from scratch (`TokenizeShards` removes its stale files first),
so an interrupted run, rerun, equals an uninterrupted one. Keep `--tasks` fixed between reruns:
the logging dir records the settings and refuses a rerun with different ones.

Output layout (`--output DIR`):
  download  DIR/<subset>/*.parquet                  (a local mirror)
  filter    DIR/kept/*.jsonl.gz, DIR/removed/<filter>/*.jsonl.gz
  dedup     DIR/kept/, DIR/removed/minhash/, DIR/minhash/ (signatures, buckets, ids)
  split     DIR/train/*.jsonl.gz, DIR/val/*.jsonl.gz
  tokenize  DIR/train/NNNNN.ds*, DIR/val/NNNNN.ds*, DIR/manifest.json (written last)
  run       DIR/filtered/ (filter), DIR/dedup/ (with --dedup), DIR/shards/ (tokenize)
Logs and completion markers: DIR/logs/<stage>/ unless --logging-dir.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from shards.storage import storage_options as s3_storage_options

from .filters import WEB_CHAIN
from .cluster import queued
from .readers import InputError, input_files, make_reader
from shards.tokenizers import default_threads

from shards.manifest import find_shards

from .steps import HashSplit, TokenizeShards, WriteManifest

STAGES = ("download", "filter", "dedup", "split", "tokenize", "run")
SCORE_FLAGS = {"min_score": "score", "min_int_score": "int_score"}  # argparse dest -> the column it thresholds


@dataclass
class Corpus:
    name: str
    hub_repo: str  # "HuggingFaceFW/fineweb"
    hub_subset: str  # "sample/10BT": a folder of parquet files in the dataset repo
    description: str = ""
    text_key: str = "text"
    id_key: str = "id"
    chain: tuple[str, ...] = WEB_CHAIN  # pipelines.filters chain names: what `filter` / --filter apply
    scores: tuple[str, ...] = ()  # numeric score columns that --min-score / --min-int-score may threshold

    @property
    def hub_input(self) -> str:
        return f"hf://datasets/{self.hub_repo}/{self.hub_subset}"


# ------------------------------------------------------------------------------------------ parser


def build_parser(corpus: Corpus) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m pipelines.{corpus.name.replace('-', '_')}",
        description=f"{corpus.description or corpus.name}: raw text -> filtered JSONL -> token shards "
                    f"(datatrove). Default input: {corpus.hub_input}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("stage", choices=STAGES, help="download | filter | dedup | split | tokenize | run (every stage)")
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
    tk.add_argument("--split-key", choices=("auto", "id", "text"), default="auto",
                    help="auto: the source id, or the text when the row has none (hub rows get position ids)")
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


# ----------------------------------------------------------------------------------------- helpers


def storage_kwargs(args) -> dict:
    """--endpoint-url/--profile/--region as shards.storage's upload() and storage_options() take them."""
    return dict(endpoint_url=args.endpoint_url, profile=args.profile, region=args.region)


def storage_options(args) -> dict:
    """fsspec options for s3:// input/output folders (no credentials: s3fs uses boto3's chain)."""
    return s3_storage_options(**storage_kwargs(args))


def is_remote(path: str) -> bool:
    return "://" in str(path)


def sub(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def parse_executor_args(items) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--executor-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def logging_base(args, corpus: Corpus) -> str:
    if args.logging_dir:
        return args.logging_dir
    if is_remote(args.output):
        return sub("logs", f"{corpus.name}-{hashlib.sha256(args.output.encode()).hexdigest()[:8]}")
    return sub(args.output, "logs")


def check_run_settings(logging_dir: str, settings: dict, reader=None) -> None:
    """Completion markers are only meaningful for the same settings and the same input files (names
    and sizes, listed from `reader`): refuse a changed rerun."""
    if is_remote(logging_dir):
        return
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


def files_change(old, new) -> str:
    """'1 added (c.jsonl); 1 changed size (a.jsonl)' between two `input_files` records, or ''."""
    o, n = dict(map(tuple, old or [])), dict(map(tuple, new or []))
    kinds = (("added", sorted(set(n) - set(o))), ("removed", sorted(set(o) - set(n))),
             ("changed size", sorted(k for k in set(o) & set(n) if o[k] != n[k])))
    return "; ".join(f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                     for kind, names in kinds if names)


def local_workers(args, tasks: int | None = None) -> int:
    """Tasks a local run executes at once: --workers, or one per core up to the number of tasks."""
    tasks = args.tasks if tasks is None else tasks
    return args.workers if args.workers > 0 else min(tasks, default_threads())


def make_executor(args, pipeline, logging_dir: str, tasks: int | None = None, depends=None,
                  skip_completed: bool = True, job_name: str = "shardloom"):
    tasks = args.tasks if tasks is None else tasks
    extra = parse_executor_args(args.executor_arg)
    from .cluster import warn_idle_tasks

    warn_idle_tasks(pipeline, tasks, job_name)
    if args.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = local_workers(args, tasks)
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir,
                                     depends=depends, skip_completed=skip_completed, **extra)
    if args.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not args.slurm_partition and "partition" not in extra:
            raise InputError("--executor slurm needs --slurm-partition (or --executor-arg partition=NAME)")
        kw = dict(partition=args.slurm_partition, time=args.slurm_time, job_name=job_name) | extra
        if args.workers > 0:
            kw.setdefault("workers", args.workers)
        from .cluster import venv_activate

        if args.slurm_venv or kw.get("venv_path"):
            kw["venv_path"] = venv_activate(args.slurm_venv or kw["venv_path"])
        # each job waits (afterok) for the one submitted before it: `run` submits its stages as a chain
        args.slurm_last = SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=logging_dir,
                                                depends=depends or getattr(args, "slurm_last", None),
                                                skip_completed=skip_completed, **kw)
        return args.slurm_last
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=args.workers, logging_dir=logging_dir,
                               depends=depends, skip_completed=skip_completed, **extra)


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


def _reader(args, corpus, path=None):
    path = path or args.input or corpus.hub_input
    if path in getattr(args, "queued", ()):  # a queued Slurm job writes it: nothing to check yet
        from .cluster import queued_reader

        return queued_reader(args, path, storage_options(args))
    reader = make_reader(path, limit=args.limit, text_key=args.text_key, id_key=args.id_key,
                         invalid_utf8=args.invalid_utf8, storage_options=storage_options(args))
    check_text_column(reader, args.text_key)
    return reader


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


def _langs(args):
    return None if args.languages.strip() == "any" else tuple(x.strip() for x in args.languages.split(","))


def _scores(args) -> dict[str, float]:
    return {col: getattr(args, flag) for flag, col in SCORE_FLAGS.items() if getattr(args, flag, None) is not None}


def _filters(args, corpus, output, chain: bool = True):
    """The score thresholds given, then the corpus's chain (when `chain`)."""
    from .filters import build_filters

    return build_filters(corpus.chain if chain else (), output, args.language_threshold, _langs(args),
                         storage_options(args) or None, scores=_scores(args))


def _filter_names(args, corpus, chain: bool = True):
    from .filters import chain_names

    return chain_names(corpus.chain if chain else (), args.language_threshold, _langs(args), scores=_scores(args))


def corpus_for(args, corpus: Corpus) -> Corpus:
    """The corpus as the flags select it (--subset), after checking the score flags fit it."""
    for flag, column in SCORE_FLAGS.items():
        if getattr(args, flag, None) is not None and column not in corpus.scores:
            have = ", ".join(corpus.scores) or "none"
            raise InputError(f"--{flag.replace('_', '-')}: {corpus.name} has no '{column}' column (its score columns: {have})")
    return replace(corpus, hub_subset=args.subset.strip("/")) if getattr(args, "subset", None) else corpus


def resolve_tokenizer(args) -> tuple[str, str | None]:
    """(name_or_path, path) for shards.tokenizers.get_tokenizer; loads it once to fail early. A file
    is given resolved, so the manifest names it from any folder (not relative to this one)."""
    from shards.tokenizers import get_tokenizer, resolved_name

    name, path = args.tokenizer, args.tokenizer_path
    if path and name != "llama2" and (path.endswith(".json") or Path(path).is_dir()):
        name, path = path, None  # --tokenizer-path tokenizer.json alone means "this file"
    path = str(Path(path).expanduser().resolve()) if path else None
    name = resolved_name(name)
    try:
        get_tokenizer(name, path=path)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise InputError(f"tokenizer: {e}") from None
    return name, path


def stage_download(args, corpus) -> str:
    from huggingface_hub import snapshot_download

    dest = args.output
    pattern = f"{corpus.hub_subset}/*.parquet"
    allow = pattern
    try:
        if args.max_files:
            from huggingface_hub import HfApi

            files = sorted(f for f in HfApi().list_repo_files(corpus.hub_repo, repo_type="dataset")
                           if f.startswith(corpus.hub_subset + "/") and f.endswith(".parquet"))
            allow = files[: args.max_files]
        print(f"mirroring {corpus.hub_repo}/{pattern} -> {dest}")
        snapshot_download(corpus.hub_repo, repo_type="dataset", allow_patterns=allow, local_dir=dest)
    except Exception as e:  # offline, DNS, auth, a typo in the repo: one line, not a hub traceback
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise InputError(f"download {corpus.hub_repo}/{pattern}: cannot fetch from the Hugging Face hub "
                         f"({type(e).__name__}: {reason})") from None
    return sub(dest, corpus.hub_subset)


def stage_filter(args, corpus, input_path, output, logs) -> str:
    from datatrove.pipeline.writers import JsonlWriter

    from .filters import folder

    reader = _reader(args, corpus, input_path)
    check_run_settings(logs, reader=reader, settings=dict(stage="filter", input=input_path or corpus.hub_input, tasks=args.tasks,
                                  limit=args.limit, filters=_filter_names(args, corpus)))
    kept = folder(output, storage_options(args) or None, "kept")
    pipeline = [reader, *_filters(args, corpus, output), JsonlWriter(kept, output_filename="${rank}.jsonl.gz")]
    make_executor(args, pipeline, logs, job_name=f"{corpus.name}-filter").run()
    if args.executor == "local":
        print_stats(f"filter: {input_path or corpus.hub_input} -> {output}", logs)
    return sub(output, "kept")


def stage_dedup(args, corpus, input_path, output, logs) -> str:
    from .filters import minhash_stages

    reader = _reader(args, corpus, input_path)  # checks the input before anything starts
    check_run_settings(logs, reader=reader, settings=dict(stage="dedup", input=input_path, tasks=args.tasks, limit=args.limit))
    stages = minhash_stages(lambda: _reader(args, corpus, input_path), sub(output, "minhash"), output,
                            storage_options(args) or None)
    prev = None
    for name, pipeline, tasks in stages:
        prev = make_executor(args, pipeline, sub(logs, name), tasks=tasks, depends=prev,
                             job_name=f"{corpus.name}-{name}")
    prev.run()  # runs its dependencies first (local), or submits the chain (slurm)
    if args.executor == "local":
        print_stats(f"dedup: {input_path} -> {output}", sub(logs, "minhash4_filter"))
    return sub(output, "kept")


def stage_split(args, corpus, input_path, output, logs) -> str:
    from datatrove.pipeline.writers import JsonlWriter

    from .filters import folder

    reader = _reader(args, corpus, input_path)
    check_run_settings(logs, reader=reader, settings=dict(stage="split", input=input_path or corpus.hub_input, tasks=args.tasks,
                                  limit=args.limit, val_fraction=args.val_fraction, seed=args.split_seed,
                                  key=args.split_key, filters=_filter_names(args, corpus, args.filter)))
    pipeline = [reader, *_filters(args, corpus, output, args.filter),
                HashSplit(args.val_fraction, args.split_seed, args.split_key),
                JsonlWriter(folder(output, storage_options(args) or None), output_filename="${split}/${rank}.jsonl.gz")]
    make_executor(args, pipeline, logs, job_name=f"{corpus.name}-split").run()
    if args.executor == "local":
        print_stats(f"split: {input_path or corpus.hub_input} -> {output}", logs)
    return output


def stage_tokenize(args, corpus, input_path, output, logs, filters: list[str] | None = None) -> str:
    reader = _reader(args, corpus, input_path)  # input errors surface here, before any executor
    tok_name, tok_path = resolve_tokenizer(args)
    applied = list(filters or []) + _filter_names(args, corpus, args.filter)

    def step(out_dir, num_threads):
        return TokenizeShards(out_dir, tok_name, tok_path, max_doc_tokens=args.max_doc_tokens,
                              too_long=args.too_long, invalid_utf8=args.invalid_utf8, batch_size=args.batch_size,
                              num_threads=num_threads)

    extra = {"corpus": corpus.name, "tasks": args.tasks, "split_key": args.split_key,
             "split_rule": "val iff blake2b(key, key=str(seed)) as little-endian uint64 / 2**64 < val_fraction; "
                           "auto key = id, or text when the id is missing/position-based",
             "max_doc_tokens": args.max_doc_tokens, "too_long": args.too_long, "invalid_utf8": args.invalid_utf8,
             "limit_per_task": args.limit}
    return tokenize_job(args, corpus, logs, reader, _filters(args, corpus, output, args.filter), step,
                        source=input_path or corpus.hub_input, output=output, filters=applied, extra=extra,
                        settings=dict(stage="tokenize", too_long=args.too_long, invalid_utf8=args.invalid_utf8,
                                      filters=applied))


def tokenize_job(args, corpus, logs, reader, middle: list, make_step, *, source: str, output: str,
                 filters: list[str], extra: dict, settings: dict) -> str:
    """What every corpus's tokenize stage shares: reader -> middle steps -> HashSplit -> the step
    `make_step(out_dir, num_threads)` builds, then the manifest (in-process for local runs, a dependent
    1-task job on Slurm/Ray), uploaded when `output` is s3://."""
    tok_name, tok_path = resolve_tokenizer(args)
    remote = is_remote(output)
    local_out = (args.staging_dir or sub(logs, "staging")) if remote else output
    check_run_settings(sub(logs, "tokenize"), reader=reader, settings=dict(
        input=source, output=output, tasks=args.tasks, limit=args.limit, tokenizer=tok_name,
        tokenizer_path=tok_path, val_fraction=args.val_fraction, split_seed=args.split_seed,
        split_key=args.split_key, max_doc_tokens=args.max_doc_tokens, **settings))
    # The manifest marks completion: remove it before tasks start rewriting shards.
    Path(local_out, "manifest.json").unlink(missing_ok=True)
    # Local: the cores this process may use, shared by the tasks running at once. Slurm/Ray: None, so
    # each task uses what its own allocation (affinity mask) gives it, not the submitting node's count.
    threads = args.threads or (max(1, default_threads() // local_workers(args)) if args.executor == "local" else None)
    pipeline = [reader, *middle, HashSplit(args.val_fraction, args.split_seed, args.split_key),
                make_step(local_out, threads)]
    if tok_path or Path(tok_name).suffix in (".json", ".model"):
        extra = {**extra, "tokenizer_path": tok_path or tok_name}
    manifest_step = WriteManifest(
        local_out, tok_name, tok_path, source=source, filters=filters,
        seeds={"split_seed": args.split_seed, "val_fraction": args.val_fraction}, extra=extra,
        upload_to=output if remote else None,
        storage_kwargs=storage_kwargs(args) if remote else None,
    )
    tokenize = make_executor(args, pipeline, sub(logs, "tokenize"), job_name=f"{corpus.name}-tokenize")
    if args.executor == "local":
        tokenize.run()  # raises if a task failed: then no manifest, the output stays "incomplete"
        stats = print_stats(f"tokenize: {source} -> {output}", sub(logs, "tokenize"))
        if not any(find_shards(local_out, split) for split in ("train", "val")):  # a shard opens on its first document
            raise InputError(f"tokenize {source}: 0 documents out ({why_no_documents(stats)}); no manifest written")
        deque(manifest_step.run(None, 0, 1), maxlen=0)
        print_manifest_summary(local_out)
    else:  # a dependent 1-task job writes the manifest once every tokenize task has finished
        make_executor(args, [manifest_step], sub(logs, "manifest"), tasks=1, depends=tokenize,
                      skip_completed=False, job_name=f"{corpus.name}-manifest").run()
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


def check_args(args) -> None:
    """The checks argparse cannot express, shared by every corpus command line."""
    if args.tasks < 1:
        raise InputError(f"--tasks must be >= 1, got {args.tasks}")
    if not 0.0 <= args.val_fraction <= 1.0:
        raise InputError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")
    if args.executor == "slurm":
        from .cluster import check_sbatch, venv_activate

        check_sbatch()
        if args.slurm_venv:
            args.slurm_venv = venv_activate(args.slurm_venv)


def run_command(run, *args) -> int:
    """Exit status of run(*args): 0, or 2 with one "error: ..." line on stderr for bad input."""
    try:
        run(*args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_stage(args, corpus: Corpus) -> None:
    corpus = corpus_for(args, corpus)
    logs = logging_base(args, corpus)
    check_args(args)
    if args.stage == "download":
        stage_download(args, corpus)
    elif args.stage == "filter":
        stage_filter(args, corpus, args.input, args.output, sub(logs, "filter"))
    elif args.stage == "dedup":
        if not args.input:
            raise InputError("dedup needs --input (e.g. the kept/ folder of a filter run)")
        stage_dedup(args, corpus, args.input, args.output, sub(logs, "dedup"))
    elif args.stage == "split":
        stage_split(args, corpus, args.input, args.output, sub(logs, "split"))
    elif args.stage == "tokenize":
        stage_tokenize(args, corpus, args.input, args.output, logs)
    else:  # run: filter -> [dedup] -> tokenize (hash split inside)
        _reader(args, corpus)  # fail on a bad input before the first stage starts
        resolve_tokenizer(args)
        path = stage_filter(args, corpus, args.input, sub(args.output, "filtered"), sub(logs, "filter"))
        if args.executor == "slurm":
            queued(args, path)
        if not is_remote(path) and not any(Path(path).glob("*.jsonl.gz")) and args.executor == "local":
            raise InputError(f"the filter stage kept no documents (see the table above); nothing to tokenize in {path}")
        if args.dedup:
            path = stage_dedup(args, corpus, path, sub(args.output, "dedup"), sub(logs, "dedup"))
            if args.executor == "slurm":
                queued(args, path)
        limit, args.limit = args.limit, -1  # the limit applied when reading the raw input
        filters = _filter_names(args, corpus) + (["datatrove.MinhashDedup(4 stages)"] if args.dedup else [])
        args.filter = False
        thresholds = {flag: getattr(args, flag) for flag in SCORE_FLAGS}  # applied by the filter stage
        for flag in SCORE_FLAGS:
            setattr(args, flag, None)
        stage_tokenize(args, corpus, path, sub(args.output, "shards"), logs, filters=filters)
        args.limit = limit
        for flag, value in thresholds.items():
            setattr(args, flag, value)


def main(corpus: Corpus, argv=None) -> int:
    return run_command(run_stage, build_parser(corpus).parse_args(argv), corpus)
