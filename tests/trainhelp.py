"""The tests' one helpers module (as OLMo-core's test/data/fixtures.py): synthetic shard dirs, tiny
tokenizers, a tiny curriculum, the trainer launcher (in this process, in a subprocess, or under
torchrun on one node or several), and the S3 server behind conftest's `server`/`s3` fixtures.
Imported as `import trainhelp` (conftest.py puts tests/ on sys.path)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

from shards.manifest import TokenizerInfo, write_source

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
TINY_TOKENIZER = TokenizerInfo(name="tiny", vocab_size=VOCAB, vocab_hash="tiny-hash", eos_id=0)


def make_tokenizer_json(path: Path, words: str = "w") -> Path:
    """A real VOCAB-id tokenizer.json (HF `tokenizers` WordLevel: EOS <|endoftext|> 0, then `words`1..63),
    for tests that load the curriculum's tokenizer; another `words` prefix is another vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"{words}{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"{words}1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_bpe_json(path: Path, texts, vocab_size: int, specials=CHATML_SPECIALS) -> Path:
    """A byte-level BPE tokenizer.json (HF `tokenizers`, GPT-2 pre-tokenizer, the demo's and
    train_tokenizer's shape) trained on `texts`; `specials` take the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def write_shards(d: Path, shards: dict, info: TokenizerInfo = TINY_TOKENIZER, **kw) -> Path:
    """The one synthetic-shard builder: shards.manifest.write_source with the tiny tokenizer by default."""
    return write_source(d, shards, info, **kw)


def make_source(d: Path, seed: int, docs: int = 60, val_docs: int = 8, info: TokenizerInfo = TINY_TOKENIZER) -> Path:
    """Tiny shard dir with learnable structure (arithmetic-progression documents); `info` goes into
    its manifest (the shards' own metadata keep the name "tiny")."""
    rng = np.random.default_rng(seed)
    shards = {}
    for split, n in (("train", docs), ("val", val_docs)):
        shards[f"{split}/00000"] = []
        for _ in range(n):
            start, step, length = rng.integers(1, VOCAB), rng.integers(1, 4), rng.integers(20, 60)
            doc = (start + step * np.arange(length)) % (VOCAB - 1) + 1
            shards[f"{split}/00000"].append(np.append(doc, 0))
    return write_shards(d, shards, info, dtype="<u2", name="tiny")


def make_sft_source(d: Path, seed: int = 0, docs: int = 40, val_docs: int = 8,
                    prompt_lens=(10,), answer_lens=(12,)) -> Path:
    """Shard dir of prompt + sorted-answer + EOS documents with `.ds.loss` masks (1 on answer and EOS).
    Several lengths to pick from make documents (and so micro-batches) of very different mask density."""
    rng = np.random.default_rng(seed)
    shards = {}
    for split, n in (("train", docs), ("val", val_docs)):
        shards[f"{split}/00000"] = []
        for _ in range(n):
            p, a = int(rng.choice(prompt_lens)), int(rng.choice(answer_lens))
            prompt = rng.integers(1, VOCAB, p)
            answer = np.sort(rng.integers(1, VOCAB, a))
            shards[f"{split}/00000"].append((np.concatenate([prompt, answer, [0]]), np.r_[np.zeros(p), np.ones(a + 1)]))
    return write_shards(d, shards, dtype="<u2", name="tiny", with_loss=True)


def tiny_curriculum(tmp_path: Path, **over) -> Path:
    """Two tiny sources (a, b) with a linear 0.9/0.1 -> 0.1/0.9 mixture; `over` replaces whole sections."""
    a = make_source(tmp_path / "data" / "a", 1)
    b = make_source(tmp_path / "data" / "b", 2)
    cur = {
        "model": {"arch": "dense", "vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                  "ffn_dim": 64, "max_seq_len": 32},
        "tokenizer": {"name": "tiny"},
        "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}],
                 "schedule": [{"at": 0.0, "weights": {"a": 0.9, "b": 0.1}}, {"at": 1.0, "weights": {"a": 0.1, "b": 0.9}}]},
        "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup": 2, "min_lr_ratio": 0.1},
        "batch": {"seq_len": 32, "micro_batch": 2, "grad_accum": 2},
        "train": {"steps": 8, "seed": 7, "dtype": "fp32"},
        "eval": {"every": 4, "batches": 1},
        "checkpoint": {"every": 3, "keep_last": 2},
    }
    for k, v in over.items():
        cur[k] = v
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cur))
    return p


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a server or a rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def env() -> dict:
    """The test's environment without any torchrun variables, one thread per process."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in TORCHRUN_VARS:
        e.pop(k, None)
    return e


def train(args, capsys=None) -> tuple[int, str, str]:
    """`trainer.run.main(ARGS)` in this process: (exit code, stdout, stderr), the output read from
    `capsys` ("" without it); conftest keeps torchrun's variables out of every test. `run` is the same
    launch as a real process, or several under torchrun."""
    from trainer.run import main

    rc = main([str(a) for a in args])
    if capsys is None:
        return rc, "", ""
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run(args, nproc: int = 1, nnodes: int = 1, check: bool = True, timeout: int = 240,
        kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`python -m trainer.run ARGS`; with `nproc` > 1 the same under torchrun (gloo, --standalone) with
    nproc CPU processes; with `nnodes` > 1, nnodes torchrun launchers of nproc processes each, meeting
    at a c10d rendezvous on 127.0.0.1 as separate machines would. The nodes' outputs are joined in node
    order and the exit code is the first node's that is not 0; `timeout` covers the whole launch (every
    launcher is killed when it runs out). `kill_at`: one process that SIGKILLs itself as that step begins."""
    if kill_at is not None and nproc * nnodes > 1:
        raise ValueError("kill_at runs one plain process: torchrun cannot launch a -c program")
    launcher = [sys.executable]
    if nnodes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
                     "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=shardloom-test",
                     "--rdzv-conf=timeout=60"]
    elif nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    program = ["-m", "trainer.run"] if kill_at is None else ["-c", _KILL_AT, str(kill_at)]
    cmd = [*launcher, *program, *map(str, args)]
    with contextlib.ExitStack() as stack:  # files, not pipes: a node never blocks on a full pipe nobody reads
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")), stack.enter_context(tempfile.TemporaryFile("w+")))
                 for _ in range(nnodes)]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=err, text=True) for out, err in files]
        try:
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for f in (f for pair in files for f in pair):
            f.seek(0)
        outs = [(out.read(), err.read()) for out, err in files]
    codes = [p.returncode for p in procs]
    if check:
        assert codes == [0] * nnodes, (codes, "\n---\n".join(o[-2000:] + e[-3000:] for o, e in outs))
    return subprocess.CompletedProcess(cmd, next((c for c in codes if c != 0), 0),
                                       "\n".join(o for o, _ in outs), "\n".join(e for _, e in outs))


# Fault injection from outside the training loop: the child patches trainer.loop.set_lr (called once
# at the start of every step) to SIGKILL its own process when step KILL_AT begins.
_KILL_AT = """
import os, signal, sys
import trainer.loop as loop
import trainer.run as run
set_lr, at = loop.set_lr, int(sys.argv[1])
def kill_at(opt, step, *a, **k):
    if step == at:
        print(f"[test] SIGKILL at the start of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return set_lr(opt, step, *a, **k)
loop.set_lr = kill_at
sys.exit(run.main(sys.argv[2:]))
"""


def run_killed_at(step: int, args, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m trainer.run ARGS`, SIGKILLed (uncatchable, nothing flushed or cleaned up) as step
    `step` begins: steps 0..step-1 are done."""
    r = run(args, check=False, timeout=timeout, kill_at=step)
    assert r.returncode == -9, (r.returncode, r.stdout[-2000:] + r.stderr[-3000:])
    return r


def metric_rows(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    train = metric_rows(run_dir)
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), "duplicated or unordered steps after resume"
    return {r["step"]: r["loss"] for r in train}


# ------------------------------------------------------------------------------ S3 (moto)

SECRET = "sEcReT-" + uuid.uuid4().hex  # the s3 fixture's secret key: must never appear in any output


class StoppableS3:
    """moto's server app on 127.0.0.1:port; stop() closes the listener and severs every open
    connection; start() again serves the same (surviving) storage on the same port."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread = None

    def start(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import ThreadedWSGIServer

        conns: set = set()

        class Server(ThreadedWSGIServer):
            def get_request(self):
                conn, addr = super().get_request()
                conns.add(conn)
                return conn, addr

        self._server = Server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                              handler=MotoRequestHandler)
        self._server.conns = conns
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        for c in list(self._server.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._thread.join(5)

    def post(self, path: str, data: bytes = b"") -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.endpoint + path, data=data, method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()


def tokenize_stats(out: Path) -> dict:
    """A tokenize run's stats (OUT/logs/tokenize), every task's and step's counts summed by label."""
    from pipelines.cli import read_stats

    merged = {}
    for _name, s in read_stats(str(Path(out) / "logs" / "tokenize")):
        for k, v in s.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def fineweb_tokenize(inp, out, *extra) -> int:
    """The FineWeb pipeline's `tokenize` CLI in this process, everything to train (--val-fraction 0)."""
    from pipelines.cli import main
    from pipelines.fineweb import CORPUS

    return main(CORPUS, ["tokenize", "--input", str(inp), "--output", str(out), "--val-fraction", "0", *map(str, extra)])


def write_jsonl(path: Path, texts, key: str = "text") -> Path:
    """One JSONL file of rows {"id": "dI", key: text} (a text may be any JSON value, None included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"d{i}", key: t}) + "\n" for i, t in enumerate(texts)))
    return path


def word_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts of 40 random words w1..w63 (make_tokenizer_json's vocabulary)."""
    import random

    r = random.Random(seed)  # incompressible enough that a cut .gz loses only its tail
    return [" ".join(f"w{r.randrange(1, 64)}" for _ in range(40)) for _ in range(n)]


# ------------------------------------------------------------------ model runs for export tests

EXPORT_BASE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
ARCHS = {  # name -> (model section without vocab_size, exported as Llama?)
    "atom-xsa": (dict(arch="dense", **EXPORT_BASE, rope_theta=5000.0, xsa_layers="all", attn_scale=0.2), False),
    "atom-no-xsa": (dict(arch="dense", **EXPORT_BASE, rope_theta=5000.0), True),
    "axiom-interleaved": (dict(arch="dense", **EXPORT_BASE, rope_layout="interleaved", init="depth_scaled"), True),
    "argonne": (dict(arch="dense", **EXPORT_BASE, qk_norm=True, v_norm=True, sandwich_norm=True, logit_softcap=15.0,
                     norm_eps=1e-6, init="fan_in"), False),
    "hybrid": (dict(arch="hybrid", preset="hybrid-tiny"), False),
}


def make_run(root: Path, name: str, chat_bpe_json: Path, seed: int = 0, chat: bool = False):
    """A run dir in the trainer's layout holding one checkpoint of a random `ARCHS[name]` model whose
    norm weights and gains are moved off their init (so a misplaced norm cannot go unnoticed):
    (run dir, the model)."""
    import torch
    from safetensors.torch import save_model

    from trainer.models import build_model

    section = {**ARCHS[name][0], "vocab_size": 384}
    torch.manual_seed(seed)
    model = build_model(section)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    ck = root / name / "checkpoints" / "step_0000003"
    ck.mkdir(parents=True)
    save_model(model, str(ck / "model.safetensors"))
    cfg = {"model": section, "tokenizer": {"name": "tiny-bpe", "path": str(chat_bpe_json)},
           "data": {"sources": [{"name": "docs", "path": "x"}], "packing": "document" if chat else "stream"},
           "sample": {"prompt": "The", "max_new_tokens": 16, "temperature": 0.7, "top_k": 20}}
    (ck / "config.json").write_text(json.dumps(cfg))
    return root / name, model.eval()


# ------------------------------------------------------------------ pipeline corpora


# A fixed set of side-effect-free modules (the demo uses the whole stdlib).
TEST_MODULES = """abc argparse ast base64 bisect calendar collections configparser contextlib csv dataclasses
datetime decimal difflib email.message enum fractions functools gzip heapq inspect io ipaddress json
logging mailbox math pathlib pickle random re shutil socket sqlite3 statistics string subprocess
tarfile tempfile textwrap threading typing unittest urllib.parse zipfile""".split()


def paragraphs(n: int | None = None) -> list[str]:
    """Distinct paragraphs of Python's own docs (topics, then TEST_MODULES' docstrings): the pipeline
    tests' corpus, no download."""
    from pipelines.demo import docstring_rows, topic_rows

    out, seen = [], set()
    for row in topic_rows() + docstring_rows(TEST_MODULES, min_chars=80):
        for para in row["text"].split("\n\n"):
            para = para.strip()
            if len(para) >= 40 and para not in seen:
                seen.add(para)
                out.append(para)
    return out[:n] if n else out


def write_corpus(folder: Path, texts, files: int = 3, ids: bool = True, compress: bool = False) -> Path:
    """`texts` as JSONL rows (with ids doc-J unless not `ids`) dealt round-robin over `files` files."""
    from pipelines.demo import write_jsonl_gz

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        rows = [{"text": t, **({"id": f"doc-{j}"} if ids else {})} for j, t in enumerate(texts) if j % files == i]
        if compress:
            write_jsonl_gz(rows, folder / f"{i:05d}.jsonl.gz")
        else:
            with open(folder / f"{i:05d}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    return folder


def shard_files(d: Path) -> dict[str, bytes]:
    """Every file of a shard dir except logs (they hold timestamps by design)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "logs" not in p.relative_to(d).parts}


def kill_when_shard_1_starts(cmd: list, out: Path, env: dict | None = None, timeout: int = 60) -> None:
    """Run a tokenize command and SIGKILL its whole process group as soon as shard 00001's temporary
    file appears under OUT/train (shard 00000 done, 00001 half written): an interrupted run."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    caught, deadline = False, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if list((out / "train").glob("00001.ds*.tmp")):
            os.killpg(proc.pid, signal.SIGKILL)
            caught = True
            break
        time.sleep(0.005)
    proc.wait()
    assert caught, "the run finished before it could be interrupted; make task 1 larger"


def checkpoint_weights(run_dir: Path, step: int) -> dict:
    """The model.safetensors tensors of RUN/checkpoints/step_<step>."""
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def assert_rows_match(a_dir: Path, b_dir: Path, steps) -> None:
    """Two runs' train rows agree at `steps`: loss and gradient norm within fp32 reduction order."""
    import pytest

    a = {r["step"]: r for r in metric_rows(a_dir)}
    b = {r["step"]: r for r in metric_rows(b_dir)}
    for s in steps:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-5), s
