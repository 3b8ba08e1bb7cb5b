"""Pipeline faults a user can cause, each reproduced: damaged input files, zero documents out, input changed
on a rerun, and the tokenizer path the manifest records. In-process `tokenize` CLI, a tiny tokenizer."""
from __future__ import annotations

import json

import pytest

import trainhelp
from trainhelp import fineweb_tokenize as _tokenize
from trainhelp import tokenize_stats
from trainhelp import word_texts as _texts
from trainhelp import write_jsonl as _jsonl


@pytest.fixture()
def tok_json(tmp_path):
    return trainhelp.make_tokenizer_json(tmp_path / "tok" / "tokenizer.json")


def test_manifest_records_a_resolved_tokenizer_path(tmp_path, monkeypatch):
    """The manifest kept the path as typed ("tok/tokenizer.json", relative to where tokenize ran), so
    `shards inspect` from another folder could not decode."""
    from shards.check import inspect_dir
    from shards.manifest import read_manifest

    trainhelp.make_tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    _jsonl(tmp_path / "in" / "rows.jsonl", ["w1 w2 w3", "w4 w5"])
    monkeypatch.chdir(tmp_path)
    assert _tokenize("in", "out", "--tokenizer", "tok/tokenizer.json") == 0
    m = read_manifest(tmp_path / "out")
    assert m.extra["tokenizer_path"] == str(tmp_path / "tok" / "tokenizer.json")
    monkeypatch.chdir(tmp_path / "in")
    doc = inspect_dir(tmp_path / "out")["first_document"]
    assert doc["note"] == "" and doc["text"].startswith("w1"), doc


# --------------------------------------------------------------------- 10. damaged input files


def test_parquet_with_a_damaged_page_is_a_counted_named_skip(tmp_path, tok_json, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in"
    inp.mkdir()
    texts = _texts(150)
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(150)], "text": texts}), inp / "good.parquet")
    bad = inp / "bad.parquet"
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(150)], "text": texts}), bad, row_group_size=50,
                   compression="snappy")
    off = pq.ParquetFile(bad).metadata.row_group(1).column(1).data_page_offset
    raw = bytearray(bad.read_bytes())
    raw[off : off + 40] = b"\xff" * 40  # row group 1's text page header; the footer is intact
    bad.write_bytes(bytes(raw))
    capfd.readouterr()
    assert _tokenize(inp, tmp_path / "out", "--tokenizer", tok_json) == 0
    err = capfd.readouterr().err
    assert "bad.parquet" in err and "unreadable at row" in err and "Traceback" not in err, err[-3000:]
    s = tokenize_stats(tmp_path / "out")
    assert s["skipped_unreadable"] == 1 and s["skipped_unreadable_rows"] == 50 == 300 - s["train_documents"]
    # every good row, and bad.parquet's row groups 0 and 2: only the damaged one is lost


def test_empty_parquet_beside_good_files_exits_2_before_any_executor(tmp_path, tok_json, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"text": _texts(10)}), inp / "a.parquet")
    (inp / "b.parquet").write_bytes(b"")
    assert _tokenize(inp, tmp_path / "out", "--tokenizer", tok_json) == 2
    err = capsys.readouterr().err
    assert str(inp / "b.parquet") in err and "empty" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_truncated_jsonl_gz_keeps_and_counts_its_readable_rows(tmp_path, tok_json, capfd):
    import gzip

    inp = tmp_path / "in"
    inp.mkdir()
    with gzip.open(inp / "cut.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(_texts(100)))
    raw = (inp / "cut.jsonl.gz").read_bytes()
    (inp / "cut.jsonl.gz").write_bytes(raw[: len(raw) * 9 // 10])
    capfd.readouterr()
    assert _tokenize(inp, tmp_path / "out", "--tokenizer", tok_json) == 0
    err = capfd.readouterr().err
    s = tokenize_stats(tmp_path / "out")
    assert s["skipped_unreadable"] == 1 and 80 <= s["train_documents"] < 100, s
    assert f"cut.jsonl.gz: unreadable at row {s['train_documents']}" in err, err[-3000:]


# ------------------------------------------------ 11, 13. every row skipped; a null text says null


@pytest.mark.parametrize("case", ["no text column", "numeric text", "null text", "no rows"])
def test_zero_documents_out_is_an_error_naming_why(case, tmp_path, tok_json, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in"
    inp.mkdir()
    if case == "no text column":
        pq.write_table(pa.table({"id": ["a", "b"], "content": ["x y", "z"]}), inp / "a.parquet")
    elif case == "no rows":
        (inp / "a.jsonl").write_text("\n\n")
    else:
        _jsonl(inp / "a.jsonl", [42, 7] if case == "numeric text" else [None, None])
    capfd.readouterr()
    assert _tokenize(inp, tmp_path / "out", "--tokenizer", tok_json) == 2
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and str(inp) in last, err[-3000:]
    assert "0 documents" in last or case == "no text column", last  # that one is refused up front, by its columns
    want = {"no text column": "no 'text' column", "numeric text": "skipped_no_text=2",
            "null text": "skipped_no_text=2", "no rows": "0 rows"}[case]
    assert want in last, last
    if case == "null text":
        assert "a.jsonl row 0: 'text' is null" in err, err[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_step_refuses_zero_documents(tmp_path, tok_json):
    """The manifest job of a Slurm/Ray run (or a pipeline of one's own) wrote a "complete" empty dataset."""
    from pipelines.steps import write_shard_manifest

    (tmp_path / "out" / "train").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="0 documents"):
        write_shard_manifest(tmp_path / "out", str(tok_json))
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------- 12. the input changed on rerun


def test_rerun_over_changed_input_files_is_refused(tmp_path, tok_json, capsys):
    """A file added between a run and its rerun was silently not read: the completion record held
    the input path, not its files."""
    inp = tmp_path / "in"
    _jsonl(inp / "a.jsonl", _texts(5, 1))
    _jsonl(inp / "b.jsonl", _texts(5, 2))
    out = tmp_path / "out"
    assert _tokenize(inp, out, "--tokenizer", tok_json) == 0
    assert _tokenize(inp, out, "--tokenizer", tok_json) == 0  # an unchanged rerun: finished tasks skipped
    _jsonl(inp / "c.jsonl", _texts(5, 3))
    (inp / "a.jsonl").write_text((inp / "a.jsonl").read_text() + json.dumps({"text": "w1 w2"}) + "\n")
    capsys.readouterr()
    assert _tokenize(inp, out, "--tokenizer", tok_json) == 2
    err = capsys.readouterr().err
    assert "1 added (c.jsonl)" in err and "1 changed size (a.jsonl)" in err and "--logging-dir" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert _tokenize(inp, out, "--tokenizer", tok_json, "--logging-dir", tmp_path / "logs2") == 0
    from shards.manifest import read_manifest

    assert read_manifest(out).splits["train"].documents == 16  # every file, the appended row included
