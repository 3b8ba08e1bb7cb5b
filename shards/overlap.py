"""`python -m shards overlap SOURCE...`: which documents several sources share, exactly and nearly.

A source is a shard directory (its documents decoded with the manifest's tokenizer, their split the
shard folder they sit in) or a raw corpus file/folder (parquet, jsonl, jsonl.gz/.zst/.bz2; the text
in `text` or `content`, or --text-key; the split the pipelines' default rule would give it: the
normalised text hashed with --split-seed against --val-fraction).

Exact copies: equal text after `shards.text.normalize_text` (NFC, whitespace collapsed), the split
key, so an exact copy is by construction in the same split everywhere. Near copies: MinHash, with
datatrove's own signature code and configuration (`MinhashDedupSignature.get_signature`, a
`MinhashConfig` of 5-word shingles, 14 buckets of 8 hashes, seed 1: the `dedup` stage's settings); two
documents are near copies when any bucket of their signatures is equal, as datatrove's bucket stage
decides. The shingles are hashed by `shards.ngrams` (the words `shards.text.word_bytes` separates)
instead of datatrove's spaCy word splitting, which runs at about 0.1 MB/s.

For every pair of sources the report gives the pages shared exactly, the documents of each with a near
copy (and no exact copy) in the other, and how many of each one's val documents have a copy (exact or
near) in the other's train. `clusters` and `removals` give the cross-source dedup
(`pipelines.cross_dedup`) its decisions from the same signatures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .text import normalize_text, text_split

NUM_BUCKETS, HASHES_PER_BUCKET, SHINGLE_WORDS, MINHASH_SEED = 14, 8, 5, 1
RAW_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".jsonl.bz2")
TEXT_KEYS = ("text", "content")  # FineWeb & co. / Ultra-FineWeb, UltraData-Math


def minhash_config():
    """The MinHash settings the `dedup` stage runs datatrove with (pipelines.filters.minhash_stages)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(n_grams=SHINGLE_WORDS, num_buckets=NUM_BUCKETS, hashes_per_bucket=HASHES_PER_BUCKET,
                         seed=MINHASH_SEED, hash_config=HashConfig(precision=64))


@dataclass
class Source:
    """One source's documents as the comparison needs them: per document an exact key (uint64 of the
    normalised text), one key per MinHash bucket (0: too short to sign), and whether it is val."""

    name: str
    path: str
    kind: str  # shards | raw
    exact: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    buckets: np.ndarray = field(default_factory=lambda: np.zeros((0, NUM_BUCKETS), np.uint64))
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def documents(self) -> int:
        return len(self.exact)


# --------------------------------------------------------------------------------------- signatures


class Signer:
    """Exact keys and MinHash bucket keys for batches of texts (datatrove's signature code)."""

    def __init__(self):
        import tempfile

        from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

        # only get_signature and its parameters are used: the folder is never written
        self.sig = MinhashDedupSignature(output_folder=tempfile.gettempdir(), config=minhash_config())

    def sign(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from .ngrams import Windows, sorted_unique

        exact = np.fromiter((exact_key(t) for t in texts), np.uint64, len(texts))
        bands = np.zeros((len(texts), NUM_BUCKETS, HASHES_PER_BUCKET), np.uint64)
        w = Windows(texts, SHINGLE_WORDS)
        doc_of = np.searchsorted(w.first_word, w.window, side="right") - 1
        cuts = np.searchsorted(doc_of, np.arange(len(texts) + 1))
        signed = np.flatnonzero(np.diff(cuts))
        for d in signed.tolist():
            shingles = sorted_unique(w.hashes[cuts[d] : cuts[d + 1]])
            bands[d] = self.sig.get_signature(shingles.reshape(-1, 1))
        buckets = np.zeros((len(texts), NUM_BUCKETS), np.uint64)
        buckets[signed] = band_keys(bands[signed])
        return exact, buckets


def exact_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize_text(text).encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def band_keys(bands: np.ndarray) -> np.ndarray:
    """(documents, buckets, hashes) -> one uint64 per bucket: equal buckets, equal keys; never 0."""
    from .ngrams import _MULT, _mix

    keys = bands[..., 0].copy()
    for k in range(1, bands.shape[-1]):
        keys *= _MULT
        keys += bands[..., k]
    return _mix(keys) | np.uint64(1)


def sign_source(name: str, path: str, kind: str, docs, batch: int = 1000) -> Source:
    """A Source from an iterable of (text, is_val)."""
    signer = Signer()
    exact, buckets, val, texts, flags = [], [], [], [], []

    def flush():
        e, b = signer.sign(texts)
        exact.append(e), buckets.append(b), val.append(np.array(flags, dtype=bool))
        texts.clear(), flags.clear()

    for text, is_val in docs:
        texts.append(text)
        flags.append(is_val)
        if len(texts) >= batch:
            flush()
    if texts:
        flush()
    src = Source(name, path, kind)
    if exact:
        src.exact, src.buckets, src.val = np.concatenate(exact), np.concatenate(buckets), np.concatenate(val)
    return src


# ------------------------------------------------------------------------------------------ reading


def shard_documents(directory: str | Path, limit: int | None = None):
    """(text, is_val) of a shard directory's documents, decoded with its manifest's tokenizer."""
    from .check import _load_tokenizer
    from .manifest import read_manifest
    from .reader import open_split

    m = read_manifest(directory)
    tok, note = _load_tokenizer(m.tokenizer.name, m, None)
    if tok is None:
        raise ValueError(f"{directory}: cannot decode its documents: {note}")
    drop = {m.tokenizer.eos_id} | ({m.tokenizer.bos_id} if m.tokenizer.bos_id is not None else set())
    n = 0
    for split in ("train", "val"):
        if split not in m.splits or not m.splits[split].documents:
            continue
        for shard in open_split(directory, split).shards:
            for i in range(shard.documents):
                if limit is not None and n >= limit:
                    return
                ids = shard.document(i).tolist()
                while ids and ids[-1] in drop:
                    ids.pop()
                if ids and ids[0] in drop:
                    ids = ids[1:]
                n += 1
                yield tok.decode(ids), split == "val"


def raw_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(RAW_SUFFIXES)) if p.is_dir() else []
    if not files:
        raise ValueError(f"{p}: no shard manifest and no .parquet/.jsonl(.gz/.zst/.bz2) files")
    return files


def raw_texts(path: str | Path, text_key: str | None = None, limit: int | None = None):
    """Texts of a raw corpus file or folder: the `text_key` field, else `text`, else `content`."""
    n = 0
    for f in raw_files(path):
        for text in _file_texts(f, text_key):
            if limit is not None and n >= limit:
                return
            if isinstance(text, str) and text.strip():
                n += 1
                yield text


def _file_texts(f: Path, text_key: str | None):
    keys = (text_key,) if text_key else TEXT_KEYS
    if f.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        col = next((k for k in keys if k in pf.schema_arrow.names), None)
        if col is None:
            raise ValueError(f"{f}: no {' or '.join(keys)} column (columns: {', '.join(pf.schema_arrow.names[:12])})")
        for batch in pf.iter_batches(columns=[col], batch_size=4096):
            yield from batch.column(0).to_pylist()
        return
    from fsspec.core import open as fsopen

    with fsopen(str(f), "rt", compression="infer", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                yield next((row[k] for k in keys if k in row), None) if isinstance(row, dict) else None


def load_source(path: str, name: str, text_key: str | None = None, limit: int | None = None,
                seed: int = 1337, val_fraction: float = 0.001) -> Source:
    """A shard directory (manifest.json) or a raw corpus, signed."""
    if (Path(path) / "manifest.json").exists():
        return sign_source(name, path, "shards", shard_documents(path, limit))
    docs = ((t, text_split(t, seed, val_fraction) == "val") for t in raw_texts(path, text_key, limit))
    return sign_source(name, path, "raw", docs)


# ------------------------------------------------------------------------------------------ matching


def _group_or(keys: np.ndarray, bits: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per document, the OR of `bits` over every document with the same key (rows not `valid`: 0)."""
    out = np.zeros(len(keys), np.uint64)
    idx = np.flatnonzero(valid) if valid is not None else np.arange(len(keys))
    if not len(idx):
        return out
    order = idx[np.argsort(keys[idx], kind="stable")]
    k = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    group = np.bitwise_or.reduceat(bits[order], starts)
    out[order] = np.repeat(group, np.diff(np.append(starts, len(order))))
    return out


def _stack(sources: list[Source]):
    if len(sources) > 32:
        raise ValueError(f"at most 32 sources at once, got {len(sources)}")
    src = np.concatenate([np.full(s.documents, i, np.uint64) for i, s in enumerate(sources)])
    val = np.concatenate([s.val for s in sources]).astype(np.uint64)
    bits = np.left_shift(np.uint64(1), 2 * src + val)  # bit 2i: a train document of source i; 2i+1: val
    exact = np.concatenate([s.exact for s in sources])
    buckets = np.concatenate([s.buckets for s in sources])
    return src, val.astype(bool), bits, exact, buckets


def copy_masks(sources: list[Source]) -> tuple[np.ndarray, np.ndarray]:
    """Per document (all sources, in order): which (source, split) bits hold an exact copy of it, and
    which hold an exact or near copy."""
    _, _, bits, exact, buckets = _stack(sources)
    same = _group_or(exact, bits)
    near = same.copy()
    for b in range(NUM_BUCKETS):
        near |= _group_or(buckets[:, b], bits, buckets[:, b] != 0)
    return same, near


def report(sources: list[Source]) -> dict:
    src, val, bits, exact, _ = _stack(sources)
    same, near = copy_masks(sources)
    both = lambda i: np.uint64(3 << (2 * i))  # noqa: E731 - either split of source i
    train = lambda i: np.uint64(1 << (2 * i))  # noqa: E731
    pairs = []
    for i in range(len(sources)):
        for j in range(i + 1, len(sources)):
            a, b = src == i, src == j
            shared = np.unique(exact[a & ((same & both(j)) != 0)])
            row = {"a": sources[i].name, "b": sources[j].name, "exact": int(len(shared))}
            for x, y, xi, yj in ((a, b, i, j), (b, a, j, i)):
                key = f"{sources[xi].name}->{sources[yj].name}"
                row[f"near {key}"] = int((x & ((near & both(yj)) != 0) & ((same & both(yj)) == 0)).sum())
                row[f"val in train {key}"] = int((x & val & ((near & train(yj)) != 0)).sum())
            pairs.append(row)
    return {"sources": [{"name": s.name, "path": s.path, "kind": s.kind, "documents": s.documents,
                         "val": int(s.val.sum())} for s in sources], "pairs": pairs,
            "near_rule": f"datatrove MinHash: {SHINGLE_WORDS}-word shingles, {NUM_BUCKETS} buckets x "
                         f"{HASHES_PER_BUCKET} hashes, any equal bucket"}


def clusters(sources: list[Source]) -> np.ndarray:
    """A component label per document: exact copies and near copies (any equal bucket), transitively,
    across all sources (datatrove's cluster stage does the same union within one corpus)."""
    _, _, _, exact, buckets = _stack(sources)
    n = len(exact)
    edges = [_group_edges(exact, np.ones(n, bool))]
    edges += [_group_edges(buckets[:, b], buckets[:, b] != 0) for b in range(NUM_BUCKETS)]
    u = np.concatenate([e[0] for e in edges])
    v = np.concatenate([e[1] for e in edges])
    label = np.arange(n)
    while True:  # min-label propagation with pointer jumping: a few rounds for real duplicate graphs
        nxt = label.copy()
        m = np.minimum(label[u], label[v])
        np.minimum.at(nxt, u, m)
        np.minimum.at(nxt, v, m)
        nxt = nxt[nxt]
        if np.array_equal(nxt, label):
            return label
        label = nxt


def _group_edges(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each document to the first document with the same key."""
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(keys[idx], kind="stable")]
    k = keys[order]
    new = np.concatenate(([True], k[1:] != k[:-1])) if len(k) else np.zeros(0, bool)
    head = order[np.flatnonzero(new)][np.cumsum(new) - 1] if len(k) else order
    return head, order


def removals(sources: list[Source], mode: str = "first") -> list[np.ndarray]:
    """Per source, which documents the cross-source dedup removes.

    first: every page is kept once, in the first source (in the order given) that holds a copy of
    it; copies in later sources go (copies within one source are left to that source's own dedup).
    val: any train document that is a copy (exact or near) of some source's val document goes, from
    every source, its own included, so no val page is trained on anywhere."""
    if mode not in ("first", "val"):
        raise ValueError(f"mode must be 'first' or 'val', got {mode!r}")
    src, val, _, _, _ = _stack(sources)
    label = clusters(sources)
    if mode == "first":
        first = np.full(len(label), len(sources), np.int64)
        np.minimum.at(first, label, src.astype(np.int64))
        drop = src.astype(np.int64) != first[label]
    else:
        has_val = np.zeros(len(label), bool)
        has_val[label[val]] = True
        drop = has_val[label] & ~val
    cuts = np.cumsum([0] + [s.documents for s in sources])
    return [drop[cuts[i] : cuts[i + 1]] for i in range(len(sources))]


# ------------------------------------------------------------------------------------------ command


def format_report(r: dict) -> str:
    lines = ["sources:"]
    for s in r["sources"]:
        lines.append(f"  {s['name']:<24} {s['kind']:<6} {s['documents']:>11,} documents ({s['val']:,} val)  {s['path']}")
    lines += ["", f"near copies: {r['near_rule']}", "",
              f"{'pair':<40} {'exact':>9} {'near a->b':>10} {'near b->a':>10} {'a val in b train':>17} {'b val in a train':>17}"]
    for p in r["pairs"]:
        ab, ba = f"{p['a']}->{p['b']}", f"{p['b']}->{p['a']}"
        lines.append(f"{p['a'] + ' ~ ' + p['b']:<40} {p['exact']:>9,} {p['near ' + ab]:>10,} {p['near ' + ba]:>10,} "
                     f"{p['val in train ' + ab]:>17,} {p['val in train ' + ba]:>17,}")
    return "\n".join(lines)


def source_names(paths: list[str], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(paths):
            raise ValueError(f"--names: {len(names)} names for {len(paths)} sources")
        return names
    out = []
    for p in paths:
        base = Path(p.rstrip("/")).name or p
        out.append(base if base not in out else f"{base}#{len(out)}")
    return out


def cmd_overlap(args) -> int:
    try:
        names = source_names(args.sources, args.names)
        keys = args.text_key or [None]
        if len(keys) not in (1, len(args.sources)):
            raise ValueError(f"--text-key: give one key, or one per source ({len(args.sources)})")
        sources = [load_source(p, n, keys[i % len(keys)], args.limit, args.split_seed, args.val_fraction)
                   for i, (p, n) in enumerate(zip(args.sources, names))]
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    r = report(sources)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


def add_overlap_command(subparsers) -> None:
    p = subparsers.add_parser("overlap", help="documents shared exactly and nearly between sources (shards or raw)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="shard directory, or raw parquet/jsonl file or folder")
    p.add_argument("--names", nargs="+", help="a name per source (default: folder names)")
    p.add_argument("--text-key", nargs="+", help="raw sources' text field, one for all or one per source "
                                                 "(default: text, else content)")
    p.add_argument("--limit", type=int, default=None, help="documents read per source")
    p.add_argument("--split-seed", type=int, default=1337, help="raw sources: the split seed their shards will use")
    p.add_argument("--val-fraction", type=float, default=0.001, help="raw sources: the val fraction likewise")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_overlap)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.overlap")
    add_overlap_command(p.add_subparsers(dest="command"))
    args = p.parse_args(["overlap", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
