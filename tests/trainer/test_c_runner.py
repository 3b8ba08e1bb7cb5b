"""c/run.c against PyTorch: logits at every position of a 200-token sequence (longer than the CSA
window, 50 compressed blocks), greedy continuations against trainer.tools.generate, bf16 export, prompt
encoding against the tokenizers themselves, and bad files (one line, exit 2).

Weights are random and large, and every 1-D parameter (norm weights, hyper-connection scales, A_log,
dt_bias) is non-zero, so a runner that skipped a (1 + w) or a scale would fail."""
import json
import shutil
import struct
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TRICKY_TEXTS
import trainhelp
from trainer.tools.export_c import export_c, main as export_main
from trainer.tools.generate import GenerationConfig, generate
from trainer.models import build_model

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
SEQ = 200
MODELS = {
    # one period of linear, linear, csa, full; csa_window 64 and csa_block 4 (the defaults)
    "hybrid": {"arch": "hybrid", "preset": "hybrid-tiny"},
    "dense-xsa": {"arch": "dense", "preset": "atom", "vocab_size": 300, "d_model": 48, "n_layers": 2,
                  "n_heads": 3, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 64},
    "dense-argonne": {"arch": "dense", "preset": "argonne-3.0", "vocab_size": 300, "d_model": 48, "n_layers": 2,
                      "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 64, "rope_layout": "interleaved",
                      "sliding_window": 24, "window_layers": "odd", "tie_embeddings": False},
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler: `cc` is not on PATH")
    exe = tmp_path_factory.mktemp("c") / "run"
    r = subprocess.run([cc, "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-o",
                        str(exe), str(REPO / "c" / "run.c"), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def random_model(cfg: dict, std: float = 0.2):
    torch.manual_seed(0)
    m = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            else:  # norm weights, hyper-connection scales, dt_bias: far from their init
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def run(exe, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def c_logits(exe, path, ids, out) -> np.ndarray:
    run(exe, path, "-t", ",".join(map(str, ids)), "-m", "logits", "-o", out)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def sequence(vocab: int, n: int = SEQ, seed: int = 2) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_pytorch_at_every_position(runner, tmp_path, name):
    m = random_model(MODELS[name], std=0.15 if name == "hybrid" else 0.3)
    path = export_c(m, {"model": MODELS[name]}, None, tmp_path / "model.bin")
    ids = sequence(m.config.vocab_size)
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0].numpy()  # the full-sequence path: chunked delta rule, masked CSA
    got = c_logits(runner, path, ids, tmp_path / "logits.f32")
    assert np.abs(ref).max() > 1.0  # logits far from flat: the comparison means something
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_threads_give_the_same_logits(runner, tmp_path):
    """An OpenMP build that threads every loop (PAR_MIN=1), on 2 threads: no races between heads/rows."""
    exe = tmp_path / "run_omp"
    r = subprocess.run(["cc", "-O2", "-std=c99", "-fopenmp", "-DPAR_MIN=1", "-o", str(exe), str(REPO / "c" / "run.c"),
                        "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cc has no OpenMP: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    m = random_model(MODELS["hybrid"], std=0.15)
    path = export_c(m, {}, None, tmp_path / "model.bin")
    ids = sequence(m.config.vocab_size, 80)
    one = c_logits(runner, path, ids, tmp_path / "one.f32")
    run(exe, path, "-t", ",".join(map(str, ids)), "-m", "logits", "-o", tmp_path / "two.f32", "-j", 2)
    two = np.fromfile(tmp_path / "two.f32", dtype=np.float32).reshape(len(ids), -1)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["hybrid", "dense-xsa"])
def test_greedy_continuation_matches_generate(runner, tmp_path, name):
    m = random_model(MODELS[name])
    path = export_c(m, {"model": MODELS[name]}, None, tmp_path / "model.bin")
    prompt = sequence(m.config.vocab_size, 70, seed=3)  # past the CSA window before decoding starts
    ref = generate(m, prompt, GenerationConfig(greedy=True, max_new_tokens=40))
    out = run(runner, path, "-t", ",".join(map(str, prompt)), "-n", 40, "-T", 0, "-m", "ids")
    assert [int(t) for t in out.stdout.split()] == ref


def test_bf16_matrices_match_rounded_weights(runner, tmp_path):
    m = random_model(MODELS["hybrid"], std=0.15)
    path = export_c(m, {}, None, tmp_path / "model.bin", dtype="bf16")
    assert path.stat().st_size < 0.6 * export_c(m, {}, None, tmp_path / "f32.bin").stat().st_size
    with torch.no_grad():  # what the runner computes with: matrices rounded to bf16, vectors exact
        for p in m.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(torch.bfloat16).float())
    ids = sequence(m.config.vocab_size, 80)
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(c_logits(runner, path, ids, tmp_path / "l.f32"), ref, rtol=0, atol=1e-4)


def test_export_refuses_a_parameter_it_would_drop(tmp_path):
    m = build_model(MODELS["hybrid"])
    m.blocks[2].mixer.register_parameter("extra_gate", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(ValueError, match="not exported.*extra_gate"):
        export_c(m, {}, None, tmp_path / "model.bin")
    assert not (tmp_path / "model.bin").exists()


# ------------------------------------------------------------------------------------ bad files

@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    m = random_model(MODELS["dense-xsa"])
    return export_c(m, {}, None, tmp_path_factory.mktemp("good") / "model.bin").read_bytes()


def _with_int(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<i", value) + data[offset + 4:]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"GGUF" + b[4:], "not a ShardLoom C model"),
    (lambda b: _with_int(b, 4, 2), "format version 2, this runner reads version 1"),
    (lambda b: b[:100], "truncated: 100 bytes, the header alone is 192"),
    (lambda b: b[:len(b) // 2], "truncated: tensor data needs"),
    (lambda b: b[:-3], "truncated: the tokenizer section"),
    (lambda b: _with_int(b, 64 + 4 * 1, 40), "tensor 0 (embed.weight) is [300, 48] in the file, the config implies [300, 40]"),
    (lambda b: _with_int(b, 64 + 4 * 4, 2), "n_heads=3 is not a multiple of n_kv_heads=2"),
    (lambda b: _with_int(b, 64 + 4 * 12, 1), "the config implies 24 tensors, the file lists 20"),
    (lambda b: b + b"\0" * 8, "8 bytes after the tokenizer section"),
])
def test_bad_files_give_one_line_and_exit_2(runner, tmp_path, good_file, damage, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(good_file))
    r = run(runner, bad, "-t", "1,2,3", "-n", 2, check=False)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and str(bad) in r.stderr


def test_bad_arguments(runner, tmp_path, good_file):
    (tmp_path / "m.bin").write_bytes(good_file)
    for args, message in [(["-t", "1,999"], "token id 999 is outside the vocabulary [0, 300)"),
                          (["-i", "hello"], "pass ids with -t"), (["-t", "1", "-m", "logits"], "needs -o FILE")]:
        r = run(runner, tmp_path / "m.bin", *args, check=False)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = run(runner, tmp_path / "missing.bin", "-t", "1", check=False)
    assert r.returncode == 2 and "cannot open" in r.stderr


# ------------------------------------------------------------------------------------ tokenizers

TEXTS = TRICKY_TEXTS + ["I'm sure they'll say it's THE'RE"]  # the contraction rules of the pre-tokenizers


def _tiny_for(tok):
    return build_model({"arch": "dense", "vocab_size": tok.vocab_size, "d_model": 8, "n_layers": 1,
                        "n_heads": 1, "ffn_dim": 8})


def _check_encoding(exe, tok, path):
    export_c(_tiny_for(tok), {}, tok, path)
    for text in TEXTS:
        if getattr(tok, "_normalize", None) and unicodedata.normalize(tok._normalize, text) != text:
            continue  # run.c applies no Unicode normalisation (docs/c-format.md): Qwen3's NFC texts differ
        ref = ([tok.bos_id] if tok.add_bos else []) + tok.encode(text)
        out = run(exe, path, "-i", text, "-m", "encode").stdout
        assert [int(t) for t in out.split()] == ref, text


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory, docs) -> Path:
    """A byte-level BPE trained like the demo's (GPT-2 pre-tokenizer), small enough to train in a blink."""
    return trainhelp.make_bpe_json(tmp_path_factory.mktemp("bpe") / "tokenizer.json", docs[:200], vocab_size=500,
                                   specials=("<pad>", "<s>", "</s>", "<|endoftext|>"))


@pytest.mark.parametrize("name", ["bpe", "cl100k", "qwen3", "llama2"])
def test_encoding_matches_the_tokenizer(runner, tmp_path, request, name):
    from shards.tokenizers import get_tokenizer
    if name == "bpe":
        tok = get_tokenizer(str(request.getfixturevalue("bpe_json")))
    elif name == "llama2":
        tok = get_tokenizer("llama2", path=request.getfixturevalue("llama2_model"))
    else:
        tok = get_tokenizer(name)
    _check_encoding(runner, tok, tmp_path / "tok.bin")


def test_text_generation_and_sampling(runner, tmp_path, bpe_json):
    """-i text in, text out (the prompt echoed, then the continuation); a seed fixes a sampled run."""
    from shards.tokenizers import get_tokenizer
    tok = get_tokenizer(str(bpe_json))
    cfg = {**MODELS["dense-xsa"], "vocab_size": tok.vocab_size}
    path = export_c(random_model(cfg), {"model": cfg}, tok, tmp_path / "model.bin")
    prompt = "The class statement"
    def text(seed):  # bytes: a random model may stop inside a UTF-8 character
        args = [runner, path, "-i", prompt, "-n", 20, "-T", 0.9, "-p", 0.9, "-s", seed, "-E"]
        return subprocess.run(list(map(str, args)), capture_output=True, check=True).stdout
    outs = [text(7), text(7), text(8)]
    assert outs[0].startswith(prompt.encode()) and outs[0] == outs[1] and outs[0] != outs[2]
    ids = run(runner, path, "-i", prompt, "-n", 20, "-T", 0.9, "-p", 0.9, "-s", 7, "-E", "-m", "ids").stdout
    new = [int(t) for t in ids.split()]
    assert len(new) == 20
    assert outs[0][:-1].decode("utf-8", "replace") == tok.decode(tok.encode(prompt) + new)


def test_export_cli_on_a_checkpoint(runner, tmp_path, bpe_json):
    from safetensors.torch import save_model
    ck = tmp_path / "run" / "checkpoints" / "step_0000010"
    ck.mkdir(parents=True)
    m = random_model(MODELS["hybrid"])
    save_model(m, str(ck / "model.safetensors"))
    (ck / "config.json").write_text(json.dumps({"model": MODELS["hybrid"],
                                                "tokenizer": {"name": "tiny-bpe", "path": str(bpe_json)}}))
    assert export_main([str(ck), "--out", str(tmp_path / "model.bin"), "--dtype", "bf16"]) == 0
    assert run(runner, tmp_path / "model.bin", "-i", "Hello", "-m", "encode").stdout.strip()
    assert export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.bin")]) == 2
    # trainer.tools.export --format c is the same command
    from trainer.tools.export import main as export_any

    assert export_any([str(ck), "--out", str(tmp_path / "same.bin"), "--format", "c", "--dtype", "bf16"]) == 0
    assert (tmp_path / "same.bin").read_bytes() == (tmp_path / "model.bin").read_bytes()
    assert export_any([str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.bin"), "--format", "c"]) == 2
