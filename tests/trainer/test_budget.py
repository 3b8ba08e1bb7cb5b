"""The data budget of `trainer.run --dry-run`: tokens available against an independent count of the
shard files, tokens planned against the schedule's integral worked out by hand (trapezoids), epochs
against the windows counted from the file sizes; a warning names the repeated source; per stage and
summed over stages; a missing or empty source stops the dry run with one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from trainhelp import make_source, tiny_curriculum, train, write_shards

SEQ, ROWS_PER_STEP = 32, 4  # tiny_curriculum: seq_len 32, micro_batch 2, grad_accum 2
SCHEDULE = [{"at": 0.0, "weights": {"a": 0.9, "b": 0.1}}, {"at": 0.5, "weights": {"a": 0.5, "b": 0.5}},
            {"at": 1.0, "weights": {"a": 0.2, "b": 0.8}}]
SHARE = {"a": 0.25 * 0.9 + 0.5 * 0.5 + 0.25 * 0.2, "b": 0.25 * 0.1 + 0.5 * 0.5 + 0.25 * 0.8}  # trapezoids


def train_files(d: Path) -> list[Path]:
    return sorted((d / "train").glob("*.ds"))


def count_tokens(d: Path) -> int:
    return sum(f.stat().st_size // 2 for f in train_files(d))  # uint16 ids


def count_windows(d: Path) -> int:
    return sum(max(0, (f.stat().st_size // 2 - 1) // SEQ) for f in train_files(d))


def curriculum(tmp_path: Path, steps: int, **over) -> tuple[Path, dict]:
    a = make_source(tmp_path / "src" / "a", 1, docs=60)
    b = make_source(tmp_path / "src" / "b", 2, docs=400)
    data = {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "schedule": SCHEDULE}
    return tiny_curriculum(tmp_path, data=data, train={"steps": steps, "seed": 7, "dtype": "fp32"}, **over), \
        {"a": a, "b": b}


def test_budget_numbers_against_independent_counts(tmp_path, capsys):
    steps = 60
    path, dirs = curriculum(tmp_path, steps)
    rc, out, _ = train([path, "--dry-run", "--json"], capsys)
    assert rc == 0
    got = {s["name"]: s for s in json.loads(out.strip().splitlines()[-1])["sources"]}
    rows = steps * ROWS_PER_STEP
    for name, d in dirs.items():
        s = got[name]
        assert s["tokens_available"] == count_tokens(d)
        assert abs(s["tokens_planned"] - SHARE[name] * rows * SEQ) <= SEQ  # the loader's rows, rounded
        assert s["epochs"] == s["tokens_planned"] / SEQ / count_windows(d)
    assert got["a"]["epochs"] > 1.0 > got["b"]["epochs"]
    warnings = [line.strip() for line in out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: source 'a'") and "repeated" in warnings[0]


def test_staged_curriculum_per_stage_and_summed(tmp_path, capsys):
    path, dirs = curriculum(tmp_path, 10)
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = [{"name": "one"}, {"name": "two", "train": {"steps": 20}}]
    path.write_text(yaml.safe_dump(raw))
    rc, out, _ = train([path, "--dry-run", "--json"], capsys)
    assert rc == 0
    j = json.loads(out.strip().splitlines()[-1])
    one, two = ({s["name"]: s for s in st["sources"]} for st in j["stages"])
    total = {s["name"]: s for s in j["sources"]}
    for n in dirs:
        assert total[n]["tokens_planned"] == one[n]["tokens_planned"] + two[n]["tokens_planned"]
        assert np.isclose(total[n]["epochs"], one[n]["epochs"] + two[n]["epochs"])
        assert two[n]["tokens_planned"] >= 2 * one[n]["tokens_planned"] - SEQ


def test_missing_or_empty_source_stops_the_dry_run(tmp_path, capsys):
    path, dirs = curriculum(tmp_path, 10)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["sources"][1]["path"] = str(tmp_path / "not-built")
    path.write_text(yaml.safe_dump(raw))
    rc, _, err = train([path, "--dry-run", "--json"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: source 'b'") and "not-built" in err
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    write_shards(empty, {}, splits=("train",))
    raw["data"]["sources"][1]["path"] = str(empty)
    path.write_text(yaml.safe_dump(raw))
    rc, _, err = train([path, "--dry-run", "--json"], capsys)
    assert rc == 2 and err.startswith("error: source 'b'") and "no shards" in err
    rc, out, _ = train([path, "--dry-run", "--json", "--skip-data"], capsys)  # the rest still checks
    assert rc == 0 and "sources" not in json.loads(out.strip().splitlines()[-1])
