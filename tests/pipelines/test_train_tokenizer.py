"""pipelines.train_tokenizer: exact vocabulary size, Atom's special ids, lossless round trip of
arbitrary Unicode, deterministic files, transformers (AutoTokenizer and GPT2TokenizerFast) loading the
folder with its EOS and encoding the ids our pipeline writes; the folder or its tokenizer.json names
the same tokenizer everywhere."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import TRICKY_TEXTS
from pipelines import train_tokenizer as tt
from pipelines.demo import write_jsonl_gz
from shards.reader import open_split
from shards.tokenizers import HFTokenizer, get_tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> Path:
    d = tmp_path_factory.mktemp("tok_corpus")
    write_jsonl_gz([{"text": t, "id": f"d{i}"} for i, t in enumerate(docs[:200])], d / "a" / "00000.jsonl.gz")
    write_jsonl_gz([{"content": t} for t in docs[200:400]], d / "b" / "00000.jsonl.gz")
    return d


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "atom"
    assert tt.main(["--input", str(corpus / "a"), str(corpus / "b"), "--text-key", "text", "content",
                    "--output", str(out), "--no-progress"]) == 0
    return out


def random_unicode(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    planes = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xFFFD), (0x1F300, 0x1FAFF),
              (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(planes)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_size_special_ids_and_round_trip(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == sorted(FILES)
    tok = get_tokenizer(str(tok_dir))
    assert tok.vocab_size == 4096
    assert tok.special_tokens == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|endoftext|>": 4}
    assert (tok.eos_id, tok.bos_id, tok.add_bos) == (4, 1, False)
    for text in TRICKY_TEXTS + random_unicode(300):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") != [4]  # special strings in text stay text
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"


def test_other_sizes_exact_and_too_small_is_one_line(corpus, tmp_path, capsys):
    assert tt.main(["--input", str(corpus / "a"), "--vocab-size", "700", "--output", str(tmp_path / "s"),
                    "--no-progress"]) == 0
    assert get_tokenizer(str(tmp_path / "s")).vocab_size == 700
    capsys.readouterr()
    assert tt.main(["--input", str(corpus / "a"), "--limit-docs", "2", "--vocab-size", "60000",
                    "--output", str(tmp_path / "big"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: BPE training gave") and "not the 60,000 asked for" in err and "\n" not in err
    assert tt.main(["--input", str(corpus / "a"), "--vocab-size", "100", "--output", str(tmp_path / "t")]) == 2
    assert tt.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "u")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_limit_docs_per_input_and_text_key_per_input(corpus):
    texts = list(tt.iter_inputs([str(corpus / "a"), str(corpus / "b")], ["text", "content"], limit_docs=7,
                                progress=False))
    assert len(texts) == 14 and all(texts)


def test_deterministic(corpus, tok_dir, tmp_path):
    assert tt.main(["--input", str(corpus / "a"), str(corpus / "b"), "--text-key", "text", "content",
                    "--output", str(tmp_path / "again"), "--no-progress"]) == 0
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_transformers_loads_it_and_encodes_what_the_pipeline_writes(tok_dir, corpus, tmp_path, docs):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    from pipelines.cli import main
    from pipelines.fineweb import CORPUS

    assert main(CORPUS, ["tokenize", "--input", str(corpus / "a"), "--output", str(tmp_path / "sh"),
                         "--tokenizer", str(tok_dir), "--val-fraction", "0", "--workers", "1"]) == 0
    shard_docs = [d.tolist() for d in open_split(tmp_path / "sh", "train").documents_iter()]
    for cls in (AutoTokenizer, GPT2TokenizerFast):
        hf = cls.from_pretrained(str(tok_dir))
        assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.unk_token_id) == ("<|endoftext|>", 4, 1, 0, 3)
        assert len(hf) == 4096
        want = [hf(t)["input_ids"] + [hf.eos_token_id] for t in docs[:200]]
        assert sorted(want) == sorted(shard_docs)  # document order follows the files, ids must agree


def test_folder_or_its_tokenizer_json_name_the_same_tokenizer(tok_dir):
    a, b = get_tokenizer(str(tok_dir)), get_tokenizer(str(tok_dir / "tokenizer.json"))
    assert a.vocab_hash == b.vocab_hash == HFTokenizer(tok_dir / "tokenizer.json").vocab_hash
    assert a.encode("Hello world") == b.encode("Hello world")
