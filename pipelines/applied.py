"""What was already done to a folder of documents, kept beside them for the stage that reads it next.

The filter and dedup stages and the cross-source dedup write FOLDER/shardloom-applied.yaml next to
their JSONL once they have run: the filters applied (as a manifest's `filters` list names them) and the
decontamination passes. A tokenize stage reading that folder puts both into its manifest, so a source
made in separate commands records everything that shaped it. A stage only queued on Slurm writes none
(`run` hands the same record to its tokenize stage itself). The name does not match `*.json*`, so
readers never take it for data.
"""
from __future__ import annotations

from pathlib import Path

APPLIED = "shardloom-applied.yaml"


def write_applied(folder: str, filters: list[str], decontamination: list[dict] | None = None) -> None:
    """Record `filters` and decontamination passes for FOLDER (local folders; s3:// ones carry none)."""
    import yaml

    if "://" in str(folder):
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"filters": list(filters), "decontamination": list(decontamination or [])}, sort_keys=True)
    Path(folder, APPLIED).write_text(text)


def read_applied(path: str) -> dict:
    """{filters, decontamination} recorded for the folder `path` (a file input: its folder), or empty."""
    import yaml

    if "://" in str(path):
        return {"filters": [], "decontamination": []}
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / APPLIED
    if not f.is_file():
        return {"filters": [], "decontamination": []}
    try:
        d = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        from .readers import InputError

        raise InputError(f"{f}: not readable ({' '.join(str(e).split())[:160]}); delete it or rewrite it") from None
    return {"filters": list(d.get("filters") or []), "decontamination": list(d.get("decontamination") or [])}
