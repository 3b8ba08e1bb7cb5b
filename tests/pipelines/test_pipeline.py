"""pipelines: hash split, tokenize to shards (round trip, dtype, determinism, interrupted reruns),
datatrove's own DocumentTokenizer as the reference, and every bad-input case.

The corpus is real text that ships with Python (pydoc topics and stdlib docstrings) cut into
paragraphs: a few thousand documents, no download.
"""
from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main as cli_main
from pipelines.demo import train_bpe, write_jsonl_gz
from pipelines.fineweb import CORPUS
from pipelines.steps import HashSplit, TokenizeShards, assign_split, hash_fraction, split_key
from shards.format import open_shard, read_metadata
from shards.manifest import read_manifest
from shards.reader import open_split
from shards.text import normalize_text
from trainhelp import kill_when_shard_1_starts, paragraphs, shard_files, tokenize_stats, write_corpus

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ corpus


@pytest.fixture(scope="module")
def texts():
    t = paragraphs(3000)
    assert len(t) >= 2500, len(t)
    return t


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, texts) -> str:
    """The demo's 4,096-id byte-level BPE, trained on this corpus (HF tokenizers)."""
    d = tmp_path_factory.mktemp("bpe")
    write_jsonl_gz([{"text": t} for t in texts], d / "c.jsonl.gz")
    return str(train_bpe([d / "c.jsonl.gz"], d / "tokenizer.json"))


def tokenize(inp, out, *extra) -> int:
    return cli_main(CORPUS, ["tokenize", "--input", str(inp), "--output", str(out), *map(str, extra)])


def decoded_split(d: Path, split: str, tok) -> list[str]:
    r = open_split(d, split)
    return [tok.decode(doc[:-1]) for doc in r.documents_iter()]


# -------------------------------------------------------------------------------------- hash split


def test_hash_split_is_a_pure_function_of_key_and_seed():
    from datatrove.data import Document

    a = hash_fraction("doc-1", 1337)
    assert a == hash_fraction("doc-1", 1337) and 0.0 <= a < 1.0
    assert a != hash_fraction("doc-1", 1338) and a != hash_fraction("doc-2", 1337)
    # a fresh interpreter (other PYTHONHASHSEED) gives the same number: no use of hash()
    code = "from pipelines.steps import hash_fraction; print(repr(hash_fraction('doc-1', 1337)))"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert float(out.stdout) == a
    # key choice: real ids are used; datatrove's position ids ("<file>/<row>") fall back to the text
    assert split_key(Document(text="t", id="<urn:uuid:1>"), "auto") == ("id", "<urn:uuid:1>")
    assert split_key(Document(text="t", id="data/000.parquet/17"), "auto") == ("text", "t")
    assert split_key(Document(text="t", id="x", metadata={"id_is_position": True}), "auto") == ("text", "t")
    assert split_key(Document(text="t", id="x"), "text") == ("text", "t")
    assert split_key(Document(text=" t\n\n u ", id="x"), "text") == ("text", "t u")  # whitespace collapsed
    assert split_key(Document(text="e\u0301", id="x"), "text") == ("text", "\u00e9")  # NFC
    docs = [Document(text=f"text {i}", id=f"id{i}") for i in range(2000)]
    tagged = [d.metadata["split"] for d in HashSplit(0.25, seed=7, key="id")(iter(docs))]
    assert tagged == [assign_split(f"id{i}", 7, 0.25) for i in range(2000)]
    by_text = [d.metadata["split"] for d in HashSplit(0.25, seed=7)(iter(docs))]  # the default key: the text
    assert by_text == [assign_split(f"text {i}", 7, 0.25) for i in range(2000)] != tagged
    assert 0.2 < tagged.count("val") / 2000 < 0.3
    only_val = list(HashSplit(0.25, seed=7, keep="val")(iter(docs)))
    assert len(only_val) == by_text.count("val")


def test_split_determinism_across_tasks_and_order(tmp_path, texts, bpe):
    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer(bpe)
    n = len(texts)
    write_corpus(tmp_path / "in", texts, files=6, ids=False)  # no ids: the text is the key
    rev = list(reversed(texts))
    write_corpus(tmp_path / "in_rev", rev, files=4, ids=False)  # other order, other file cut
    vals = {}
    for name, inp, tasks in (("t1", "in", 1), ("t3", "in", 3), ("rev", "in_rev", 2)):
        assert tokenize(tmp_path / inp, tmp_path / name, "--tokenizer", bpe, "--tasks", tasks,
                        "--workers", 1, "--val-fraction", 0.1) == 0
        m = read_manifest(tmp_path / name)
        assert m.splits["train"].documents + m.splits["val"].documents == n
        vals[name] = sorted(decoded_split(tmp_path / name, "val", tok))
    assert len(read_manifest(tmp_path / "t3").splits["train"].shards) == 3
    assert vals["t1"] == vals["t3"] == vals["rev"]
    expected = sorted(t for t in texts if assign_split(normalize_text(t), 1337, 0.1) == "val")
    assert vals["t1"] == expected
    frac = len(expected) / n
    assert abs(frac - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5, frac


# ---------------------------------------------------------------------------------- round trip/dtype


def test_round_trip_qwen3_nfc_eos_and_index(tmp_path, texts):
    from shards.tokenizers import get_tokenizer

    docs = texts[:400] + ["Cafe\u0301 — decomposed accents, \u212b and ligature ﬁ", "emoji 🤖 and 中文 text"]
    write_corpus(tmp_path / "in", docs, files=2)
    assert tokenize(tmp_path / "in", tmp_path / "out", "--tokenizer", "qwen3", "--val-fraction", 0.2) == 0
    tok = get_tokenizer("qwen3")
    m = read_manifest(tmp_path / "out")
    assert m.dtype == "uint32" and m.tokenizer.name == "qwen3" and m.tokenizer.eos_id == 151643
    assert m.seeds == {"split_seed": 1337, "val_fraction": 0.2}
    for split in ("train", "val"):
        in_split = lambda t: assign_split(normalize_text(t), 1337, 0.2) == split  # noqa: E731 - the text key
        expected = [t for j, t in enumerate(docs) if j % 2 == 0 and in_split(t)]
        expected += [t for j, t in enumerate(docs) if j % 2 == 1 and in_split(t)]
        r = open_split(tmp_path / "out", split)
        assert r.dtype == np.uint32 and r.documents == len(expected) > 0
        got = []
        for shard in r.shards:
            assert shard.offsets[-1] == len(shard.tokens) and np.all(np.diff(shard.offsets) > 0)
            assert read_metadata(shard.path).token_size == 4
            for i in range(shard.documents):
                doc = shard.document(i)
                assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
                got.append(tok.decode(doc[:-1]))
        assert got == [unicodedata.normalize("NFC", t) for t in expected]


def test_dtype_rule_cl100k_uint32_and_bpe4096_uint16(tmp_path, texts, bpe):
    write_corpus(tmp_path / "in", texts[:200], files=1)
    assert tokenize(tmp_path / "in", tmp_path / "cl", "--tokenizer", "cl100k") == 0
    assert tokenize(tmp_path / "in", tmp_path / "bpe", "--tokenizer-path", bpe) == 0
    cl, small = read_manifest(tmp_path / "cl"), read_manifest(tmp_path / "bpe")
    assert (cl.dtype, cl.tokenizer.vocab_size) == ("uint32", 100277)
    assert (small.dtype, small.tokenizer.vocab_size) == ("uint16", 4096)
    assert small.extra["tokenizer_path"] == bpe
    shard = open_shard(tmp_path / "bpe" / "train" / "00000.ds")
    assert shard.tokens.dtype == np.uint16 and (tmp_path / "bpe/train/00000.ds").stat().st_size == 2 * len(shard.tokens)
    assert open_shard(tmp_path / "cl" / "train" / "00000.ds").tokens.dtype == np.uint32


# ----------------------------------------------------------------------- datatrove as the reference


def test_datatrove_document_tokenizer_writes_the_same_shard(tmp_path, texts, bpe):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    write_corpus(tmp_path / "in", texts[:1500], files=1)
    assert tokenize(tmp_path / "in", tmp_path / "ours", "--tokenizer", bpe, "--val-fraction", 0) == 0
    LocalPipelineExecutor([
        JsonlReader(str(tmp_path / "in")),
        DocumentTokenizer(str(tmp_path / "dt"), tokenizer_name_or_path=bpe, eos_token="<|endoftext|>",
                          shuffle_documents=False, save_filename="ref"),
    ], tasks=1, workers=1, logging_dir=str(tmp_path / "dt_logs")).run()
    ref = tmp_path / "dt" / "ref_00000_unshuffled.ds"
    ours = tmp_path / "ours" / "train" / "00000.ds"
    assert ref.read_bytes() == ours.read_bytes()
    assert Path(str(ref) + ".index").read_bytes() == Path(str(ours) + ".index").read_bytes()
    # datatrove's metadata line and ours agree on tokenizer and token size
    assert Path(str(ref) + ".metadata").read_text().splitlines()[:2] == Path(str(ours) + ".metadata").read_text().splitlines()[:2]


# ---------------------------------------------------------------------------- determinism / reruns


def test_same_input_same_bytes_and_rerun_after_partial_state(tmp_path, texts, bpe):
    write_corpus(tmp_path / "in", texts[:1200], files=4)
    args = ("--tokenizer", bpe, "--tasks", 2, "--workers", 1, "--val-fraction", 0.1)
    assert tokenize(tmp_path / "in", tmp_path / "a", *args) == 0
    assert tokenize(tmp_path / "in", tmp_path / "b", *args) == 0
    a = shard_files(tmp_path / "a")
    assert a == shard_files(tmp_path / "b") and "manifest.json" in a
    # Simulate a crash in task 1: its marker and shards gone, a half-written .tmp left behind.
    b = tmp_path / "b"
    (b / "logs/tokenize/completions/00001").unlink()
    for p in (b / "train").glob("00001.ds*"):
        p.unlink()
    (b / "train/00001.ds.tmp").write_bytes(b"\x00" * 10)
    (b / "val/00001.ds.index.tmp").write_bytes(b"\x01")
    (b / "manifest.json").unlink()
    assert tokenize(tmp_path / "in", b, *args) == 0
    assert shard_files(b) == a
    # rerunning a finished run changes nothing
    assert tokenize(tmp_path / "in", b, *args) == 0
    assert shard_files(b) == a


def test_killed_run_rerun_equals_uninterrupted(tmp_path, texts, bpe):
    """A real SIGKILL of the tokenize process while task 1 is writing, then a rerun."""
    big = texts * 3  # task 1's file is large enough to be caught mid-write
    write_corpus(tmp_path / "in", big[:300], files=1)
    (tmp_path / "in" / "00000.jsonl").rename(tmp_path / "in" / "a.jsonl")
    write_corpus(tmp_path / "in2", big, files=1)
    (tmp_path / "in2" / "00000.jsonl").rename(tmp_path / "in" / "b.jsonl")
    args = ["--tokenizer", bpe, "--tasks", "2", "--workers", "1", "--val-fraction", "0.1", "--batch-size", "20"]
    assert tokenize(tmp_path / "in", tmp_path / "fresh", *args) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.fineweb", "tokenize", "--input", str(tmp_path / "in"), "--output", str(out), *args]
    # Own process group: the kill takes down the job and its datatrove workers, as a real crash would.
    kill_when_shard_1_starts(cmd, out, None, timeout=60)
    assert not (out / "manifest.json").exists()  # never presented as complete
    assert (out / "logs/tokenize/completions/00000").exists() and not (out / "logs/tokenize/completions/00001").exists()
    assert tokenize(tmp_path / "in", out, *args) == 0
    assert shard_files(out) == shard_files(tmp_path / "fresh")


# ------------------------------------------------------------------------------------------ bad input


def test_missing_empty_unreadable_inputs_exit_2(tmp_path, capsys):
    cases = {}
    cases["missing"] = tmp_path / "nope.jsonl"
    (tmp_path / "empty.jsonl").write_bytes(b"")
    cases["empty file"] = tmp_path / "empty.jsonl"
    (tmp_path / "emptydir").mkdir()
    cases["empty folder"] = tmp_path / "emptydir"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    cases["no data files"] = tmp_path / "other"
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip at all")
    cases["corrupt gzip"] = tmp_path / "bad.jsonl.gz"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    cases["corrupt parquet"] = tmp_path / "bad.parquet"
    for what, path in cases.items():
        rc = tokenize(path, tmp_path / "out", "--tokenizer", "cl100k")
        err = capsys.readouterr().err
        assert rc == 2, what
        assert str(path) in err and "error:" in err, (what, err)
    assert not (tmp_path / "out").exists()  # nothing started
    # a bad tokenizer and a changed rerun are input errors too
    good = write_corpus(tmp_path / "good", ["some text here"] * 3, files=1)
    assert tokenize(good, tmp_path / "o2", "--tokenizer", "no-such-tokenizer") == 2
    assert "no-such-tokenizer" in capsys.readouterr().err
    assert tokenize(good, tmp_path / "o3", "--tokenizer", "cl100k") == 0
    assert tokenize(good, tmp_path / "o3", "--tokenizer", "cl100k", "--val-fraction", 0.5) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_exit_2(tmp_path, capsys):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n')
    p.chmod(0)
    assert tokenize(p, tmp_path / "out", "--tokenizer", "cl100k") == 2
    assert str(p) in capsys.readouterr().err




def test_bad_rows_are_counted_and_named(tmp_path, capfd, bpe):
    from shards.tokenizers import get_tokenizer

    lines = [
        b'{"id": "ok1", "text": "A perfectly fine document."}',
        b'{"id": "notext", "content": "no text field here"}',
        b'{"id": "bad-utf8", "text": "caf\xe9 latin-1 byte"}',
        b'{"id": "surrogate", "text": "lone \\ud800 surrogate"}',
        b'{"id": "empty", "text": ""}',
        b'{"id": "blank", "text": "   \\n  "}',
        b'{"id": "nonstr", "text": 42}',
        b'not json at all',
        b'{"id": "huge", "text": "' + b"word " * 5000 + b'"}',
        b'{"id": "ok2", "text": "Another fine document, after the bad ones."}',
    ]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    capfd.readouterr()
    assert tokenize(inp, tmp_path / "out", "--tokenizer", bpe, "--val-fraction", 0, "--max-doc-tokens", 500) == 0
    err = capfd.readouterr().err
    assert "rows.jsonl row 1: no 'text' field" in err
    assert "rows.jsonl row 2: invalid UTF-8" in err
    s = tokenize_stats(tmp_path / "out")
    assert s["skipped_no_text"] == 2  # missing field + non-string
    assert s["skipped_invalid_utf8"] == 2  # raw bad byte + lone surrogate escape
    assert s["skipped_empty"] == 2
    assert s["skipped_bad_json"] == 1
    assert s["skipped_too_long"] == 1
    tok = get_tokenizer(bpe)
    assert decoded_split(tmp_path / "out", "train", tok) == [
        "A perfectly fine document.", "Another fine document, after the bad ones."]
    # replace/truncate policies keep those rows instead, still counted
    assert tokenize(inp, tmp_path / "out2", "--tokenizer", bpe, "--val-fraction", 0, "--max-doc-tokens", 500,
                    "--invalid-utf8", "replace", "--too-long", "truncate") == 0
    s2 = tokenize_stats(tmp_path / "out2")
    assert s2["replaced_invalid_utf8"] == 2 and s2["truncated_too_long"] == 1
    docs = list(open_split(tmp_path / "out2", "train").documents_iter())
    assert len(docs) == 5 and max(len(d) for d in docs) == 500 and docs[-2][-1] == tok.eos_id
    assert "caf\ufffd latin-1 byte" in [tok.decode(d[:-1]) for d in docs]


def test_tokenize_step_counts_surrogates_from_any_reader(tmp_path, bpe):
    from datatrove.data import Document

    step = TokenizeShards(tmp_path / "o", bpe)
    docs = [Document(text="fine", id="a"), Document(text="bad \udc80 text", id="b"), Document(text="", id="c")]
    list(step.run(iter(docs), rank=0, world_size=1))
    assert step.stats["skipped_invalid_utf8"].total == 1 and step.stats["skipped_empty"].total == 1
    assert open_shard(tmp_path / "o" / "train" / "00000.ds").documents == 1


def test_parquet_input_and_position_ids(tmp_path, texts, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.tokenizers import get_tokenizer

    (tmp_path / "pq").mkdir()
    rows = texts[:300]
    pq.write_table(pa.table({"text": rows[:150]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"text": rows[150:], "url": ["u"] * 150}), tmp_path / "pq" / "b.parquet")
    assert tokenize(tmp_path / "pq", tmp_path / "out", "--tokenizer", bpe, "--val-fraction", 0.3) == 0
    tok = get_tokenizer(bpe)
    val = sorted(decoded_split(tmp_path / "out", "val", tok))
    assert val == sorted(t for t in rows if assign_split(normalize_text(t), 1337, 0.3) == "val")  # text-keyed
    s = tokenize_stats(tmp_path / "out")
    assert s["key_text"] == 300 and s.get("key_id", 0) == 0


def test_batched_reader_stats_equal_per_document_updates():
    # The counted readers merge doc_len and timing statistics in bulk; the result must be what
    # datatrove's per-document MetricStats.update gives.
    import random

    from datatrove.utils.stats import MetricStats

    from pipelines.readers import metric_stats

    rng = random.Random(0)
    values = [rng.randint(1, 5000) for _ in range(1000)]
    one_by_one = MetricStats()
    for v in values:
        one_by_one.update(v)
    bulk = MetricStats()
    for i in range(0, len(values), 300):  # several flushes, as a long task does
        bulk = bulk + metric_stats(values[i:i + 300], "doc")
    assert bulk.total == one_by_one.total == sum(values) and bulk.n == one_by_one.n
    assert (bulk.min, bulk.max) == (one_by_one.min, one_by_one.max)
    assert bulk.mean == pytest.approx(one_by_one.mean) and bulk.variance == pytest.approx(one_by_one.variance)


def test_fast_dependency_check_answers_as_datatrove_does():
    import importlib.metadata

    from datatrove.utils import _import_utils

    import pipelines.readers  # noqa: F401 - installs the fast check

    def datatrove_rule(name):  # datatrove's own scan over every installed distribution
        return True if any((d.metadata.get("Name") or "").lower() == name for d in importlib.metadata.distributions()) else None

    names = ["orjson", "pyarrow", "tldextract", "pyahocorasick", "fasttext-numpy2-wheel", "fasttext", "PyYAML",
             "pyyaml", "no-such-distribution-xyz"]
    assert [_import_utils._is_distribution_available(n) for n in names] == [datatrove_rule(n) for n in names]
    assert _import_utils._is_distribution_available("orjson") is True


def _encode_masking_odd_positions(tok, texts, docs, num_threads=None):
    from pipelines.steps import Encoded, encode_text

    enc = encode_text(tok, texts, docs, num_threads)
    return Encoded(enc.tokens, enc.lengths, (np.arange(len(enc.tokens)) % 2).astype(np.uint8))


def test_tokenize_step_with_a_masked_encoder_truncates_ids_and_mask_together(tmp_path, bpe):
    from datatrove.data import Document

    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer(bpe)
    texts = ["short one", "a much longer document " * 20, "another short"]
    full = [tok.encode_document(t) for t in texts]
    limit = max(len(full[0]), len(full[2])) + 1
    assert len(full[1]) > limit
    step = TokenizeShards(tmp_path / "o", bpe, max_doc_tokens=limit, too_long="truncate",
                          encode=_encode_masking_odd_positions)
    list(step.run(iter(Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=0, world_size=1))
    shard = open_shard(tmp_path / "o" / "train" / "00000.ds")
    flat_mask = (np.arange(sum(map(len, full))) % 2).astype(np.uint8)
    masks = np.split(flat_mask, np.cumsum([len(f) for f in full])[:-1])
    assert shard.documents == 3 and step.stats["truncated_too_long"].total == 1
    assert shard.document(0).tolist() == full[0] and shard.document(2).tolist() == full[2]
    assert shard.document(1).tolist() == full[1][: limit - 1] + [tok.eos_id]
    loss = [np.asarray(shard.loss[shard.offsets[i]:shard.offsets[i + 1]]) for i in range(3)]
    assert loss[0].tolist() == masks[0].tolist() and loss[2].tolist() == masks[2].tolist()
    assert loss[1].tolist() == masks[1][: limit - 1].tolist() + [1]  # the EOS it ends with trains
