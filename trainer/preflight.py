"""Checks that run before any model memory or training step, so bad input stops with one line naming
the file or field: shard checksums, the tokenizer against the sources' manifests, the val sets, the
tokenizer the end-of-run sample needs."""
from __future__ import annotations

from pathlib import Path

from shards.check import check_files
from shards.manifest import read_manifest
from shards.s3 import is_s3_uri

from .config import Config, ConfigError
from .data import DataError, SplitTooSmall, val_batches
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


def check_tokenizer(cfg: Config, loader, d: Dist) -> None:
    """Every source must have been tokenized with the curriculum's tokenizer, compared by vocabulary
    hash (one vocabulary may be named, or its file typed, two ways). A tokenizer that cannot be
    loaded here is compared with the manifests by name only, and the log says so."""
    want = cfg.tokenizer.path or cfg.tokenizer.name
    try:
        info, why = load_tokenizer(cfg.to_dict()).info(), ""
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        info, why = None, (str(e).splitlines() or [type(e).__name__])[0]
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
