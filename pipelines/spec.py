"""The command line parsed once into typed specs: what each stage reads, filters, splits, tokenizes
and runs on. Stages take these, never the argparse namespace, and a later stage gets a changed copy
(`dataclasses.replace`) instead of flags flipped under it: `run` tokenizes the filter stage's output
with `limit=-1` and no score thresholds because the filter stage already applied them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .filters import WEB_CHAIN
from .readers import InputError

SCORE_FLAGS = {"min_score": "score", "min_int_score": "int_score"}  # argparse dest -> the column it thresholds


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Storage:
    """How s3:// (and R2) input and output are reached. No credentials: boto3's own chain finds them."""

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None

    @classmethod
    def from_args(cls, args) -> "Storage":
        return cls(getattr(args, "endpoint_url", None), getattr(args, "profile", None), getattr(args, "region", None))

    def kwargs(self) -> dict:
        """As shards.storage's upload() and storage_options() take them."""
        return dict(endpoint_url=self.endpoint_url, profile=self.profile, region=self.region)

    def options(self) -> dict:
        """fsspec options for s3:// folders ({} when nothing is set)."""
        from shards.storage import storage_options

        return storage_options(**self.kwargs())


@dataclass(frozen=True)
class ReadSpec:
    """Where a stage reads and how rows become documents."""

    path: str  # --input, or the corpus's hub folder
    limit: int = -1  # documents per task (datatrove semantics)
    text_key: str = "text"
    id_key: str = "id"
    invalid_utf8: str = "skip"  # what the reader and the tokenize step do with text that is not UTF-8


@dataclass(frozen=True)
class FilterSpec:
    """The corpus's filter chain and the score thresholds (column, minimum) given. The `filter` stage
    applies both; split and tokenize apply the thresholds, and the chain too when `inline` (--filter)."""

    chain: tuple[str, ...]
    language_threshold: float = 0.65
    languages: tuple[str, ...] | None = ("en",)  # None: any language
    scores: tuple[tuple[str, float], ...] = ()
    inline: bool = False

    def names(self, chain: bool = True) -> list[str]:
        """What the manifest and the settings record: thresholds, then the chain when `chain`."""
        from .filters import chain_names

        return chain_names(self.chain if chain else (), self.language_threshold, self.languages,
                           scores=dict(self.scores))

    def steps(self, output: str, storage: Storage, chain: bool = True) -> list:
        from .filters import build_filters

        return build_filters(self.chain if chain else (), output, self.language_threshold, self.languages,
                             storage.options() or None, scores=dict(self.scores))


@dataclass(frozen=True)
class SplitSpec:
    val_fraction: float = 0.001
    seed: int = 1337
    key: str = "text"  # pipelines.steps.SPLIT_KEYS

    def manifest_extra(self) -> dict:
        """The split as a manifest's `extra` records it (shards.manifest.split_rule reads it back)."""
        from shards.text import NORMALIZATION

        from .steps import SPLIT_RULE

        key = "id" if self.key == "auto" else self.key
        return {"split_key": key, "split_rule": SPLIT_RULE,
                **({"split_normalization": NORMALIZATION} if key == "text" else {})}


@dataclass(frozen=True)
class DecontSpec:
    """--decontaminate: lm-eval task names, where local task YAMLs live, the n-gram size, and the
    folder (under the logs) the command indexes them into before any executor starts."""

    tasks: tuple[str, ...]
    folder: str
    include_path: str | None = None
    n: int = 13


@dataclass(frozen=True)
class TokenizeSpec:
    tokenizer: str  # a registry name, or a resolved tokenizer.json / .model path
    path: str | None = None  # the file for a named tokenizer (llama2's tokenizer.model), resolved
    max_doc_tokens: int = 1_000_000
    too_long: str = "skip"
    batch_size: int = 1000

    def load(self):
        from shards.tokenizers import get_tokenizer  # cached: the same object every call

        return get_tokenizer(self.tokenizer, path=self.path)

    @property
    def file(self) -> str | None:
        """The tokenizer file the manifest should name, if the tokenizer came from one."""
        return self.path or (self.tokenizer if Path(self.tokenizer).suffix in (".json", ".model") else None)


@dataclass(frozen=True)
class ExecSpec:
    """datatrove executor settings: local / slurm / ray."""

    executor: str = "local"
    tasks: int = 1
    workers: int = -1  # tasks at once; -1: min(tasks, cores)
    threads: int = 0  # tokenizer threads per task; 0: cores // workers
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_venv: str | None = None  # the activate script each job sources, resolved
    extra: dict = field(default_factory=dict)  # --executor-arg KEY=VALUE, parsed

    def local_workers(self, tasks: int | None = None) -> int:
        """Tasks a local run executes at once: --workers, or one per core up to the number of tasks."""
        from shards.tokenizers import default_threads

        tasks = self.tasks if tasks is None else tasks
        return self.workers if self.workers > 0 else min(tasks, default_threads())

    def task_threads(self) -> int | None:
        """Tokenizer threads per task. Local: the cores this process may use, shared by the tasks
        running at once. Slurm/Ray: None, so each task uses what its own allocation (affinity mask)
        gives it, not the submitting node's count."""
        from shards.tokenizers import default_threads

        if self.threads:
            return self.threads
        return max(1, default_threads() // self.local_workers()) if self.executor == "local" else None


@dataclass
class SlurmChain:
    """What `run --executor slurm` has submitted so far: each next job waits (afterok) for `last`, and a
    folder in `queued` is written by a job that has not run yet, so it cannot be checked now."""

    last: object = None
    queued: set = field(default_factory=set)


@dataclass
class Job:
    """One command line, parsed: the stage to run and everything it needs. A stage of `run` gets a
    copy made with dataclasses.replace, which shares `chain`: every stage extends the same Slurm chain."""

    stage: str
    corpus: Corpus  # --subset applied
    output: str
    logs: str  # base folder for logs, stats and completion markers
    read: ReadSpec
    filters: FilterSpec
    split: SplitSpec
    tokenize: TokenizeSpec | None  # None unless the stage tokenizes
    execution: ExecSpec
    storage: Storage = Storage()
    staging_dir: str | None = None  # local folder for shards bound for an s3:// output
    dedup: bool = False
    max_files: int | None = None
    decont: DecontSpec | None = None
    chain: SlurmChain = field(default_factory=SlurmChain)


def is_remote(path: str) -> bool:
    return "://" in str(path)


def sub(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def job_from_args(args, corpus: Corpus) -> Job:
    """Check the flags argparse cannot and build the Job. The tokenizer is resolved (and loaded, to fail
    early) only by the stages that tokenize."""
    if args.tasks < 1:
        raise InputError(f"--tasks must be >= 1, got {args.tasks}")
    if not 0.0 <= args.val_fraction <= 1.0:
        raise InputError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")
    if args.stage == "dedup" and not args.input:
        raise InputError("dedup needs --input (e.g. the kept/ folder of a filter run)")
    corpus = corpus_for(args, corpus)
    logs = logging_base(args.logging_dir, args.output, corpus)
    decont = decont_spec(args, logs)
    execution = exec_spec(args)
    scores = tuple((col, getattr(args, flag)) for flag, col in SCORE_FLAGS.items()
                   if getattr(args, flag, None) is not None)
    languages = None if args.languages.strip() == "any" else tuple(x.strip() for x in args.languages.split(","))
    return Job(
        stage=args.stage, corpus=corpus, output=args.output, logs=logs,
        read=ReadSpec(args.input or corpus.hub_input, args.limit, args.text_key, args.id_key, args.invalid_utf8),
        filters=FilterSpec(corpus.chain, args.language_threshold, languages, scores, args.filter),
        split=SplitSpec(args.val_fraction, args.split_seed, args.split_key),
        tokenize=tokenize_spec(args) if args.stage in ("tokenize", "run") else None,
        execution=execution, storage=Storage.from_args(args), staging_dir=args.staging_dir,
        dedup=args.dedup, max_files=args.max_files, decont=decont,
    )


DECONT_STAGES = ("filter", "split", "tokenize", "run")


def decont_spec(args, logs: str) -> DecontSpec | None:
    """--decontaminate / --include-path / --decont-ngram checked; the index goes to LOGS/decont."""
    tasks = getattr(args, "decontaminate", None)
    if not tasks:
        for flag in ("include_path", "decont_ngram"):
            if getattr(args, flag, None) is not None:
                raise InputError(f"--{flag.replace('_', '-')} applies only with --decontaminate TASK[,TASK]")
        return None
    from shards.evalsets import EvalSetError, parse_tasks

    if args.stage not in DECONT_STAGES:
        raise InputError(f"--decontaminate applies to the {', '.join(DECONT_STAGES)} stages, not {args.stage}")
    n = 13 if args.decont_ngram is None else args.decont_ngram
    if n < 1:
        raise InputError(f"--decont-ngram must be >= 1, got {n}")
    if is_remote(logs):
        raise InputError(f"--decontaminate indexes the tasks into a local folder: --logging-dir {logs} is remote")
    try:
        names = tuple(parse_tasks(tasks))
    except EvalSetError as e:
        raise InputError(str(e)) from None
    return DecontSpec(names, sub(logs, "decont"), args.include_path, n)


def exec_spec(args) -> ExecSpec:
    venv = args.slurm_venv
    extra = parse_executor_args(args.executor_arg)
    if args.executor == "slurm":
        from .cluster import check_sbatch, venv_activate

        check_sbatch()
        if venv or extra.get("venv_path"):
            venv = venv_activate(venv) if venv else venv_activate(extra.pop("venv_path"), "venv_path")
        if not args.slurm_partition and "partition" not in extra:
            raise InputError("--executor slurm needs --slurm-partition (or --executor-arg partition=NAME)")
    return ExecSpec(args.executor, args.tasks, args.workers, args.threads, args.slurm_partition, args.slurm_time,
                    venv, extra)


def tokenize_spec(args) -> TokenizeSpec:
    name, path = resolve_tokenizer(args.tokenizer, args.tokenizer_path)
    return TokenizeSpec(name, path, args.max_doc_tokens, args.too_long, args.batch_size)


def resolve_tokenizer(name: str, path: str | None) -> tuple[str, str | None]:
    """shards.tokenizers.resolve_tokenizer (loaded once, to fail early), a bad one as an InputError."""
    from shards.tokenizers import resolve_tokenizer as resolve

    try:
        name, path, _ = resolve(name, path)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise InputError(f"tokenizer: {e}") from None
    return name, path


def corpus_for(args, corpus: Corpus) -> Corpus:
    """The corpus as the flags select it (--subset), after checking the score flags fit it."""
    for flag, column in SCORE_FLAGS.items():
        if getattr(args, flag, None) is not None and column not in corpus.scores:
            have = ", ".join(corpus.scores) or "none"
            raise InputError(f"--{flag.replace('_', '-')}: {corpus.name} has no '{column}' column (its score columns: {have})")
    return replace(corpus, hub_subset=args.subset.strip("/")) if getattr(args, "subset", None) else corpus


def parse_executor_args(items) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--executor-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def logging_base(logging_dir: str | None, output: str, corpus: Corpus) -> str:
    if logging_dir:
        return logging_dir
    if is_remote(output):
        return sub("logs", f"{corpus.name}-{hashlib.sha256(output.encode()).hexdigest()[:8]}")
    return sub(output, "logs")
