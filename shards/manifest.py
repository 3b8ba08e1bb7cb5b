"""`manifest.json`: what a shard directory holds and how to check it.

A shard directory looks like

    DIR/manifest.json
    DIR/train/00000.ds (+ .index, .loss, .metadata)
    DIR/val/00000.ds ...

The manifest is written last (atomically), after every shard is complete, so its presence is the
"this dataset is finished" marker for readers, `verify` and object-storage sync. It holds no
timestamps or host names: the same input and seed give a byte-identical manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .format import METADATA, read_metadata

MANIFEST = "manifest.json"
FORMAT = "shardloom.shards/1"


@dataclass
class TokenizerInfo:
    name: str
    vocab_size: int
    vocab_hash: str  # sha256 of the vocabulary (ranks/pieces + specials): catches "same name, other vocab"
    eos_id: int
    bos_id: int | None = None
    add_bos: bool = False


@dataclass
class ShardStats:
    name: str  # relative path of the .ds file, e.g. "train/00000.ds"
    documents: int
    tokens: int
    loss_tokens: int | None = None  # tokens with mask 1, when the shard has a .ds.loss
    max_id: int | None = None  # largest token id (-1 if empty): checked against a model without a scan


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    shards: list[ShardStats] = field(default_factory=list)


@dataclass
class FileEntry:
    bytes: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str  # "uint16" | "uint32"
    splits: dict[str, SplitStats]
    files: dict[str, FileEntry]  # every shard file (all four suffixes), relative path -> size and sha256
    source: str = ""
    filters: list[str] = field(default_factory=list)
    seeds: dict[str, int | float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        try:
            m = cls(
                tokenizer=TokenizerInfo(**d["tokenizer"]),
                dtype=d["dtype"],
                splits={
                    k: SplitStats(v["documents"], v["tokens"], [ShardStats(**s) for s in v["shards"]])
                    for k, v in d["splits"].items()
                },
                files={k: FileEntry(**v) for k, v in d["files"].items()},
                source=d.get("source", ""),
                filters=list(d.get("filters", [])),
                seeds=dict(d.get("seeds", {})),
                extra=dict(d.get("extra", {})),
                format=d.get("format", FORMAT),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: not a ShardLoom manifest (bad or missing field: {e})") from None
        if bad := _mistyped_field(m):
            raise ValueError(f"{where}: not a ShardLoom manifest (field {bad} has the wrong type or value)")
        return m


def _mistyped_field(m: Manifest) -> str | None:
    """The first field whose JSON value is not of its type (a hand-edited manifest), or None."""

    def whole(v, optional=False) -> bool:
        return (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool))

    t = m.tokenizer
    checks = [("tokenizer.name", isinstance(t.name, str)), ("tokenizer.vocab_size", whole(t.vocab_size) and t.vocab_size > 0),
              ("tokenizer.vocab_hash", isinstance(t.vocab_hash, str)), ("tokenizer.eos_id", whole(t.eos_id)),
              ("tokenizer.bos_id", whole(t.bos_id, True)), ("tokenizer.add_bos", isinstance(t.add_bos, bool)),
              ("dtype", m.dtype in ("uint16", "uint32"))]
    for split, st in m.splits.items():
        checks.append((f"splits.{split}", whole(st.documents) and whole(st.tokens)))
        checks += [(f"splits.{split}.shards.{i}", isinstance(s.name, str) and whole(s.documents) and whole(s.tokens)
                    and whole(s.loss_tokens, True) and whole(s.max_id, True)) for i, s in enumerate(st.shards)]
    checks += [(f"files.{rel}", whole(e.bytes) and isinstance(e.sha256, str)) for rel, e in m.files.items()]
    return next((name for name, ok in checks if not ok), None)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def vouched_by(st: os.stat_result, record: os.stat_result | None) -> bool:
    """Does a record (manifest.json, checksums.json: written after hashing the files it lists, its
    sizes already compared) still describe a file of stat `st`, so that its recorded sha256 can stand
    in for hashing it again? Its content must be older than the record by at least one timestamp tick
    (a same-size rewrite in the record's own tick, or any later, shows as an mtime not below it), and
    nothing about it may have changed since the record was written (ctime: an edit whose mtime was set
    back, a replaced inode). Bit rot keeps both: `shards verify DIR` hashes everything."""
    return record is not None and st.st_mtime_ns < record.st_mtime_ns and st.st_ctime_ns <= record.st_ctime_ns


def read_manifest(directory: str | Path) -> Manifest:
    p = Path(directory) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p}: no manifest — not a shard directory, or its pipeline has not finished")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from None
    return Manifest.from_dict(d, str(p))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    p = Path(directory) / MANIFEST
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, p)
    return p


def find_shards(directory: str | Path, split: str) -> list[Path]:
    """Complete shards of a split (those with metadata), sorted by name."""
    d = Path(directory) / split
    return sorted(p.with_suffix("") for p in d.glob("*" + METADATA)) if d.is_dir() else []


def build_manifest(
    directory: str | Path,
    tokenizer: TokenizerInfo,
    splits: tuple[str, ...] = ("train", "val"),
    source: str = "",
    filters: list[str] | None = None,
    seeds: dict | None = None,
    extra: dict | None = None,
    shards: dict[str, list[Path]] | None = None,
) -> Manifest:
    """Scan finished shards under DIR/<split>/ (or the `shards` listed per split, anywhere under DIR)
    and describe them (counts and sha256 per file)."""
    import numpy as np

    from .format import INDEX, LOSS, TOKENS, dtype_for_vocab, max_id, open_shard, shard_file

    directory = Path(directory)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    out_splits: dict[str, SplitStats] = {}
    files: dict[str, FileEntry] = {}
    for split in splits:
        stats = SplitStats()
        for ds in (shards[split] if shards is not None else find_shards(directory, split)):
            meta = read_metadata(ds)
            if meta.dtype != dtype:
                raise ValueError(f"{ds}: written as {meta.dtype.name}, but {tokenizer.name} needs {dtype.name}")
            shard = open_shard(ds)
            rel = ds.relative_to(directory).as_posix()
            loss_tokens = int(np.count_nonzero(shard.loss)) if shard.loss is not None else None
            stats.shards.append(ShardStats(rel, shard.documents, int(shard.offsets[-1]), loss_tokens,
                                           max_id(shard.tokens)))
            stats.documents += shard.documents
            stats.tokens += int(shard.offsets[-1])
            for suffix in (TOKENS, INDEX, LOSS, METADATA):
                f = shard_file(ds, suffix)
                if f.exists():
                    files[f.relative_to(directory).as_posix()] = FileEntry(f.stat().st_size, sha256_file(f))
        out_splits[split] = stats
    return Manifest(
        tokenizer=tokenizer,
        dtype=dtype.name,
        splits=out_splits,
        files=dict(sorted(files.items())),
        source=source,
        filters=list(filters or []),
        seeds=dict(seeds or {}),
        extra=dict(extra or {}),
    )


def write_source(directory: str | Path, shards: dict, info: TokenizerInfo, *, dtype=None, name: str | None = None,
                 with_loss: bool = False, manifest: bool = True, **manifest_kw) -> Path:
    """A shard source from documents already tokenized: each `shards` entry ("train/00000": documents)
    becomes one shard under `directory`, a document being an id array, or an (ids, loss mask) pair
    with `with_loss`; then the manifest for `info` (`manifest_kw` go to build_manifest; manifest=False
    leaves it unwritten). `name` is the tokenizer name in the shards' own metadata and `dtype` their
    id type (defaults: info's name, and what its vocabulary needs)."""
    import numpy as np

    from .format import ShardWriter, dtype_for_vocab

    directory = Path(directory)
    dtype = np.dtype(dtype) if dtype is not None else dtype_for_vocab(info.vocab_size)
    for rel, docs in shards.items():
        with ShardWriter(directory / rel, dtype, name or info.name, with_loss=with_loss) as w:
            w.write_many([d[0] for d in docs], [d[1] for d in docs]) if with_loss else w.write_many(list(docs))
    if manifest:
        write_manifest(directory, build_manifest(directory, info, **manifest_kw))
    return directory


# ------------------------------------------------------------------------- split rule, decontamination


def split_rule(m: Manifest) -> dict:
    """How a source decided train/val: {key, seed, val_fraction, recorded}. A manifest written before
    split keys were recorded was split by the old id rule (the id, or the raw text without one), so
    its key reads "id" with recorded=False; a "text" key without `split_normalization` hashed the raw
    text, not the normalised one, and reads "text (raw)"."""
    key = m.extra.get("split_key")
    recorded = key is not None
    if key in (None, "auto"):
        key = "id"
    elif key == "text" and "split_normalization" not in m.extra:
        key = "text (raw)"
    return {"key": key, "seed": m.seeds.get("split_seed"), "val_fraction": m.seeds.get("val_fraction"),
            "recorded": recorded}


def _describe_split(rule: dict) -> str:
    key = f"split key {rule['key']}" if rule["recorded"] else \
        "split key not recorded (an older manifest: the old id rule assumed)"
    return f"{key}, seed {rule['seed']}, val_fraction {rule['val_fraction']}"


def split_conflict(sources) -> str | None:
    """For a curriculum's sources, [(name, Manifest), ...]: None when every source split its documents
    by the same rule (key, seed and val fraction), so a page in several sources is in the same split
    in each; else one line naming the first source that differs from the first source, and both
    rules. A different key or seed, or a larger val fraction, puts pages one source holds out into
    another's train."""
    sources = list(sources)
    if len(sources) < 2:
        return None
    first, base = sources[0][0], split_rule(sources[0][1])
    for name, m in sources[1:]:
        rule = split_rule(m)
        if any(rule[k] != base[k] for k in ("key", "seed", "val_fraction")):
            return (f"sources '{first}' ({_describe_split(base)}) and '{name}' ({_describe_split(rule)}) were "
                    "split by different rules, so a page can be val in one and train in the other: rebuild them "
                    "with the same --split-key, --split-seed and --val-fraction")
    return None


def decontaminated_tasks(m: Manifest) -> set[str]:
    """The eval tasks (lm-eval names) this source's documents were decontaminated against; empty for a
    source built without --decontaminate (or before it existed)."""
    decont = m.extra.get("decontamination") or {}
    return set(decont.get("tasks") or [])
