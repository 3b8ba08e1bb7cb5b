"""Dedup across corpora: keep each page once over several sources, or keep every source's val out of
every train.

    python -m pipelines.cross_dedup --input data/raw/fineweb-edu data/raw/ultra-fineweb data/raw/finemath \\
        data/raw/cosmopedia data/raw/ultradata-math --names fineweb-edu ultra-fineweb finemath cosmopedia \\
        ultradata-math --text-key text content text text content --output data/clean --mode first

--mode first: a page (exact copy, or a MinHash near copy) held by several sources is kept only in the
  first of them in --input order; its copies in later sources are removed. Copies within one source
  are that source's own `dedup` stage's business.
--mode val: every train document that is a copy of any source's val document (as the tokenize stage
  will split them: --split-key/--split-seed/--val-fraction, which must match the later tokenize) is
  removed from every source, its own included, so no val page is trained on anywhere.

Matching is `shards.overlap` (exact: normalised text; near: datatrove's MinHash signatures and buckets,
joined transitively as datatrove's cluster stage does). Two passes over each source: the first signs
every document (in-process), the second is a datatrove pipeline per source, reader -> `DropListed`
-> a writer that keeps the source's own column names, so the corpus module reads OUT/<name>/kept/ with
its defaults. Removed documents go to OUT/<name>/removed/cross_dedup/, counted as
`dropped_cross_dedup`; OUT/<name>/kept/shardloom-applied.yaml carries the count (and anything applied
before) into the manifest of the shards tokenized from it; OUT/cross_dedup.json holds the overlap
report and the counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter

from .readers import InputError, make_reader
from .steps import POSITION_ID_FLAG, SPLIT_KEYS, assign_split, split_key

FILTER = "cross_dedup"


class DropListed(BaseFilter):
    """Drop the documents at the positions listed in `plan` (an .npz of sorted `drop` positions and
    a `reason` per position), counting positions in the order this single task reads them."""

    name = "🔁 Cross-source dedup"

    def __init__(self, plan: str, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.plan = plan
        self._drop, self._reasons, self._seen = None, None, 0

    def filter(self, doc):
        if self._drop is None:
            with np.load(self.plan) as z:
                self._drop, self._reasons = z["drop"], z["reason"]
        i = int(np.searchsorted(self._drop, self._seen))
        hit = i < len(self._drop) and self._drop[i] == self._seen
        self._seen += 1
        if not hit:
            return True
        doc.metadata["cross_dedup"] = str(self._reasons[i])
        return False, FILTER


class SourceColumnsWriter(JsonlWriter):
    """JSONL rows under the source's own text and id column names, metadata as columns: what the
    corpus module's reader takes with its defaults (Ultra-FineWeb: content/uid, meta for the url)."""

    def __init__(self, output_folder, text_key: str, id_key: str, **kw):
        super().__init__(output_folder, output_filename="${rank}.jsonl.gz", **kw)
        self.text_key, self.id_key = text_key, id_key

    def _default_adapter(self, document) -> dict:
        meta = {k: v for k, v in document.metadata.items() if k not in (POSITION_ID_FLAG, "file_path")}
        row = {**meta, self.text_key: document.text}
        if document.id and not document.metadata.get(POSITION_ID_FLAG):
            row[self.id_key] = document.id
        return row


# ---------------------------------------------------------------------------------------- planning


def read_docs(path: str, text_key: str, id_key: str, limit: int):
    """Documents of one source, in the order a 1-task pipeline over it reads them."""
    reader = make_reader(path, limit=limit, text_key=text_key, id_key=id_key)
    yield from reader.run(None, 0, 1)


def sign(args, i: int):
    """shards.overlap.Source for input i: signatures, and the split the tokenize stage will give each."""
    from shards.overlap import sign_source

    def docs():
        for doc in read_docs(args.input[i], args.text_key[i], args.id_key[i], args.limit):
            yield doc.text, assign_split(split_key(doc, args.split_key)[1], args.split_seed, args.val_fraction) == "val"

    return sign_source(args.names[i], args.input[i], "raw", docs())


def plan(sources, mode: str) -> list[tuple[np.ndarray, list[str]]]:
    """Per source: the positions to drop and why (the source a page is kept in / whose val it copies)."""
    from shards.overlap import clusters, removals

    drops = removals(sources, mode)
    label = clusters(sources)
    src = np.concatenate([np.full(s.documents, i) for i, s in enumerate(sources)])
    val = np.concatenate([s.val for s in sources])
    owner = np.full(len(label), len(sources))  # per cluster: the source it is kept in / whose val it holds
    if mode == "first":
        np.minimum.at(owner, label, src)
    else:
        np.minimum.at(owner, label[val], src[val])
    cuts = np.cumsum([0] + [s.documents for s in sources])
    out = []
    for i, drop in enumerate(drops):
        pos = np.flatnonzero(drop)
        why = "kept in {}" if mode == "first" else "copy of a val document of {}"
        out.append((pos, [why.format(sources[k].name) for k in owner[label[cuts[i] + pos]]]))
    return out


# ---------------------------------------------------------------------------------------- running


def write_source(args, i: int, drop: np.ndarray, reasons: list[str], work: Path, documents: int) -> dict:
    """The second pass over input i: everything but `drop` to OUT/<name>/kept/ (datatrove pipeline)."""
    from datatrove.executor import LocalPipelineExecutor

    from .applied import read_applied, write_applied
    from .filters import removed_writer

    name, out = args.names[i], Path(args.output) / args.names[i]
    plan_file = work / f"{name}.npz"
    np.savez(plan_file, drop=drop, reason=np.array(reasons, dtype=str))
    reader = make_reader(args.input[i], limit=args.limit, text_key=args.text_key[i], id_key=args.id_key[i])
    LocalPipelineExecutor([reader, DropListed(str(plan_file), exclusion_writer=removed_writer(str(out), FILTER)),
                           SourceColumnsWriter(str(out / "kept"), args.text_key[i], args.id_key[i])],
                          tasks=1, workers=1, logging_dir=str(work / "logs" / name), skip_completed=False).run()
    upstream = read_applied(args.input[i])
    note = (f"cross-source dedup ({args.mode}, with {', '.join(n for n in args.names if n != name)}): removed "
            f"{len(drop):,} of {documents:,} (exact copies + datatrove MinHash near copies)")
    if args.mode == "val":
        note += f"; split key {args.split_key}, seed {args.split_seed}, val_fraction {args.val_fraction}"
    write_applied(str(out / "kept"), upstream["filters"] + [note], upstream["decontamination"])
    return {"name": name, "input": args.input[i], "documents": documents, "removed": int(len(drop)),
            "kept": str(out / "kept")}


def check_args(args) -> None:
    n = len(args.input)
    if n < 2:
        raise InputError("--input: give at least two corpora")
    args.names = args.names or [Path(p.rstrip("/")).name for p in args.input]
    for flag in ("names", "text_key", "id_key"):
        values = getattr(args, flag)
        if len(values) == 1 and flag != "names":
            setattr(args, flag, values * n)
        elif len(values) != n:
            raise InputError(f"--{flag.replace('_', '-')}: {len(values)} values for {n} inputs (give one, or one per input)")
    if len(set(args.names)) != n:
        raise InputError(f"--names: two sources share a name ({args.names}); pass --names")
    if not 0.0 <= args.val_fraction <= 1.0:
        raise InputError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")


def run(args) -> dict:
    from shards.overlap import report

    check_args(args)
    for path in args.input:
        make_reader(path)  # every input checked before the long first pass
    out = Path(args.output)
    work = out / ".cross_dedup"
    work.mkdir(parents=True, exist_ok=True)
    sources = [sign(args, i) for i in range(len(args.input))]
    before = report(sources)
    results = [write_source(args, i, drop, why, work, sources[i].documents)
               for i, (drop, why) in enumerate(plan(sources, args.mode))]
    summary = {"mode": args.mode, "sources": results, "overlap_before": before}
    (out / "cross_dedup.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"  {r['name']:<24} removed {r['removed']:>9,} of {r['documents']:>11,}  -> {r['kept']}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.cross_dedup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="corpus folders/files (parquet or jsonl), in rank order")
    p.add_argument("--names", nargs="+", help="a name per input (default: folder names): OUT/<name>/")
    p.add_argument("--text-key", nargs="+", default=["text"], help="text column, one for all or one per input")
    p.add_argument("--id-key", nargs="+", default=["id"], help="id column, one for all or one per input")
    p.add_argument("--output", required=True)
    p.add_argument("--mode", choices=("first", "val"), default="first")
    p.add_argument("--split-key", choices=SPLIT_KEYS, default="text", help="val mode: as the later tokenize")
    p.add_argument("--split-seed", type=int, default=1337, help="val mode: as the later tokenize")
    p.add_argument("--val-fraction", type=float, default=0.001, help="val mode: as the later tokenize")
    p.add_argument("--limit", type=int, default=-1, help="documents read per input; -1 all")
    return p


def main(argv=None) -> int:
    from .cli import run_command

    args = build_parser().parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    sys.exit(main())
