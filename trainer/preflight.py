"""Checks that run before any model memory or training step, so bad input stops with one line naming
the file or field: shard checksums, the sources (opened by the loader), the tokenizer against the
sources' manifests, the val sets, the eval tasks (lm-eval resolves and loads each one here, never at
step N), the tokenizer the end-of-run sample needs. `preflight` runs them in order and returns what
training goes on with."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shards.check import check_files
from shards.manifest import decontaminated_tasks, read_manifest, split_conflict
from shards.s3 import is_s3_uri

from .config import Config, ConfigError
from .data import DataError, MixtureLoader, SourceSpec, SplitTooSmall, val_batches
from .evals.tasks import check_tasks
from shards.tokenizers import load_tokenizer
from .telemetry.console import log
from .parallel import Dist


def verify_sources(cfg: Config) -> None:
    """Optional full check: sha256 of every shard file against its manifest (data.verify_checksums),
    hashed in threads by `shards verify`'s own file check. A missing file is left to the loader."""
    for s in cfg.data.sources:
        if is_s3_uri(s.path):
            continue  # the s3 cache is verified on download
        try:
            m = read_manifest(s.path)
        except (FileNotFoundError, ValueError) as e:  # names the manifest: one line, no traceback
            raise DataError(f"source '{s.name}' ({s.path}): {e}") from None
        for problem in check_files(s.path, m, checksums=True):
            f = Path(s.path) / problem.rel
            if problem.kind == "size":
                raise DataError(f"source '{s.name}' ({s.path}): {f} is {problem.got} bytes, manifest says {problem.want}")
            if problem.kind == "sha256":
                raise DataError(f"source '{s.name}' ({s.path}): {f} fails its sha256 check against manifest.json (corrupted shard)")


@dataclass
class Checked:
    """What preflight opened and checked, for the stage to train with."""

    loader: MixtureLoader
    eval_sets: dict                      # source -> fixed val batches
    tokenizer: object | None             # None: cannot be loaded here (no bpb, no tasks)
    task_counts: dict[str, int] = field(default_factory=dict)  # eval task -> examples scored


def preflight(cfg: Config, d: Dist) -> Checked:
    if cfg.data.verify_checksums:
        verify_sources(cfg)
    loader = make_loader(cfg, d, cfg.model.vocab_size)  # opens every source, validates dtype/sizes/tokenizer/vocab
    tok, why = try_tokenizer(cfg)
    check_tokenizer(cfg, loader, tok, why)
    manifests = [(src.name, src.reader.manifest) for src in loader.sources]
    check_splits(cfg, manifests)
    if d.main and (warning := decontamination_warning(cfg, manifests)):
        log.warning(warning)
    return Checked(loader, load_eval_sets(cfg, d), tok, check_eval_tasks(cfg, tok, why))


def check_splits(cfg: Config, manifests: list) -> None:
    """Sources split by different rules (key, seed, val fraction) would hold one page as val in one and
    train in another: a per-source val would be measured partly on training data. Refused."""
    if msg := split_conflict(manifests):
        raise ConfigError(f"{cfg.source_file}: data.sources: {msg}")


def decontamination_warning(cfg: Config, manifests: list) -> str | None:
    """A line when eval.tasks are scored on a model whose sources were not decontaminated against them."""
    missing = {name: sorted(set(cfg.eval.tasks) - decontaminated_tasks(m)) for name, m in manifests}
    missing = {name: tasks for name, tasks in missing.items() if tasks}
    if not missing:
        return None
    return ("[decont] eval.tasks not decontaminated out of the training data: " + "; ".join(
        f"source '{name}': {', '.join(tasks)}" for name, tasks in missing.items()) +
        " (build the sources with --decontaminate, docs/data.md)")


def local_manifests(cfg: Config) -> list:
    """(name, manifest) of every source on this machine (an s3:// source is read when training starts)."""
    return [(s.name, read_manifest(s.path)) for s in cfg.data.sources if not is_s3_uri(s.path)]


def make_loader(cfg: Config, d: Dist, vocab_size: int):
    return MixtureLoader(
        [SourceSpec(s.name, s.path) for s in cfg.data.sources], cfg.resolved.mixture,
        seq_len=cfg.batch.seq_len, micro_batch=cfg.batch.micro_batch, seed=cfg.train.seed,
        rank=d.rank, world_size=d.world, total_tokens=cfg.resolved.total_tokens, split="train",
        cache_dir=cfg.data.cache_dir, grad_accum=cfg.resolved.grad_accum, packing=cfg.data.packing,
        vocab_size=vocab_size,
    )


def try_tokenizer(cfg: Config):
    """(the curriculum's tokenizer, "") or (None, why it cannot be loaded here)."""
    try:
        return load_tokenizer(cfg.to_dict()), ""
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return None, (str(e).splitlines() or [type(e).__name__])[0]


def check_eval_tasks(cfg: Config, tok, why: str) -> dict[str, int]:
    """Every eval task resolves and loads (task -> examples), or one line naming it before step 0."""
    if not cfg.eval.tasks:
        return {}
    if tok is None:
        raise ConfigError(f"{cfg.source_file}: eval.tasks: scoring tasks needs the tokenizer, which cannot be "
                          f"loaded here ({why})")
    try:
        counts = check_tasks(cfg.eval.tasks, cfg.eval.include_path, cfg.eval.limit)
    except ValueError as e:
        raise ConfigError(f"{cfg.source_file}: eval.tasks: {e}") from None
    world = cfg.resolved.world_size if cfg.resolved else 1
    if short := {t: n for t, n in counts.items() if n < world}:  # lm-eval gives a rank without documents nothing to score
        raise ConfigError(f"{cfg.source_file}: eval.tasks: {', '.join(f'{t} ({n} examples)' for t, n in short.items())} "
                          f"has fewer examples than the {world} ranks that share it (raise eval.limit)")
    return counts


def check_tokenizer(cfg: Config, loader, tok, why: str) -> None:
    """Every source must have been tokenized with the curriculum's tokenizer, compared by vocabulary
    hash (one vocabulary may be named, or its file typed, two ways). A tokenizer that cannot be
    loaded here is compared with the manifests by name only, and the log says so."""
    want = cfg.tokenizer.path or cfg.tokenizer.name
    info = tok.info() if tok is not None else None
    for src in loader.sources:
        t = src.reader.manifest.tokenizer
        where = f"source '{src.name}' ({src.reader.directory / 'manifest.json'})"
        if info is not None and t.vocab_hash != info.vocab_hash:
            raise ConfigError(f"{cfg.source_file}: tokenizer: {want} (vocab_hash {info.vocab_hash[:12]}) is not the "
                              f"tokenizer of {where}: {t.name} (vocab_hash {t.vocab_hash[:12]})")
        if info is None and t.name != cfg.tokenizer.name:
            raise ConfigError(f"{cfg.source_file}: tokenizer: '{cfg.tokenizer.name}' cannot be loaded here to compare "
                              f"its vocabulary ({why}), and {where} names another: '{t.name}'")
    if info is None:
        log.info(f"[tokenizer] {want} cannot be loaded here ({why}): checked against the sources' manifests by name only")


def load_eval_sets(cfg: Config, d: Dist):
    if cfg.eval.batches <= 0:
        return {}
    mb = cfg.eval.micro_batch or cfg.batch.micro_batch
    out = {}
    for s in cfg.data.sources:
        try:
            out[s.name] = val_batches(s.path, cfg.batch.seq_len, mb, cfg.eval.batches, split="val",
                                      packing=cfg.data.packing, cache_dir=cfg.data.cache_dir, name=s.name)
        except SplitTooSmall as e:
            log.info(f"[eval] no val data for '{s.name}': {e}")
    return out


def check_sample_tokenizer(cfg: Config) -> None:
    """The end-of-run sample needs the tokenizer: load it before training (cached, so no cost later)."""
    if not cfg.sample.prompt:
        return
    try:
        load_tokenizer(cfg.to_dict())
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{cfg.source_file}: tokenizer: {e} (the sample.prompt at the end of the run needs it)") from None
