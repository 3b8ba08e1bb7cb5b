"""`python -m shards COMMAND ...`: inspect and verify shard directories (shards/check.py), adopt shards
made elsewhere (shards/adopt.py), report what several sources share (overlap: shards/overlap.py), and
move them through S3-compatible object storage (upload/download/sync over shards/storage.py).

Every command is an argparse sub-parser with `set_defaults(func=handler)`, `handler(args) -> int`
(the exit code).
"""
from __future__ import annotations

import argparse
import sys

from .adopt import add_adopt_command
from .check import add_check_commands
from .overlap import add_overlap_command
from .storage import (DEFAULT_MULTIPART_CHUNKSIZE, DEFAULT_MULTIPART_THRESHOLD, MiB, StorageError, download, sync,
                      upload)

# ------------------------------------------------------------------------------ upload|download|sync


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint, e.g. https://<account>.r2.cloudflarestorage.com for R2")
    p.add_argument("--profile", default=None, help="AWS profile from ~/.aws/config (default: the usual chain)")
    p.add_argument("--region", default=None, help="region name (R2: auto)")
    p.add_argument("--workers", type=int, default=8, help="files transferred in parallel (default 8)")
    p.add_argument("--multipart-threshold-mib", type=int, default=DEFAULT_MULTIPART_THRESHOLD // MiB,
                   help="files at least this big go multipart (default %(default)s MiB)")
    p.add_argument("--multipart-chunk-mib", type=int, default=DEFAULT_MULTIPART_CHUNKSIZE // MiB,
                   help="part size (default %(default)s MiB, S3 minimum 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _kwargs(args) -> dict:
    return dict(endpoint_url=args.endpoint_url, profile=args.profile, region=args.region, workers=args.workers,
                multipart_threshold=args.multipart_threshold_mib * MiB,
                multipart_chunksize=args.multipart_chunk_mib * MiB, progress=not args.no_progress)


def _run(fn) -> int:
    try:
        summary = fn()
    except StorageError as e:
        print(f"error: {e}", flush=True, file=sys.stderr)
        return 1
    print(summary.line())
    return 0


def _cmd_upload(args) -> int:
    if args.listing:  # not a dataset: the JSON {file: sha256} names what to send, and goes last
        from .storage import upload_files

        return _run(lambda: upload_files(args.dir, args.uri, args.listing, **_kwargs(args)))
    return _run(lambda: upload(args.dir, args.uri, force=args.force, **_kwargs(args)))


def _cmd_download(args) -> int:
    return _run(lambda: download(args.uri, args.dir, **_kwargs(args)))


def _cmd_sync(args) -> int:
    return _run(lambda: sync(args.src, args.dst, force=args.force, **_kwargs(args)))


def add_storage_commands(subparsers) -> None:
    """Register `upload`, `download` and `sync` on the `python -m shards` subparsers; each sets
    `func=` to a callable taking the parsed args and returning an exit code."""
    p = subparsers.add_parser("upload", help="upload a shard directory to s3://bucket/prefix (manifest last)")
    p.add_argument("dir")
    p.add_argument("uri", metavar="s3://bucket/prefix")
    p.add_argument("--force", action="store_true", help="upload even without manifest.json (incomplete dataset)")
    p.add_argument("--listing", metavar="FILE", help="not a dataset: FILE in DIR is a JSON {file: sha256} of what to "
                                                    "send (a checkpoint's checksums.json), verified, FILE last")
    _common_args(p)
    p.set_defaults(func=_cmd_upload)

    p = subparsers.add_parser("download", help="download s3://bucket/prefix into a directory, verified")
    p.add_argument("uri", metavar="s3://bucket/prefix")
    p.add_argument("dir")
    _common_args(p)
    p.set_defaults(func=_cmd_download)

    p = subparsers.add_parser("sync", help="transfer only what differs; direction from which side is s3://")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="upload even without manifest.json")
    _common_args(p)
    p.set_defaults(func=_cmd_sync)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shards",
        description="ShardLoom token shards (datatrove .ds layout + manifest.json): inspect, verify, adopt, overlap, transfer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_check_commands(sub)
    add_adopt_command(sub)
    add_overlap_command(sub)
    add_storage_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()  # no command: help, not an error
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
