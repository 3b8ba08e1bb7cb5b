"""Our tokenizers as transformers loads them (save_hf_tokenizer): the same ids as our pipeline on real
and tricky text, BOS where our documents start with one, EOS/pad set, decode equal."""
from __future__ import annotations

import pytest

from conftest import LLAMA2_MODEL, TRICKY_TEXTS, real_texts
from shards.tokenizers import get_tokenizer, save_hf_tokenizer

AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
TEXTS = real_texts(120) + TRICKY_TEXTS + [" \n leading space", "x  y   z    w", "  ", "a\u200bb ﬁ １"]


@pytest.mark.parametrize("name", ["llama2", "cl100k", "qwen3"])
def test_hf_tokenizer_encodes_like_ours(name, tmp_path):
    if name == "llama2" and not LLAMA2_MODEL.exists():
        pytest.skip("llama2 tokenizer.model not present")
    tok = get_tokenizer(name, path=str(LLAMA2_MODEL)) if name == "llama2" else get_tokenizer(name)
    ids = save_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    head = [tok.bos_id] if tok.add_bos else []
    # In transformers a special-token string in text is that token (what chat templates rely on); our
    # pipeline encodes it as text. Everything else must agree id for id.
    texts = [t for t in TEXTS if not any(sp in t for sp in tok.special_tokens)]
    assert len(texts) > 100
    bad = [t for t in texts if hf(t)["input_ids"] != head + tok.encode(t)]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    assert all(hf.decode(tok.encode(t)) == tok.decode(tok.encode(t)) for t in TEXTS)
    eos = next(sp for sp, i in tok.special_tokens.items() if i == tok.eos_id)
    assert hf(f"a{eos}b", add_special_tokens=False)["input_ids"] == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert hf.eos_token_id == tok.eos_id == ids["eos_token_id"] and hf.pad_token_id == ids["pad_token_id"]
    assert (hf.bos_token_id == tok.bos_id) if tok.add_bos else True
    assert max(hf.get_vocab().values()) + 1 == tok.vocab_size  # cl100k has unassigned ids: not len(hf)


def test_transformers_own_llama_conversion_differs_where_ours_does_not(tmp_path):
    """Why we convert SentencePiece ourselves: transformers orders merges by id, SentencePiece by score
    (whitespace-run pieces score -1e9), so a double space before a word tokenizes differently there."""
    if not LLAMA2_MODEL.exists():
        pytest.skip("llama2 tokenizer.model not present")
    import shutil

    from transformers import LlamaTokenizer
    tok = get_tokenizer("llama2", path=str(LLAMA2_MODEL))
    shutil.copy(LLAMA2_MODEL, tmp_path / "tokenizer.model")
    theirs = LlamaTokenizer.from_pretrained(tmp_path)
    text = "Hello.  In the  end"
    assert theirs(text, add_special_tokens=False)["input_ids"] != tok.encode(text)
    save_hf_tokenizer(tok, tmp_path / "ours")
    assert AutoTokenizer.from_pretrained(tmp_path / "ours")(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_bos_added_by_the_post_processor_survives_an_import(tmp_path):
    # Llama 3 style: tokenizer_config.json has no add_bos_token; the tokenizer.json post-processor
    # prepends <|begin_of_text|>. Importing the folder must keep that convention.
    import json

    from tokenizers import Tokenizer, processors

    from shards.tokenizers import load_tokenizer
    from trainer.tools.hf import tokenizer_section
    from trainhelp import make_bpe_json

    specials = ("<|begin_of_text|>", "<|end_of_text|>")
    folder = tmp_path / "llama3ish"
    path = make_bpe_json(folder / "tokenizer.json", real_texts()[:200], 400, specials=specials)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    plain = tokenizer_section(folder)
    assert plain["add_bos"] is False  # no post-processor yet: nothing prepended
    hf = Tokenizer.from_file(str(path))
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    hf.save(str(path))
    section = tokenizer_section(folder)
    assert section["bos"] == "<|begin_of_text|>" and section["add_bos"] is True
    tok = load_tokenizer({"tokenizer": section})
    assert tok.encode_document("hello world") == [0, *hf.encode("hello world", add_special_tokens=False).ids, 1]
    # an explicit add_bos_token: false wins over the post-processor
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>", "add_bos_token": False}))
    assert tokenizer_section(folder)["add_bos"] is False
