"""trainer.evals.bpb: the per-id byte table adds up to the bytes of the text each tokenizer encoded
(byte-level BPE, tiktoken qwen3/cl100k, SentencePiece llama2 and its tokenizer.json form, WordLevel),
specials and padded ids count nothing, and a batch's loss and bytes equal an independent per-token
computation on a tiny random model."""
from __future__ import annotations

import math
import unicodedata

import pytest
import torch
import trainhelp
from conftest import TRICKY_TEXTS, real_texts

from shards.tokenizers import get_tokenizer, hf_tokenizer_json
from trainer.evals.bpb import bits_per_byte, loss_and_bytes, token_byte_lengths

TEXTS = [t for t in TRICKY_TEXTS if t] + ["naïve café 😀👩‍👩‍👧 中文字符 日本語 한국어", "\t\r\n  \u00a0 x"] + real_texts(5)
PAD = 64  # model vocabularies are often padded past the tokenizer's


def _tok(name, chat_bpe_json, llama2_model, tmp_path):
    if name == "bpe":
        return get_tokenizer(str(chat_bpe_json))
    if name in ("qwen3", "cl100k"):
        return get_tokenizer(name)
    llama2 = get_tokenizer("llama2", path=str(llama2_model))
    if name == "llama2":
        return llama2
    hf_tokenizer_json(llama2, tmp_path / "llama2.json")  # SentencePiece as a Metaspace/ByteFallback tokenizer.json
    return get_tokenizer(str(tmp_path / "llama2.json"))


def _text_bytes(name: str, text: str) -> int:
    """What the encoded text is, in bytes, derived from the text alone."""
    if name == "qwen3":  # qwen3 encodes the NFC form
        return len(unicodedata.normalize("NFC", text).encode())
    if name.startswith("llama2"):  # SentencePiece's dummy prefix: one '▁' (a space) before the text
        return len(text.encode()) + 1
    return len(text.encode())


@pytest.mark.parametrize("name", ["bpe", "cl100k", "qwen3", "llama2", "llama2-hf"])
def test_token_bytes_add_up_to_the_text(name, chat_bpe_json, request, tmp_path):
    llama2_model = request.getfixturevalue("llama2_model") if name.startswith("llama2") else None
    tok = _tok(name, chat_bpe_json, llama2_model, tmp_path)
    table = token_byte_lengths(tok, tok.vocab_size + PAD)
    assert table.dtype == torch.int64 and table.shape == (tok.vocab_size + PAD,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == _text_bytes(name, text), (name, text[:40])
    specials = list(tok.special_tokens.values())
    assert specials and all(int(table[i]) == 0 for i in specials)
    assert int(table[tok.vocab_size:].sum()) == 0
    # every other id decodes to as many bytes as the table says (ids that decode alone to whole text)
    plain = [i for i in range(0, tok.vocab_size, max(1, tok.vocab_size // 500)) if i not in set(specials)]
    if name in ("bpe", "cl100k", "qwen3"):
        for i in plain:
            text = tok.decode([i])
            if "\ufffd" not in text:  # a partial UTF-8 sequence decodes to U+FFFD: not its bytes
                assert int(table[i]) == len(text.encode()), (i, text)


def test_cl100k_unused_ids_and_a_small_model_vocab():
    tok = get_tokenizer("cl100k")
    table = token_byte_lengths(tok, tok.vocab_size)
    assert table[100261:100264].tolist() == [0, 0, 0]  # ids cl100k leaves undefined
    with pytest.raises(ValueError, match="vocab_size"):
        token_byte_lengths(tok, 50_000)


def test_word_level_counts_each_token_string(tmp_path):
    """WordLevel's rule: the token string's UTF-8 length; the spaces it splits on belong to no token."""
    tok = get_tokenizer(str(trainhelp.make_tokenizer_json(tmp_path / "wl.json", words="wörd")))
    table = token_byte_lengths(tok, trainhelp.VOCAB)
    text = "wörd1 wörd12 wörd63\nwörd5"
    assert int(table[tok.encode(text)].sum()) == len("".join(text.split()).encode())
    assert int(table[tok.eos_id]) == 0


@pytest.fixture(scope="module")
def tiny(chat_bpe_json):
    """A random dense model over the 384-id byte-level BPE, and the tokenizer."""
    from trainer.models import build_model

    torch.manual_seed(0)
    model = build_model({"arch": "dense", "vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         "n_kv_heads": 1, "ffn_dim": 64, "max_seq_len": 256}).eval()
    return model, get_tokenizer(str(chat_bpe_json))


def _nll(model, seq: list[int]) -> list[float]:
    """-log p(seq[t+1] | seq[:t+1]) for each t, computed apart from the module under test."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).double(), dim=-1)[0]
    return [-float(logp[t, seq[t + 1]]) for t in range(len(seq) - 1)]


def test_loss_and_bytes_equal_an_independent_count(tiny):
    """Documents as the loader packs them (EOS before and after): the targets are the text's tokens
    and its EOS, so the bytes are the text's own and the loss is every target's."""
    model, tok = tiny
    table = token_byte_lengths(tok, 384)
    loss_sum, n_bytes, bits, want_bytes = 0.0, 0, 0.0, 0
    for text in TEXTS[:8]:
        seq = [tok.eos_id, *tok.encode(text), tok.eos_id]
        with torch.no_grad():
            loss, nbytes = loss_and_bytes(model, torch.tensor([seq[:-1]]), torch.tensor([seq[1:]]), None, table)
        assert loss.dtype == torch.float64 and nbytes.dtype == torch.int64
        nll = _nll(model, seq)
        assert float(loss) == pytest.approx(sum(nll), rel=1e-5)
        assert int(nbytes) == len(text.encode())
        loss_sum, n_bytes = loss_sum + float(loss), n_bytes + int(nbytes)
        bits, want_bytes = bits + sum(nll) / math.log(2), want_bytes + len(text.encode())
    assert bits_per_byte(loss_sum, n_bytes) == pytest.approx(bits / want_bytes, rel=1e-5)


def test_masked_and_ignored_targets_count_nothing(tiny):
    """Only the answer half counts (a loss mask, or -1 targets as the loader writes them); with
    skip_zero_byte the EOS target's loss goes too."""
    model, tok = tiny
    table = token_byte_lengths(tok, 384)
    prompt, answer = "Q: what is 😀 in 中文?", " A: 笑脸 — a smiling face."
    p, a = tok.encode(prompt), tok.encode(answer)
    seq = [tok.eos_id, *p, *a, tok.eos_id]
    x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
    mask = torch.tensor([[False] * len(p) + [True] * (len(a) + 1)])
    nll = _nll(model, seq)
    answer_nll = sum(nll[len(p):])
    with torch.no_grad():
        both = (loss_and_bytes(model, x, y, mask, table), loss_and_bytes(model, x, y.masked_fill(~mask, -1), None, table))
        skip = loss_and_bytes(model, x, y, mask, table, skip_zero_byte=True)
    for loss, nbytes in both:
        assert float(loss) == pytest.approx(answer_nll, rel=1e-5) and int(nbytes) == len(answer.encode())
    loss, nbytes = skip
    assert float(loss) == pytest.approx(answer_nll - nll[-1], rel=1e-5) and int(nbytes) == len(answer.encode())


def test_bits_per_byte_units():
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert bits_per_byte(3 * math.log(2), 1) == pytest.approx(3.0)
    assert math.isnan(bits_per_byte(1.0, 0))
