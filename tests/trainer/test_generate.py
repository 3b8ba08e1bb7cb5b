"""Generation: logit processors vs transformers' processors, the cached loop vs a no-cache loop,
stopping, ChatML formatting, and the CLI end to end on a checkpoint written in the trainer's layout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import trainhelp
from trainer.checkpoint import load_model as load_checkpoint
from shards.tokenizers import load_tokenizer
from trainer.tools.generate import (GenerationConfig, banned_ngram_tokens, complete, generate, main,
                              next_token, prompt_ids, top_k_filter, top_p_filter, apply_no_repeat_ngram,
                              apply_repetition_penalty)
from trainer.models import build_model
from trainer.models.layers import KVCache

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
LLAMA2 = Path(__file__).resolve().parents[3] / "shared/data/llama2-tokenizer.model"
TINY = {"arch": "dense", "preset": "atom", "vocab_size": 300, "d_model": 48, "n_layers": 2, "n_heads": 3,
        "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 64}


def tiny_model(**kw):
    torch.manual_seed(0)
    m = build_model({**TINY, **kw})
    with torch.no_grad():  # larger weights than the real init so logits are far from uniform
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return m.eval()


# ------------------------------------------------------------------------------ processors vs HF

def test_processors_match_transformers():
    from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(50, generator=g) * 3
        ctx = torch.randint(0, 12, (40,), generator=g).tolist()
        inp = torch.tensor([ctx])
        ref = RepetitionPenaltyLogitsProcessor(1.3)(inp, logits[None].clone())[0]
        torch.testing.assert_close(apply_repetition_penalty(logits, ctx, 1.3), ref)
        ref = NoRepeatNGramLogitsProcessor(3)(inp, logits[None].clone())[0]
        assert torch.equal(apply_no_repeat_ngram(logits, ctx, 3), ref)
        k = 1 + trial % 7
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(inp, logits[None].clone())[0])
        p = 0.1 + 0.04 * trial
        assert torch.equal(torch.isinf(top_p_filter(logits, p)),
                           torch.isinf(TopPLogitsWarper(p)(inp, logits[None].clone())[0]))


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # always at least one


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3) == {3, 4}
    assert banned_ngram_tokens([1, 2], 3) == set()


def test_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        GenerationConfig(top_k=0)


# ------------------------------------------------------------------------------ the loop

def test_greedy_is_deterministic_and_equals_uncached_argmax():
    m = tiny_model()
    prompt = [5, 17, 42, 7]
    out = generate(m, prompt, GenerationConfig(max_new_tokens=12, greedy=True))
    assert out == generate(m, prompt, GenerationConfig(max_new_tokens=12, greedy=True))
    ctx = list(prompt)
    with torch.no_grad():  # reference: full forward over the whole context each step, no cache
        for _ in range(12):
            ctx.append(int(m(torch.tensor([ctx]))[0, -1].argmax()))
    assert out == ctx[len(prompt):]


def test_greedy_hybrid_recurrent_state_via_cache():
    pytest.importorskip("trainer.models.hybrid")
    torch.manual_seed(0)
    m = build_model({"arch": "hybrid", "preset": "hybrid-tiny"}).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    prompt = [5, 17, 42, 7, 300, 11]
    out = generate(m, prompt, GenerationConfig(max_new_tokens=10, greedy=True))
    ctx = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ctx.append(int(m(torch.tensor([ctx]))[0, -1].argmax()))
    assert out == ctx[len(prompt):]
    assert len(set(out)) > 1


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy():
    m = tiny_model()
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=3)
    a, b = generate(m, [1, 2, 3], cfg), generate(m, [1, 2, 3], cfg)
    assert a == b and len(a) == 10
    assert generate(m, [1, 2, 3], GenerationConfig(max_new_tokens=10, top_k=1, seed=4)) == \
        generate(m, [1, 2, 3], GenerationConfig(max_new_tokens=10, greedy=True))


def _trigrams(seq):
    return [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]


def test_no_repeat_ngram_never_repeats_a_trigram():
    m = tiny_model(vocab_size=12)  # few tokens: repeats are likely unless banned
    prompt = [4, 9, 4, 9]
    plain = prompt + generate(m, prompt, GenerationConfig(max_new_tokens=120, greedy=True))
    assert len(set(_trigrams(plain))) < len(_trigrams(plain)), "greedy alone loops (so the test can fail)"
    for cfg in (GenerationConfig(max_new_tokens=120, greedy=True, no_repeat_ngram=3),
                GenerationConfig(max_new_tokens=120, temperature=0.7, no_repeat_ngram=3, seed=1)):
        seq = prompt[-2:] + generate(m, prompt[-2:], cfg)
        assert len(seq) == 122
        assert len(set(_trigrams(seq))) == len(_trigrams(seq))


def test_repetition_penalty_reduces_repeats():
    m = tiny_model()
    base = generate(m, [3], GenerationConfig(max_new_tokens=60, greedy=True))
    pen = generate(m, [3], GenerationConfig(max_new_tokens=60, greedy=True, repetition_penalty=3.0))
    assert len(set(pen)) > len(set(base))


class Scripted(nn.Module):
    """Emits a fixed token script (position p predicts script[p]); exercises stopping."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.script, self.vocab = script, vocab

    def new_cache(self, batch_size, max_len):
        return KVCache(1, batch_size, max_len)

    def forward(self, ids, cache=None):
        pos0 = cache.pos if cache is not None else 0
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for t in range(ids.shape[1]):
            logits[:, t, self.script[pos0 + t]] = 10.0
        if cache is not None:
            cache.advance(ids.shape[1])
        return logits


def test_stops_at_eos_and_respects_max_new_tokens():
    m = Scripted([0, 5, 6, 7, 2, 8, 9, 9, 9, 9])  # after a 2-token prompt: 5, 6, 7, then EOS 2
    assert generate(m, [1, 1], GenerationConfig(greedy=True, stop_ids=(2,), max_new_tokens=8)) == [5, 6, 7]
    assert generate(m, [1, 1], GenerationConfig(greedy=True, max_new_tokens=5)) == [5, 6, 7, 2, 8]
    assert generate(m, [1, 1], GenerationConfig(greedy=True, max_new_tokens=2)) == [5, 6]
    seen = []
    generate(m, [1, 1], GenerationConfig(greedy=True, stop_ids=(7,)), on_token=seen.append)
    assert seen == [5, 6]
    assert next_token(torch.tensor([0.0, 5.0, 1.0]), [], GenerationConfig(greedy=True)) == 1


# ------------------------------------------------------------------------------ checkpoint + CLI

@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer

    text = ["hello world, the quick brown fox jumps over the lazy dog.", "user assistant system chat"] * 50
    p = trainhelp.make_bpe_json(tmp_path_factory.mktemp("tok") / "tokenizer.json", text, vocab_size=300)
    assert Tokenizer.from_file(str(p)).get_vocab_size() <= 300
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_json):
    from safetensors.torch import save_model
    run = tmp_path_factory.mktemp("run")
    m = tiny_model()
    ck = run / "checkpoints" / "step_0000010"
    ck.mkdir(parents=True)
    save_model(m, str(ck / "model.safetensors"))
    (ck / "config.json").write_text(json.dumps({"model": TINY, "tokenizer": {"name": "tiny-bpe", "path": str(tokenizer_json)}}))
    (run / "checkpoints" / "step_0000020.tmp").mkdir()  # an unfinished write must be ignored
    return run


def test_load_checkpoint_roundtrip(run_dir):
    model, cfg, ck = load_checkpoint(run_dir)
    assert ck.name == "step_0000010"
    ref = tiny_model()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(run_dir / "checkpoints" / "step_0000020.tmp")


def test_load_checkpoint_mismatch_and_prefixes(run_dir, tmp_path):
    from safetensors.torch import save_file
    src = run_dir / "checkpoints" / "step_0000010"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({"model": {**TINY, "n_layers": 3}, "tokenizer": {}}))
    with pytest.raises(ValueError, match="does not match.*blocks.2"):
        load_checkpoint(bad)
    ddp = tmp_path / "ddp"  # saved from a DDP-wrapped, compiled model
    ddp.mkdir()
    save_file({"module._orig_mod." + k: v.contiguous() for k, v in tiny_model().state_dict().items()},
              str(ddp / "model.safetensors"))
    (ddp / "config.json").write_text((src / "config.json").read_text())
    model, _, _ = load_checkpoint(ddp)
    torch.testing.assert_close(model.embed.weight, tiny_model().embed.weight, rtol=0, atol=0)


def test_complete_returns_text(run_dir):
    model, cfg, _ = load_checkpoint(run_dir)
    tok = load_tokenizer(cfg)
    ids = generate(model, tok.encode("the quick"), GenerationConfig(max_new_tokens=6, greedy=True,
                                                                    stop_ids=(tok.eos_id,)))
    assert complete(model, tok, "the quick", GenerationConfig(max_new_tokens=6, greedy=True)) == tok.decode(ids)


def test_chatml_prompt_uses_special_ids(run_dir):
    _, cfg, _ = load_checkpoint(run_dir)
    tok = load_tokenizer(cfg)
    s, e = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    ids = prompt_ids(tok, "hello", chat=True)
    assert ids == [s] + tok.encode("user\nhello") + [e] + tok.encode("\n") + [s] + tok.encode("assistant\n")
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.skipif(not LLAMA2.exists(), reason="llama2 tokenizer.model not present")
def test_llama2_prompt_starts_with_bos():
    from shards.tokenizers import get_tokenizer
    tok = get_tokenizer("llama2", path=str(LLAMA2))
    ids = prompt_ids(tok, "Hello world", chat=False)
    assert ids[0] == tok.bos_id == 1 and ids[1:] == tok.encode("Hello world")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.tools.generate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(run_dir, capsys):
    model, cfg, _ = load_checkpoint(run_dir)
    tok = load_tokenizer(cfg)
    prompt = "hello world"
    expect = generate(model, tok.encode(prompt), GenerationConfig(max_new_tokens=8, greedy=True,
                                                                  stop_ids=(tok.eos_id,)))
    r = _cli(run_dir, "--prompt", prompt, "--max-new-tokens", 8, "--greedy")  # a real process
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + tok.decode(expect) + "\n"
    # The remaining flags in-process (same entry point, no second interpreter start-up).
    rc = main([str(run_dir), "--prompt", prompt, "--chat", "--max-new-tokens", "4", "--temperature", "0.7",
               "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--no-repeat-ngram", "3",
               "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and f"prompt {len(prompt_ids(tok, prompt, chat=True))} tokens" in err
    assert main([str(run_dir / "nope"), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
