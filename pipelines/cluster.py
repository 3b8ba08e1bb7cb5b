"""What the CLI adds around datatrove's Slurm and Ray executors; the scheduling is theirs.

- `run --executor slurm` chains its stages (filter -> dedup -> tokenize -> manifest) as dependent
  Slurm jobs through the executors' own `depends=` (datatrove turns it into `--dependency=afterok:ID`):
  every stage after the first reads a folder that a queued job will write, so its input cannot be
  checked at submit time (`SlurmChain.queued` in pipelines.spec, `queued_reader`).
- `sbatch` missing from PATH is one line before anything is submitted (`check_sbatch`).
- datatrove writes `source VENV_PATH` into each job script, so it wants the activate script; a venv
  folder given with `--slurm-venv .venv` (or `venv_path=.venv`) becomes `/abs/.venv/bin/activate`.
- datatrove gives each task whole input files (file i goes to task i % tasks): with more tasks than
  files the surplus tasks read nothing, which is said once per stage (`warn_idle_tasks`).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .readers import FOLDER_GLOB, InputError, input_files, reader_for


def check_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise InputError("--executor slurm: `sbatch` is not on PATH (submit from a Slurm login node, "
                         "or use --executor local / ray)")


def venv_activate(path: str, flag: str = "--slurm-venv") -> str:
    """The activate script datatrove sources in each job: VENV/bin/activate for a venv folder, the
    file itself for a script. Absolute, since jobs may start in another directory."""
    p = Path(path).expanduser()
    script = p / "bin" / "activate" if p.is_dir() else p
    if not script.is_file():
        raise InputError(f"{flag} {path}: no virtualenv there ({script} not found)")
    return str(script.resolve())


def queued_reader(read, storage_options: dict | None):
    """The reader for a folder a queued job will write (the JSONL.gz our stages write, `text`/`id`;
    `read` a pipelines.spec.ReadSpec); it lists its files when its own job starts."""
    from .filters import folder

    return reader_for(folder(read.path, storage_options or None), "jsonl", FOLDER_GLOB["jsonl"], limit=read.limit,
                      invalid_utf8=read.invalid_utf8)


def count_input_files(reader) -> int | None:
    """How many files a datatrove disk reader will split between its tasks; None when unknown (not a
    reader, a paths file, a hub folder: listing the hub again costs a round trip per directory)."""
    from datatrove.pipeline.readers.base import BaseDiskReader

    if not isinstance(reader, BaseDiskReader) or reader.paths_file:
        return None
    protocol = reader.data_folder.fs.protocol
    if (protocol if isinstance(protocol, str) else protocol[0]) == "hf":
        return None
    try:
        return len(input_files(reader))
    except Exception:  # noqa: BLE001 - a listing problem is the reader's to report, in its own job
        return None


def warn_idle_tasks(pipeline: list, tasks: int, stage: str, files: int | None = None) -> None:
    """`files`: how many input files the pipeline's reader has, when already counted."""
    if files is None:
        files = count_input_files(pipeline[0]) if pipeline else None
    if files and tasks > files:
        print(f"warning: {stage}: --tasks {tasks} but the input has {files} file(s); datatrove gives each task "
              f"whole files, so {tasks - files} of the {tasks} tasks will get no documents "
              f"(use --tasks {files}, or split the input into more files)", file=sys.stderr, flush=True)
