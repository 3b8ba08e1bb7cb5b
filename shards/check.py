"""`python -m shards inspect DIR` and `python -m shards verify DIR`.

inspect: what a shard directory holds (per split: tokenizer, dtype, documents, tokens, shards, mean
document length) and its first document decoded through the tokenizer registry; falls back to raw
ids when the tokenizer cannot be loaded. Works on a directory without a manifest too (a datatrove
output, an unfinished run), from the shards' own metadata.

verify: everything that can be checked without trusting the manifest's numbers: file sizes against
the token size, the index (monotone, ending at the token count), the `.loss` size and values, the
metadata's token size against the manifest dtype, sha256 of every file, files on disk that the
manifest does not list (in split folders, or any `*.ds*`/`*.tmp` file), and every id < vocab_size
(chunked over the memory map, so big shards stay fast and flat in memory) and equal to the manifest's
max_id. The manifest itself too: its dtype and eos_id against its vocab_size, and, when the tokenizer
it names loads here, its vocab_size, vocab_hash, eos_id and bos_id against that tokenizer (else a note
says they went unchecked). Exit 1 with a per-file list of problems, 0 with a one-line summary.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .format import (INDEX, LOSS, METADATA, SUFFIXES, TOKENS, check_layout, dtype_for_vocab, max_id, open_shard,
                     read_metadata, shard_file)
from .manifest import MANIFEST, Manifest, find_shards, read_manifest, sha256_file, split_rule

CHUNK = 1 << 24  # tokens per chunk when scanning ids (32-64 MiB of shard at a time)


# ------------------------------------------------------------------------------------- inspect


def _load_tokenizer(name: str, manifest: Manifest | None, tokenizer_path: str | None):
    """(tokenizer, note): the registry's tokenizer for a manifest, or None and why not."""
    from .tokenizers import REGISTRY, get_tokenizer

    path = tokenizer_path or (manifest.extra.get("tokenizer_path") if manifest else None)
    try:
        if name in REGISTRY:
            tok = get_tokenizer(name, path=path if name == "llama2" else None)
        else:  # a tokenizer.json source: its name is its path, or the manifest remembers the path
            tok = get_tokenizer(path or name)
    except Exception as e:  # any failure here only degrades the display
        return None, f"tokenizer '{name}' unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if manifest and manifest.tokenizer.vocab_hash and tok.vocab_hash != manifest.tokenizer.vocab_hash:
        return tok, f"warning: loaded tokenizer's vocab hash differs from the manifest's ({name}): text may be wrong"
    return tok, ""


def _split_dirs(directory: Path) -> list[str]:
    """Splits of a directory without a manifest: subfolders (or the folder itself) holding shards."""
    names = sorted(p.parent.relative_to(directory).as_posix() for p in directory.rglob("*" + METADATA))
    return sorted(set(names))


def inspect_dir(directory: str | Path, tokenizer_path: str | None = None, max_chars: int = 2000) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    manifest = read_manifest(directory) if (directory / MANIFEST).exists() else None
    out: dict = {"directory": str(directory), "manifest": manifest is not None, "splits": {}}
    if manifest:
        out["tokenizer"] = asdict(manifest.tokenizer)
        out["dtype"] = manifest.dtype
        out.update(source=manifest.source, filters=manifest.filters, seeds=manifest.seeds,
                   split=split_rule(manifest), decontamination=_decont_summary(manifest))
        split_shards = {s: [directory / st.name for st in stats.shards] for s, stats in manifest.splits.items()}
    else:
        split_shards = {s: find_shards(directory, s) for s in _split_dirs(directory)}
    first = None
    for split, paths in split_shards.items():
        row = {"shards": len(paths), "documents": 0, "tokens": 0, "loss_tokens": None, "tokenizer": None, "dtype": None}
        for p in paths:
            try:
                meta = read_metadata(p)
                shard = open_shard(p)
            except (OSError, ValueError) as e:
                row.setdefault("errors", []).append(str(e))
                continue
            row["tokenizer"], row["dtype"] = meta.tokenizer, meta.dtype.name
            row["documents"] += shard.documents
            row["tokens"] += int(shard.offsets[-1])
            if shard.loss is not None:
                row["loss_tokens"] = (row["loss_tokens"] or 0) + int(np.count_nonzero(shard.loss))
            if first is None and shard.documents:
                first = (split, p, shard)
        row["mean_doc_tokens"] = round(row["tokens"] / row["documents"], 1) if row["documents"] else 0.0
        out["splits"][split] = row
    if first is not None:
        split, p, shard = first
        ids = shard.document(0)
        name = manifest.tokenizer.name if manifest else read_metadata(p).tokenizer
        tok, note = _load_tokenizer(name, manifest, tokenizer_path)
        doc = {"shard": p.relative_to(directory).as_posix(), "tokens": int(len(ids)), "note": note}
        if tok is not None:
            text = tok.decode(ids.tolist())
            doc["text"] = text[:max_chars] + ("…" if len(text) > max_chars else "")
        else:
            doc["ids"] = ids[:200].tolist()
        out["first_document"] = doc
    return out


def _decont_summary(manifest: Manifest) -> list[dict]:
    """Each decontamination pass: tasks, n and documents dropped per task."""
    passes = (manifest.extra.get("decontamination") or {}).get("passes") or []
    return [{"tasks": p.get("tasks", []), "ngram": p.get("ngram"), "dropped": p.get("dropped")} for p in passes]


def format_inspect(s: dict) -> str:
    lines = [f"{s['directory']}" + ("" if s["manifest"] else "  (no manifest.json: unfinished or foreign; from shard metadata)")]
    if "tokenizer" in s:
        t = s["tokenizer"]
        bos = t["bos_id"] if t["bos_id"] is not None else "-"
        lines.append(f"tokenizer  {t['name']}  vocab {t['vocab_size']:,}  eos {t['eos_id']}  bos {bos}"
                     f"{' (prepended)' if t['add_bos'] else ''}  vocab hash {t['vocab_hash'][:12]}")
        lines.append(f"dtype      {s['dtype']}")
        if s.get("source"):
            lines.append(f"source     {s['source']}")
        if s.get("filters"):
            lines.append(f"filters    {', '.join(s['filters'])}")
        if s.get("seeds"):
            lines.append("seeds      " + ", ".join(f"{k}={v}" for k, v in s["seeds"].items()))
        if s.get("split"):
            sp = s["split"]
            lines.append(f"split key  {sp['key']}" + ("" if sp["recorded"] else
                                                      " (not recorded: an older manifest, the old id rule assumed)"))
        for d in s.get("decontamination") or []:
            dropped = ", ".join(f"{t} {n:,}" for t, n in d["dropped"].items()) if d.get("dropped") else "not counted"
            lines.append(f"decontam.  {', '.join(d['tasks'])}: {d['ngram']}-gram words; dropped {dropped}")
    header = f"{'split':<10}{'tokenizer':<14}{'dtype':<8}{'shards':>7}{'documents':>12}{'tokens':>15}{'mean len':>10}{'loss tok':>13}"
    lines += ["", header]
    for split, r in s["splits"].items():
        loss = f"{r['loss_tokens']:,}" if r["loss_tokens"] is not None else "-"
        lines.append(f"{split or '.':<10}{str(r['tokenizer']):<13} {str(r['dtype']):<8}{r['shards']:>7}{r['documents']:>12,}"
                     f"{r['tokens']:>15,}{r['mean_doc_tokens']:>10}{loss:>13}")
        for e in r.get("errors", []):
            lines.append(f"  ! {e}")
    d = s.get("first_document")
    if d:
        lines += ["", f"first document ({d['shard']}, {d['tokens']} tokens):"]
        if d["note"]:
            lines.append(f"  [{d['note']}]")
        lines.append(d["text"] if "text" in d else f"ids: {d['ids']}{' …' if d['tokens'] > len(d['ids']) else ''}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    directory: str
    problems: dict[str, list[str]] = field(default_factory=dict)
    shards: int = 0
    documents: int = 0
    tokens: int = 0
    files_hashed: int = 0
    notes: list[str] = field(default_factory=list)  # what could not be checked here, and why

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, problem: str) -> None:
        self.problems.setdefault(file, []).append(problem)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class FileProblem:
    """A file the manifest lists that is missing, of another size, or (checked) of another sha256."""

    rel: str  # path relative to the shard directory, as the manifest lists it
    kind: str  # missing | size | sha256
    got: int | str | None = None
    want: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "size":
            return f"size {self.got}, manifest says {self.want}"
        if self.kind == "sha256":
            return f"sha256 {self.got[:12]}… != manifest {self.want[:12]}…"
        return "missing"


def check_files(directory: str | Path, manifest: Manifest, names=None, checksums: bool = True,
                threads: int | None = None, counter: VerifyReport | None = None) -> list[FileProblem]:
    """The manifest's files (or those of `names` it lists, in that order) against the disk: present,
    the listed size and, with checksums, the listed sha256. Only files of the right size are hashed
    (the slow part: threads, since hashlib releases the GIL); `counter.files_hashed` counts them.
    The one file check that `shards verify`, the loader (sizes) and the trainer (sha256) share."""
    directory = Path(directory)
    rels = list(manifest.files) if names is None else [r for r in names if r in manifest.files]
    problems: list[FileProblem] = []
    to_hash = []
    for rel in rels:
        entry, f = manifest.files[rel], directory / rel
        if not f.exists():
            problems.append(FileProblem(rel, "missing"))
            continue
        size = f.stat().st_size
        if size != entry.bytes:
            problems.append(FileProblem(rel, "size", size, entry.bytes))
        elif checksums:
            to_hash.append((rel, f, entry.sha256))
    if to_hash:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            for (rel, _, want), got in zip(to_hash, pool.map(lambda t: sha256_file(t[1]), to_hash)):
                if counter is not None:
                    counter.files_hashed += 1
                if got != want:
                    problems.append(FileProblem(rel, "sha256", got, want))
    order = {rel: i for i, rel in enumerate(rels)}
    return sorted(problems, key=lambda p: order[p.rel])


def _check_tokenizer(manifest: Manifest, rep: VerifyReport) -> None:
    """The manifest's tokenizer fields: dtype and EOS against the vocabulary size always, and vocab_size,
    vocab_hash, eos_id and bos_id against the tokenizer it names when that loads here."""
    t = manifest.tokenizer
    if manifest.dtype != dtype_for_vocab(t.vocab_size).name:
        rep.add(MANIFEST, f"dtype {manifest.dtype}, but tokenizer.vocab_size {t.vocab_size} is stored as "
                          f"{dtype_for_vocab(t.vocab_size).name}")
    if not 0 <= t.eos_id < t.vocab_size:
        rep.add(MANIFEST, f"tokenizer.eos_id {t.eos_id} is outside its {t.vocab_size} ids")
    tok, note = _load_tokenizer(t.name, manifest, None)
    if tok is None:
        rep.notes.append(f"tokenizer fields unchecked: {note}")
        return
    real = tok.info()
    for name in ("vocab_size", "vocab_hash", "eos_id", "bos_id"):
        if getattr(real, name) != getattr(t, name):
            rep.add(MANIFEST, f"tokenizer.{name} {getattr(t, name)!r}, but tokenizer '{t.name}' has {getattr(real, name)!r}")


def _check_shard(directory: Path, rel: str, stats, manifest: Manifest, rep: VerifyReport, loss_expected: bool,
                 check_name: bool = True) -> None:
    """One shard's problems into `rep`. check_name=False: the tokenizer name in its metadata is not
    compared (`shards adopt` checks shards named by another tool, and then renames them)."""
    path = directory / rel
    dtype = np.dtype(manifest.dtype)
    names = {suffix: shard_file(rel, suffix).as_posix() for suffix in SUFFIXES}
    for suffix in SUFFIXES:
        if not (directory / names[suffix]).exists() and (suffix != LOSS or loss_expected):
            rep.add(names[suffix], "missing")
    if not path.exists() or not shard_file(path, INDEX).exists():
        return
    try:
        meta = read_metadata(path)
        if meta.dtype != dtype:
            rep.add(names[METADATA], f"token_size {meta.token_size} ({meta.dtype.name}) but manifest dtype is {dtype.name}")
        if check_name and meta.tokenizer != manifest.tokenizer.name:
            rep.add(names[METADATA], f"tokenizer '{meta.tokenizer}' but manifest says '{manifest.tokenizer.name}'")
    except (OSError, ValueError) as e:
        rep.add(names[METADATA], str(e))
        meta = None
    layout = check_layout(path, dtype, name=rel)
    for suffix, problem in layout.problems:
        if suffix != LOSS:
            rep.add(names[suffix], problem)
    if layout.tokens < 0:
        return
    n, ends = layout.tokens, layout.ends
    if meta is not None and meta.tokens != n:
        rep.add(names[METADATA], f"says {meta.tokens} tokens, {rel} holds {n}")
    if ends is None:  # the index is not whole uint64 offsets
        return
    if stats is not None and (len(ends) != stats.documents or n != stats.tokens):
        rep.add(rel, f"{len(ends)} documents / {n} tokens, manifest says {stats.documents} / {stats.tokens}")
    loss_path = shard_file(path, LOSS)
    if loss_path.exists():
        loss_problems = [problem for suffix, problem in layout.problems if suffix == LOSS]
        if loss_problems:
            rep.add(names[LOSS], loss_problems[0])
        elif n:
            loss = np.memmap(loss_path, dtype=np.uint8, mode="r")
            ones = 0
            for i in range(0, n, CHUNK):
                block = loss[i : i + CHUNK]
                if int(block.max()) > 1:
                    rep.add(names[LOSS], "mask values other than 0/1")
                    break
                ones += int(np.count_nonzero(block))
            else:
                if stats is not None and stats.loss_tokens is not None and ones != stats.loss_tokens:
                    rep.add(names[LOSS], f"{ones} loss tokens, manifest says {stats.loss_tokens}")
    if n:
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        top = max_id(tokens, CHUNK)
        if top >= manifest.tokenizer.vocab_size:
            where = int(np.flatnonzero(tokens >= manifest.tokenizer.vocab_size)[0])
            rep.add(rel, f"token id {top} >= vocab size {manifest.tokenizer.vocab_size} (first at position {where})")
        if stats is not None and stats.max_id is not None and top != stats.max_id:
            rep.add(rel, f"largest token id {top}, manifest says max_id {stats.max_id}")
    rep.shards += 1
    rep.documents += len(ends)
    rep.tokens += n


def verify_dir(directory: str | Path, checksums: bool = True, threads: int | None = None) -> VerifyReport:
    directory = Path(directory)
    rep = VerifyReport(str(directory))
    if not directory.is_dir():
        rep.add(str(directory), "not a directory")
        return rep
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as e:
        rep.add(MANIFEST, str(e))
        return rep
    _check_tokenizer(manifest, rep)
    listed = set(manifest.files)
    for split, stats in manifest.splits.items():
        docs = toks = 0
        for st in stats.shards:
            loss_expected = st.loss_tokens is not None or shard_file(st.name, LOSS).as_posix() in listed
            _check_shard(directory, st.name, st, manifest, rep, loss_expected)
            docs, toks = docs + st.documents, toks + st.tokens
            for suffix in (TOKENS, INDEX, METADATA) + ((LOSS,) if loss_expected else ()):
                name = shard_file(st.name, suffix).as_posix()
                if name not in listed:
                    rep.add(name, "shard file not listed in the manifest's files")
        if (docs, toks) != (stats.documents, stats.tokens):
            rep.add(MANIFEST, f"split {split}: totals {stats.documents}/{stats.tokens} != sum of its shards {docs}/{toks}")
    for problem in check_files(directory, manifest, checksums=checksums, threads=threads, counter=rep):
        if problem.kind != "missing" or problem.rel not in rep.problems:  # not already reported by the shard checks
            rep.add(problem.rel, str(problem))
    # Files the manifest does not know: anything in a split folder, and shard-like files anywhere.
    split_dirs = {Path(st.name).parent.as_posix() for s in manifest.splits.values() for st in s.shards}
    split_dirs |= set(manifest.splits)
    for f in sorted(directory.rglob("*")):
        if not f.is_file() or f.name == MANIFEST:
            continue
        rel = f.relative_to(directory).as_posix()
        if rel in listed:
            continue
        in_split = f.parent.relative_to(directory).as_posix() in split_dirs
        if in_split or TOKENS in f.name or f.name.endswith(".tmp"):
            why = "partial write left behind (.tmp)" if f.name.endswith(".tmp") else "on disk but not in the manifest"
            rep.add(rel, why)
    return rep


def format_verify(rep: VerifyReport, checksums: bool = True) -> str:
    if rep.ok:
        hashed = f", {rep.files_hashed} checksums verified" if checksums else ", checksums skipped"
        return (f"OK {rep.directory}: {rep.shards} shards, {rep.documents:,} documents, "
                f"{rep.tokens:,} tokens{hashed}" + "".join(f"\n  note: {n}" for n in rep.notes))
    n = sum(len(v) for v in rep.problems.values())
    lines = [f"FAILED {rep.directory}: {n} problem(s) in {len(rep.problems)} file(s)"]
    for f in sorted(rep.problems):
        lines.append(f"  {f}")
        lines += [f"    - {p}" for p in rep.problems[f]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI


def cmd_inspect(args) -> int:
    try:
        s = inspect_dir(args.dir, tokenizer_path=args.tokenizer_path, max_chars=args.max_chars)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=2, ensure_ascii=False) if args.json else format_inspect(s))
    return 0


def cmd_verify(args) -> int:
    rep = verify_dir(args.dir, checksums=not args.no_checksums)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else format_verify(rep, not args.no_checksums))
    return 0 if rep.ok else 1


def add_check_commands(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="summarise a shard directory and decode its first document")
    p.add_argument("dir", help="shard directory (holding manifest.json, train/, val/)")
    p.add_argument("--tokenizer-path", help="tokenizer file to decode with (llama2's tokenizer.model, a tokenizer.json)")
    p.add_argument("--max-chars", type=int, default=2000, help="characters of the first document to show")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    p = subparsers.add_parser("verify", help="check sizes, index, checksums and ids against the manifest")
    p.add_argument("dir", help="shard directory (holding manifest.json)")
    p.add_argument("--no-checksums", action="store_true", help="skip sha256 of every file (the slow part)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_verify)
