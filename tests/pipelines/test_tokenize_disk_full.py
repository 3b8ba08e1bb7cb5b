"""The tokenize stage on a disk that fills (a small tmpfs mounted by the test): one error line naming
the output, no partial shard left, and a rerun after freeing space gives the uninterrupted run's
shards byte for byte."""
from __future__ import annotations

import shutil

import trainhelp
from trainhelp import fineweb_tokenize, shard_files, word_texts, write_jsonl


def test_disk_full_while_tokenizing_then_rerun_is_byte_identical(tmp_path, small_disk, capsys):
    tok = trainhelp.make_tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    write_jsonl(tmp_path / "in" / "rows.jsonl", word_texts(12000))  # ~1 MB of uint16 token shards
    ref = tmp_path / "ref"
    assert fineweb_tokenize(tmp_path / "in", ref, "--tokenizer", tok) == 0
    shards = sum(len(b) for name, b in shard_files(ref).items() if "/" in name)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - shards // 2))  # half the shards fit
    capsys.readouterr()

    out = small_disk / "out"
    assert fineweb_tokenize(tmp_path / "in", out, "--tokenizer", tok) == 2
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "no space left on device" in line[0] and str(out) in line[0], err
    assert not list(out.rglob("*.tmp")) and not list((out / "train").glob("*.ds*")), list(out.rglob("*"))
    assert not (out / "manifest.json").exists()

    filler.unlink()
    assert fineweb_tokenize(tmp_path / "in", out, "--tokenizer", tok) == 0
    assert shard_files(out) == shard_files(ref)
