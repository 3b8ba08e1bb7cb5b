"""`python -m shards adopt`: datatrove's own DocumentTokenizer output gets our manifest after the same
checks as verify, then mixes with our own shards of the same vocabulary (named another way); bad
shards are refused with the file named and no manifest. The vocabulary hash is the token mapping:
a tokenizer and its tokenizer.json conversion hash equal."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import train_tokenizer as tt
from pipelines.demo import write_jsonl_gz
from shards.__main__ import main as shards_main
from shards.check import verify_dir
from shards.format import read_metadata
from shards.manifest import read_manifest


@pytest.fixture(scope="module")
def made(tmp_path_factory, docs):
    """A BPE folder, datatrove's shards of one corpus (given the tokenizer.json file), ours of another."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from pipelines.cli import main
    from pipelines.fineweb import CORPUS

    root = tmp_path_factory.mktemp("adopt")
    tok = Path(tt.train(docs[:300], root / "tok", vocab_size=1024))
    write_jsonl_gz([{"text": t, "id": f"a{i}"} for i, t in enumerate(docs[:150])], root / "in_a" / "00000.jsonl.gz")
    write_jsonl_gz([{"text": t, "id": f"b{i}"} for i, t in enumerate(docs[150:300])], root / "in_b" / "00000.jsonl.gz")
    LocalPipelineExecutor([
        JsonlReader(str(root / "in_a")),
        DocumentTokenizer(str(root / "dt"), tokenizer_name_or_path=str(tok), eos_token="<|endoftext|>",
                          shuffle_documents=False),
    ], tasks=1, workers=1, logging_dir=str(root / "dt_logs")).run()
    assert main(CORPUS, ["tokenize", "--input", str(root / "in_b"), "--output", str(root / "ours"),
                         "--tokenizer", str(tok.parent), "--val-fraction", "0", "--workers", "1"]) == 0
    return root, tok


def copy_dt(root: Path, dest: Path) -> Path:
    return Path(shutil.copytree(root / "dt", dest))


def test_adopt_datatrove_output_then_mix_with_ours(made, tmp_path, capsys):
    from trainer.data import MixtureLoader, MixturePoint, SourceSpec

    root, tok = made
    d = copy_dt(root, tmp_path / "dt")
    assert read_metadata(next(d.glob("*.ds"))).tokenizer == str(tok)  # how datatrove was told
    assert shards_main(["adopt", str(d), "--tokenizer", str(tok)]) == 0
    assert "adopted" in capsys.readouterr().out
    m, ours = read_manifest(d), read_manifest(root / "ours")
    assert m.splits["train"].documents == 150 and m.extra["adopted"] is True
    assert m.tokenizer.vocab_hash == ours.tokenizer.vocab_hash  # file vs folder: one vocabulary
    assert m.splits["train"].tokens == sum(f.stat().st_size // 2 for f in d.glob("*.ds"))  # independent count
    assert verify_dir(d).ok
    loader = MixtureLoader([SourceSpec("dt", str(d)), SourceSpec("ours", str(root / "ours"))],
                           [MixturePoint(0.0, {"dt": 1, "ours": 1})], seq_len=32, micro_batch=8, seed=0,
                           total_tokens=32 * 8 * 4, vocab_size=1024)
    x, y, _, info = loader.batch(0)
    assert set(info["sources"]) == {"dt", "ours"} and int(x.max()) < 1024
    assert shards_main(["adopt", str(d), "--tokenizer", str(tok)]) == 2  # a manifest exists: not overwritten
    assert "exists already" in capsys.readouterr().err


def test_adopt_refuses_bad_shards_naming_them(made, tmp_path, capsys):
    root, tok = made
    # ids from a 1024-id vocabulary checked against a smaller one
    small = tt.train(["x y z " * 50] * 20, tmp_path / "s", vocab_size=262)
    d = copy_dt(root, tmp_path / "dt1")
    assert shards_main(["adopt", str(d), "--tokenizer", str(small.parent)]) == 1
    err = capsys.readouterr().err
    assert "00000_unshuffled.ds" in err and ">= vocab size 262" in err and not (d / "manifest.json").exists()
    # an index that does not end at the token count
    d = copy_dt(root, tmp_path / "dt2")
    idx = next(d.glob("*.ds.index"))
    ends = np.fromfile(idx, dtype="<u8")
    ends[-1] += 3
    ends.tofile(idx)
    assert shards_main(["adopt", str(d), "--tokenizer", str(tok)]) == 1
    assert "last offset" in capsys.readouterr().err and not (d / "manifest.json").exists()
    assert read_metadata(next(d.glob("*.ds"))).tokenizer == str(tok)  # nothing rewritten on failure
    (tmp_path / "empty").mkdir()
    assert shards_main(["adopt", str(tmp_path / "empty"), "--tokenizer", str(tok)]) == 2
    assert "no .ds shard files" in capsys.readouterr().err


def test_vocab_hash_is_the_token_mapping(tmp_path, llama2_model):
    """A SentencePiece model and its HF conversion (same ids, another backend) hash equal; qwen3 and
    its tokenizer.json are checked in test_tokenizers (the conversion is made there already)."""
    from shards.tokenizers import get_tokenizer, save_hf_tokenizer

    sp = get_tokenizer("llama2", path=llama2_model)
    save_hf_tokenizer(sp, tmp_path / "llama2")
    hf = get_tokenizer(str(tmp_path / "llama2"))
    assert hf.vocab_hash == sp.vocab_hash and hf.name != sp.name
    assert get_tokenizer("cl100k").vocab_hash != sp.vocab_hash
