"""`python -m shards adopt DIR --tokenizer NAME_OR_PATH`: our manifest for `.ds` shards made elsewhere.

datatrove's `DocumentTokenizer` (or anyone writing its layout) leaves `NAME.ds`, `.ds.index`,
`.ds.metadata` (and `.ds.loss`) files but no manifest, so the trainer cannot use them. `adopt` checks
each shard as `verify` would (sizes against the token size, the index monotone and ending at the token
count, the loss mask, every id below the tokenizer's vocabulary, the token size the vocabulary needs),
and only when all pass rewrites each metadata's tokenizer name to ours (datatrove reads only the token
size from it) and writes DIR/manifest.json. Layout: DIR/<split>/*.ds, or .ds files directly in DIR
(one split, `--split`, train by default). The manifest's vocabulary hash is the tokenizer's token
mapping, so adopted shards mix with our own shards of the same vocabulary however it was named.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .check import VerifyReport, _check_shard, format_verify
from .format import TOKENS, dtype_for_vocab, rename_tokenizer
from .manifest import MANIFEST, Manifest, build_manifest, write_manifest


class AdoptError(ValueError):
    """Bad input (no folder, no shards, an existing manifest, a tokenizer that does not load)."""


def foreign_shards(directory: Path, flat_split: str = "train") -> dict[str, list[Path]]:
    """{split: [NAME.ds, ...]}: each folder under DIR holding .ds files is a split (named by its
    path), .ds files directly in DIR are `flat_split`."""
    groups: dict[str, list[Path]] = {}
    for ds in sorted(p for p in directory.rglob("*" + TOKENS) if p.is_file()):
        rel = ds.parent.relative_to(directory).as_posix()
        groups.setdefault(flat_split if rel == "." else rel, []).append(ds)
    return groups


def check_shards(directory: Path, groups: dict[str, list[Path]], info) -> VerifyReport:
    """Every shard checked against the tokenizer (`info`), whatever name its metadata gives it."""
    rep = VerifyReport(str(directory))
    manifest = Manifest(tokenizer=info, dtype=dtype_for_vocab(info.vocab_size).name, splits={}, files={})
    for paths in groups.values():
        for ds in paths:
            _check_shard(directory, ds.relative_to(directory).as_posix(), None, manifest, rep, loss_expected=False,
                         check_name=False)
    return rep


def adopt(directory, tokenizer: str, tokenizer_path: str | None = None, split: str = "train",
          source: str = "", force: bool = False) -> tuple[Manifest | None, VerifyReport]:
    """Check DIR's shards against the tokenizer and write DIR/manifest.json when they all pass.
    Returns (manifest, report); the manifest is None when the report has problems."""
    from .tokenizers import resolve_tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise AdoptError(f"{directory}: not a directory")
    if (directory / MANIFEST).exists() and not force:
        raise AdoptError(f"{directory / MANIFEST} exists already (a finished shard dir); --force replaces it")
    groups = foreign_shards(directory, split)
    if not groups:
        raise AdoptError(f"{directory}: no .ds shard files found (in the folder or its subfolders)")
    try:
        tokenizer, tokenizer_path, tok = resolve_tokenizer(tokenizer, tokenizer_path)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise AdoptError(f"tokenizer: {e}") from None
    info = tok.info()
    rep = check_shards(directory, groups, info)
    if not rep.ok:
        return None, rep
    before = sorted({rename_tokenizer(ds, info.name) for paths in groups.values() for ds in paths})
    extra = {"adopted": True, "tokenizer_names_in_metadata": before}
    if tokenizer_path:
        extra["tokenizer_path"] = tokenizer_path
    manifest = build_manifest(directory, info, splits=tuple(groups), source=source or str(directory.resolve()),
                              extra=extra, shards=groups)
    write_manifest(directory, manifest)
    return manifest, rep


def cmd_adopt(args) -> int:
    try:
        manifest, rep = adopt(args.dir, args.tokenizer, args.tokenizer_path, args.split, args.source, args.force)
    except AdoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print(format_verify(rep), file=sys.stderr)
        print(f"error: {args.dir}: not adopted (no manifest written)", file=sys.stderr)
        return 1
    t = manifest.tokenizer
    parts = [f"{s}: {st.documents:,} docs / {st.tokens:,} tokens in {len(st.shards)} shard(s)"
             for s, st in manifest.splits.items()]
    print(f"adopted {args.dir}: {t.name} (vocab {t.vocab_size:,}, {manifest.dtype}, hash {t.vocab_hash[:12]}) — "
          + "; ".join(parts))
    return 0


def add_adopt_command(subparsers) -> None:
    p = subparsers.add_parser("adopt", help="check a folder of datatrove .ds shards and write our manifest for it")
    p.add_argument("dir", help="folder of NAME.ds (+ .index, .metadata, .loss) files, flat or in split subfolders")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the ids are from: qwen3 | cl100k | llama2 | "
                                                      "a tokenizer.json or its folder")
    p.add_argument("--tokenizer-path", help="file for a named tokenizer (llama2's tokenizer.model)")
    p.add_argument("--split", default="train", help="split name for .ds files directly in DIR")
    p.add_argument("--source", default="", help="what the shards were made from (recorded in the manifest)")
    p.add_argument("--force", action="store_true", help="replace an existing manifest.json")
    p.set_defaults(func=cmd_adopt)
