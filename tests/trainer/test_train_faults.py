"""Trainer faults, each reproduced: crash and restart, damaged checkpoints, no DONE marker, tokenizer and vocab
vs the shards, one-line errors, changes on resume, open files (crash: a patched hook; real SIGKILL: test_resume.py)."""
from __future__ import annotations

import contextlib
import csv
import json
import shutil

import pytest
import torch

import trainhelp
import trainer.loop as loop
from trainer.parallel import Dist
from trainhelp import tiny_curriculum, train


class Crash(Exception):
    """Stands in for a kill: nothing after the injection point runs (no checkpoint, no DONE)."""


@contextlib.contextmanager
def crash_at(step: int):
    """Raise Crash as training step `step` begins (steps 0..step-1 are done and logged)."""
    set_lr = loop.set_lr

    def hook(opt, s, *a, **k):
        if s == step:
            raise Crash(f"injected at step {s}")
        return set_lr(opt, s, *a, **k)

    loop.set_lr = hook
    try:
        with pytest.raises(Crash):
            yield
    finally:
        loop.set_lr = set_lr


def eval_steps(run_dir) -> list[int]:
    with open(run_dir / "eval.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["source"] == "overall"]


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    # 8 steps, eval every 2, checkpoints at 5 only (and the final one); tests never change its data
    d = tmp_path_factory.mktemp("cur")
    return trainhelp.tiny_curriculum(d, eval={"every": 2, "batches": 1}, checkpoint={"every": 5, "keep_last": 3})


@pytest.fixture(scope="module")
def straight(cur):
    """The uninterrupted run (once per module: tests copy it, never change it)."""
    run_dir = cur.parent / "straight"
    assert train([cur, "--run-dir", run_dir])[0] == 0
    return run_dir


# ------------------------------------------------------------------------ 1. restart from step 0


def test_kill_before_the_first_checkpoint_then_resume_drops_the_dead_rows(cur, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with crash_at(3):
        train([cur, "--run-dir", run_dir])
    assert max(trainhelp.train_losses(run_dir)) == 3 and eval_steps(run_dir) == [2]
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0, err
    assert "no valid checkpoint" in out and "step 0" in out, out
    assert trainhelp.train_losses(run_dir) == trainhelp.train_losses(straight)  # 8 rows, not 11
    assert eval_steps(run_dir) == eval_steps(straight) == [2, 4, 6, 8]


def test_deleted_checkpoints_restart_is_said(cur, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with crash_at(7):
        train([cur, "--run-dir", run_dir])
    shutil.rmtree(run_dir / "checkpoints")
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0 and "no valid checkpoint" in out and "dropped" in out, out
    assert trainhelp.train_losses(run_dir) == trainhelp.train_losses(straight)
    assert eval_steps(run_dir) == [2, 4, 6, 8]


# ------------------------------------------------------------------------------ 2. checksums


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(damage, cur, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "DONE").unlink()
    ck = run_dir / "checkpoints"
    assert json.loads((ck / "step_0000008" / "checksums.json").read_text()).keys() == {
        "model.safetensors", "config.json", "train_state.pt"}
    f = ck / "step_0000008" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[-7] ^= 0x01  # one bit of one weight: loads fine, different model
    f.write_bytes(bytes(raw))
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0, err
    assert "skipping" in out and "step_0000008" in out and "sha256" in out, out
    assert "[resume]" in out and "step_0000005" in out, out
    # resumed from step 5, so steps 6-8 were recomputed: the same weights as the straight run
    w, ref = _weights(ck / "step_0000008"), _weights(straight / "checkpoints" / "step_0000008")
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    assert trainhelp.train_losses(run_dir) == trainhelp.train_losses(straight)
    assert eval_steps(run_dir) == [2, 4, 6, 8]


def test_every_checkpoint_damaged_restarts_from_zero_and_says_why(cur, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "DONE").unlink()
    for p in (run_dir / "checkpoints").iterdir():
        (p / "train_state.pt").write_bytes((p / "train_state.pt").read_bytes()[:100])
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0, err
    assert out.count("skipping") == 2 and "no valid checkpoint" in out, out
    assert trainhelp.train_losses(run_dir) == trainhelp.train_losses(straight)


# ---------------------------------------------------------------- 3. finished but no DONE marker


def test_resume_at_the_last_step_does_not_repeat_the_final_eval(cur, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "DONE").unlink()  # killed between the final checkpoint and the DONE marker
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0, err
    assert (run_dir / "DONE").exists()
    assert eval_steps(run_dir) == [2, 4, 6, 8]
    assert [r["step"] for r in trainhelp.metric_rows(run_dir, "eval")] == [2, 4, 6, 8]
    assert (run_dir / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


# ------------------------------------------------------------ 4, 5. the tokenizer against the shards


def _tokenized_with(tmp_path, tok_json):
    """The tiny curriculum whose two sources' manifests name `tok_json`'s vocabulary."""
    from shards.tokenizers import get_tokenizer

    cur = trainhelp.tiny_curriculum(tmp_path, train={"steps": 1, "seed": 7, "dtype": "fp32"}, eval={"every": 0, "batches": 0})
    info = get_tokenizer(str(tok_json)).info()
    for name, seed in (("a", 1), ("b", 2)):
        trainhelp.make_source(tmp_path / "data" / name, seed, info=info)
    return cur


def test_curriculum_tokenizer_other_than_the_shards_is_refused_before_step_0(tmp_path, capsys):
    shards_tok = trainhelp.make_tokenizer_json(tmp_path / "tok-a" / "tokenizer.json", "a")
    other = trainhelp.make_tokenizer_json(tmp_path / "tok-b" / "tokenizer.json", "b")  # same size, other vocabulary
    cur = _tokenized_with(tmp_path, shards_tok)
    rc, out, err = train([cur, "--run-dir", tmp_path / "r", "tokenizer.name=bpe", f"tokenizer.path={other}"], capsys)
    assert rc == 2 and "vocab_hash" in err and "manifest.json" in err and "source 'a'" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    # the shards' own tokenizer, typed as another relative path, trains
    rel = shards_tok.relative_to(tmp_path)
    rc, out, err = train([cur, "--run-dir", tmp_path / "r2", "tokenizer.name=bpe", f"tokenizer.path={tmp_path}/./{rel}"], capsys)
    assert rc == 0, err


def test_unloadable_tokenizer_is_compared_by_name_and_says_so(tmp_path, capsys):
    cur = trainhelp.tiny_curriculum(tmp_path, train={"steps": 1, "seed": 7, "dtype": "fp32"}, eval={"every": 0, "batches": 0})
    rc, out, err = train([cur, "--run-dir", tmp_path / "r"], capsys)  # "tiny" is no tokenizer this machine has
    assert rc == 0 and "by name only" in out, out
    rc, out, err = train([cur, "--run-dir", tmp_path / "r2", "tokenizer.name=qwen-tiny"], capsys)
    assert rc == 2 and "qwen-tiny" in err and "'tiny'" in err, err


def test_sources_with_one_vocabulary_under_two_names_are_accepted(tmp_path):
    """Two sources tokenized with the same tokenizer.json typed as two paths: the loader compared
    names and refused 'vocab_hash X differs from vocab_hash X'."""
    from shards.manifest import TokenizerInfo

    from trainer.data import DataError, MixtureLoader

    tok = dict(vocab_size=trainhelp.VOCAB, vocab_hash="same-vocabulary", eos_id=0)
    a = trainhelp.make_source(tmp_path / "a", 1, info=TokenizerInfo(name="data/tok.json", **tok))
    b = trainhelp.make_source(tmp_path / "b", 2, info=TokenizerInfo(name="/abs/data/tok.json", **tok))
    sources = [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}]
    schedule = [{"tokens": 0, "weights": {"a": 1, "b": 1}}]
    MixtureLoader(sources, schedule, seq_len=16, micro_batch=2, seed=0, total_tokens=320)
    c = trainhelp.make_source(tmp_path / "c", 3, info=TokenizerInfo(name="data/tok.json", **{**tok, "vocab_hash": "other"}))
    with pytest.raises(DataError, match="vocab_hash"):
        MixtureLoader([*sources, {"name": "c", "path": str(c)}], schedule, seq_len=16, micro_batch=2, seed=0,
                      total_tokens=320)


# ------------------------------------ 6. the model's vocabulary: too small for the shards, ids beyond it


def test_vocab_too_small_for_data(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path)
    rc, _, err = train([cur, "model.vocab_size=32", "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "vocab_size" in err and "manifest.json" in err, err


def test_shard_with_ids_beyond_the_model_vocabulary_fails_before_step_0(tmp_path, capsys):
    """The manifest's tokenizer fits the model, but a shard holds id 70 of 64: a bare IndexError
    inside a training step, naming no shard."""
    import numpy as np

    cur = trainhelp.tiny_curriculum(tmp_path)
    a = tmp_path / "data" / "a"
    trainhelp.write_shards(a, {"val/00000": [np.r_[np.arange(1, 40), 70, 0]] * 8})
    rc, out, err = train([cur, "--run-dir", tmp_path / "r"], capsys)
    assert rc == 2 and "val/00000.ds" in err and "70" in err and "64" in err and "source 'a'" in err, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_shard_edited_after_its_manifest_is_named_at_the_step(tmp_path, capsys):
    """Same size, same manifest (checksums off, the default): the ids are checked per batch too."""
    import numpy as np

    cur = trainhelp.tiny_curriculum(tmp_path)
    ds = tmp_path / "data" / "b" / "train" / "00000.ds"
    tokens = np.fromfile(ds, dtype="<u2")
    tokens[::7] = 65000
    tokens.tofile(ds)
    rc, out, err = train([cur, "--run-dir", tmp_path / "r"], capsys)
    assert rc == 2 and "source 'b'" in err and "65000" in err and "shards verify" in err, err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------- 7. one line, exit 2, not a traceback


@pytest.mark.parametrize("edit", ["not json", "splits a list", "unknown dtype", "vocab_size a string", "files null"])
def test_invalid_manifest_is_one_line(edit, tmp_path, capsys):
    cur = trainhelp.tiny_curriculum(tmp_path, train={"steps": 1, "seed": 7, "dtype": "fp32"})
    m = tmp_path / "data" / "a" / "manifest.json"
    good = json.loads(m.read_text())
    bad = {"not json": "{oops", "splits a list": {**good, "splits": []}, "unknown dtype": {**good, "dtype": "float99"},
           "vocab_size a string": {**good, "tokenizer": {**good["tokenizer"], "vocab_size": "64"}},
           "files null": {**good, "files": None}}[edit]
    m.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    for checksums in ("false", "true"):
        rc, out, err = train([cur, "--run-dir", tmp_path / "r", f"data.verify_checksums={checksums}"], capsys)
        assert rc == 2 and str(m) in err and len(err.strip().splitlines()) == 1, err


def test_failed_s3_fetch_is_one_line(tmp_path, capsys, monkeypatch):
    import shards.storage
    from shards.storage import StorageError

    def unreachable(uri, cache_dir, **kw):
        raise StorageError(f"opening bucket {uri[5:].split('/')[0]}: cannot reach http://127.0.0.1:9 "
                           "(EndpointConnectionError); rerun to resume")

    monkeypatch.setattr(shards.storage, "fetch_to_cache", unreachable)
    cur = trainhelp.tiny_curriculum(tmp_path, train={"steps": 1, "seed": 7, "dtype": "fp32"})
    rc, out, err = train([cur, "--run-dir", tmp_path / "r", "data.sources.0.path=s3://bucket/a"], capsys)
    assert rc == 2 and "source 'a' (s3://bucket/a)" in err and "cannot reach" in err, err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- 9. decided and said


def test_seq_len_beyond_the_model_context_is_refused(tmp_path, capsys):
    cur = trainhelp.tiny_curriculum(tmp_path)  # model.max_seq_len 32
    for extra in ([], ["--dry-run"]):
        rc, out, err = train([cur, "--run-dir", tmp_path / "r", "batch.seq_len=64", *extra], capsys)
        assert rc == 2 and "batch.seq_len" in err and "64" in err and "model.max_seq_len" in err and "32" in err, err


@pytest.fixture()
def unfinished(tmp_path, four_step_run):
    """A copy of the 4-step run with its final checkpoint gone: --resume continues from step 2."""
    cur, done = four_step_run
    run_dir = shutil.copytree(done, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    (run_dir / "DONE").unlink()
    return cur, run_dir


def test_lr_changed_on_resume_is_applied_and_said(unfinished, capsys):
    """optim.lr=... on --resume was accepted silently, and the restored optimizer kept the old base lr
    (the log showed the new one)."""
    cur, run_dir = unfinished
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume", "optim.lr=5e-3"], capsys)
    assert rc == 0, err
    assert "optim.lr 0.01 -> 0.005" in out, out
    st = torch.load(run_dir / "checkpoints" / "step_0000004" / "train_state.pt", weights_only=True)
    assert {g["base_lr"] for g in st["optimizer"]["param_groups"]} == {5e-3}
    lrs = {r["step"]: r["lr"] for r in trainhelp.metric_rows(run_dir)}
    assert lrs[3] == pytest.approx(5e-3) and lrs[4] < lrs[3] and lrs[2] == pytest.approx(1e-2)  # peak 1e-2, then 5e-3


def test_optimizer_change_on_resume_is_one_line(unfinished, capsys):
    cur, run_dir = unfinished
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume", "optim.name=muon"], capsys)
    assert rc == 2 and "optim.name" in err and "adamw" in err and len(err.strip().splitlines()) == 1, err
    assert "cannot resume with optim.name muon" in err and "resume with optim.name=adamw" in err, err
    assert "train.init_from=" in err, err


def test_world_size_refusal_names_tokens_per_step(unfinished, capsys, monkeypatch):
    cur, run_dir = unfinished
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of 2, without a process group: refused before any collective
    monkeypatch.setattr(Dist, "init", lambda self, *args: None)
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 2 and "world size 1" in err and "batch.tokens_per_step=128" in err, err
    # the advice works: the same rows per step at world size 2 (grad_accum 1)
    rc, out, err = train([cur, "--run-dir", run_dir, "--resume", "batch.tokens_per_step=128", "batch.grad_accum=null"],
                         capsys)
    assert rc == 0 and "[resume]" in out, err


# -------------------------------------------------------------------------- 8. bounded open files


def test_a_mixture_of_more_shards_than_open_files_allowed_trains(tmp_path):
    """One file descriptor per shard map was held open: 80 shards failed under `ulimit -n 64`
    (a mixture of ~1,000 shard files under the usual 1024). Reproduced with a lowered soft limit."""
    import os
    import resource

    import numpy as np

    from trainer.data import MixtureLoader

    d = tmp_path / "many"
    rng = np.random.default_rng(0)
    trainhelp.write_shards(d, {f"{split}/{j:05d}": [(rng.integers(1, trainhelp.VOCAB, 70), np.ones(70))]
                               for split, n in (("train", 80), ("val", 1)) for j in range(n)}, with_loss=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))  # room for 40 more, not 160 maps
    try:
        loader = MixtureLoader([{"name": "many", "path": str(d)}], [{"tokens": 0, "weights": {"many": 1}}],
                               seq_len=16, micro_batch=64, seed=0, total_tokens=16 * 64 * 8, vocab_size=trainhelp.VOCAB)
        seen = set()
        for step in range(8):  # 512 of the 320 windows: every shard read
            x, y, mask, info = loader.batch(step)
            seen.update(s for _, s in info["samples"])
        assert len(os.listdir("/proc/self/fd")) <= in_use + 8
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(seen) == 320 and int(x.max()) < trainhelp.VOCAB and mask is not None
