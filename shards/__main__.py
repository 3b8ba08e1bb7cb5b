"""`python -m shards COMMAND ...`: inspect and verify shard directories (shards/check.py), and move
them through object storage (upload/download/sync, from shards/storage.py when present).

Adding commands without editing this file: a module exposing `add_X_commands(subparsers)` that adds
argparse sub-parsers, each with `set_defaults(func=handler)`, where `handler(args) -> int` (exit code).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .check import add_check_commands

# (module, hook) pairs registered after inspect/verify; optional modules are skipped when absent.
PLUGINS = (("shards.storage", "add_storage_commands"),)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shards",
        description="ShardLoom token shards (datatrove .ds layout + manifest.json): inspect, verify, transfer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_check_commands(sub)
    for module, hook in PLUGINS:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            getattr(importlib.import_module(module), hook)(sub)
        except (ImportError, AttributeError) as e:  # e.g. boto3 missing: the other commands still work
            print(f"warning: {module} commands unavailable ({e})", file=sys.stderr)
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
