"""Shard faults: `shards verify` covers the manifest itself (edited tokenizer fields caught, and says when the
tokenizer cannot be checked)."""
from __future__ import annotations

import json

import pytest

import trainhelp
from trainhelp import fineweb_tokenize as _tokenize
from trainhelp import word_texts as _texts
from trainhelp import write_jsonl as _jsonl


@pytest.fixture()
def tok_json(tmp_path):
    return trainhelp.make_tokenizer_json(tmp_path / "tok" / "tokenizer.json")


# ------------------------------------------------------------ 14. verify covers the manifest itself


@pytest.mark.parametrize("field, value", [("vocab_hash", "0" * 64), ("eos_id", 5)])
def test_verify_catches_an_edited_tokenizer_field(field, value, tmp_path, tok_json):
    from shards.check import format_verify, verify_dir

    _jsonl(tmp_path / "in" / "rows.jsonl", _texts(20))
    out = tmp_path / "out"
    assert _tokenize(tmp_path / "in", out, "--tokenizer", tok_json) == 0
    assert verify_dir(out).ok
    m = json.loads((out / "manifest.json").read_text())
    m["tokenizer"][field] = value
    (out / "manifest.json").write_text(json.dumps(m))
    rep = verify_dir(out)
    assert not rep.ok and any(f"tokenizer.{field}" in p for p in rep.problems["manifest.json"]), format_verify(rep)


def test_verify_says_when_the_tokenizer_cannot_be_checked(tmp_path):
    from shards.check import format_verify, verify_dir

    d = trainhelp.make_source(tmp_path / "a", 1)  # tokenizer "tiny": nothing to load it from
    rep = verify_dir(d)
    assert rep.ok and "tokenizer fields unchecked" in format_verify(rep), format_verify(rep)
    m = json.loads((d / "manifest.json").read_text())
    m["dtype"] = "uint32"  # checkable without the tokenizer: 64 ids are stored as uint16
    (d / "manifest.json").write_text(json.dumps(m))
    assert not verify_dir(d).ok
