"""Faults of the machine around a healthy run (trainer/faults.py), each reproduced for real: a stop
signal (SIGTERM, SIGUSR1 with a Slurm requeue; one process and torchrun with 2 gloo ranks), a disk
that fills (a small tmpfs mounted by the test), a rank that stops answering (SIGSTOP)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import trainhelp
from safetensors.torch import load_file
from trainhelp import metric_rows, tiny_curriculum, train, train_losses

import trainer.loop as loop
from trainer.checkpoint import checkpoint_problem, list_checkpoints
from trainer.faults import EXIT_NO_SPACE, EXIT_PEER_LOST, EXIT_STOPPED


def final_weights(run_dir: Path) -> dict:
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def assert_same_run(run_dir: Path, straight: Path) -> None:
    """Final weights bit for bit, and the metrics read as one run (train_losses refuses duplicates)."""
    assert list_checkpoints(run_dir)[-1].name == list_checkpoints(straight)[-1].name
    w, ref = final_weights(run_dir), final_weights(straight)
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
    assert train_losses(run_dir) == train_losses(straight)


# A program that runs trainer.run with one fault injected as step AT (0-based) begins on rank RANK:
# signal SIG sent to TARGET (self: this process; parent: the launcher, torchrun, which forwards it).
HOOK = """
import os, signal, sys
import trainer.loop as loop
import trainer.run as run
at, rank, sig, target = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
set_lr = loop.set_lr
def hook(opt, step, *a, **k):
    if step == at and os.environ.get("RANK", "0") == rank:
        pid = os.getpid() if target == "self" else os.getppid()
        print(f"[test] {sig} to pid {pid} as step {step} begins", flush=True)
        os.kill(pid, getattr(signal, sig))
    return set_lr(opt, step, *a, **k)
loop.set_lr = hook
sys.exit(run.main(sys.argv[5:]))
"""


def launch_hooked(tmp_path: Path, args, at: int, sig: str, rank: int = 0, target: str = "self", nproc: int = 2,
                  until=None, timeout: float = 240) -> tuple[int, str, float]:
    """HOOK under torchrun (--standalone, nproc gloo ranks): (launcher's exit code, all output, seconds).
    `until(output)` is polled while it runs; what it returns (a pid) is SIGKILLed once."""
    script = tmp_path / "hooked.py"
    script.write_text(HOOK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(at), str(rank), sig, target, *map(str, args)]
    log = tmp_path / "hooked.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=trainhelp.ROOT, env=trainhelp.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            while p.poll() is None and time.monotonic() - t0 < timeout:
                if until is not None and (pid := until(log.read_text())):
                    os.kill(pid, signal.SIGKILL)  # a stopped process takes only SIGKILL
                    until = None
                time.sleep(0.2)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    return p.returncode, log.read_text(), time.monotonic() - t0


@pytest.fixture
def sig_at(monkeypatch):
    """In this process, once: send `sig` to ourselves as step `at` (0-based) begins; `also_in_save`
    sends it again while the checkpoint it causes is being written."""

    def arm(at: int, sig=signal.SIGTERM, also_in_save: bool = False):
        set_lr, save = loop.set_lr, loop.save_checkpoint
        sent = []

        def hook(opt, step, *a, **k):
            if step == at and not sent:
                sent.append(step)
                # without the trainer's handler the signal would end pytest itself: fail instead
                assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler), "no stop handler"
                os.kill(os.getpid(), sig)
            return set_lr(opt, step, *a, **k)

        def save_again(*a, **k):
            if len(sent) == 1:  # a second signal mid-save must change nothing
                sent.append("save")
                os.kill(os.getpid(), sig)
            return save(*a, **k)

        monkeypatch.setattr(loop, "set_lr", hook)
        if also_in_save:
            monkeypatch.setattr(loop, "save_checkpoint", save_again)

    return arm


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    return tiny_curriculum(tmp_path_factory.mktemp("cur"))  # 8 steps, eval every 4, checkpoints every 3


@pytest.fixture(scope="module")
def straight(cur):
    run_dir = cur.parent / "straight"
    assert train([cur, "--run-dir", run_dir])[0] == 0
    return run_dir


# ---------------------------------------------------------------------------------- 1. stop signals


def test_sigterm_saves_the_step_and_resume_is_bit_exact(cur, straight, tmp_path, sig_at, capsys):
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    sig_at(3, also_in_save=True)  # as the 4th step begins; again during the save it causes
    rc, out, err = train([cur, "--run-dir", run_dir], capsys)
    assert rc == EXIT_STOPPED, err
    line = [l for l in err.splitlines() if l.startswith("stopped:")]
    assert len(line) == 1 and "SIGTERM after step 4" in line[0] and "step_0000004" in line[0], err
    ck = run_dir / "checkpoints" / "step_0000004"
    assert checkpoint_problem(ck) is None and not list(ck.parent.glob("*.tmp"))
    assert max(train_losses(run_dir)) == 4 and not (run_dir / "DONE").exists()
    assert [r["step"] for r in metric_rows(run_dir, "eval")] == [4]  # the step's eval ran before the stop
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler again

    rc, out, err = train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0 and "step_0000004" in out, err
    assert_same_run(run_dir, straight)
    assert (run_dir / "eval.csv").read_text() == (straight / "eval.csv").read_text()


def test_sigusr1_requeues_the_slurm_job(cur, tmp_path, sig_at, capsys, monkeypatch):
    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    sig_at(1, signal.SIGUSR1)
    rc, out, err = train([cur, "--run-dir", tmp_path / "run", "train.requeue=true"], capsys)
    assert rc == EXIT_STOPPED and "SIGUSR1 after step 2" in err, err
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in out
    assert checkpoint_problem(tmp_path / "run" / "checkpoints" / "step_0000002") is None


def test_sigint_stops_without_requeue_when_not_a_requeue_signal(cur, tmp_path, sig_at, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: a requeue attempt would say so
    sig_at(0, signal.SIGINT)
    rc, out, err = train([cur, "--run-dir", tmp_path / "run", "train.requeue=true"], capsys)
    assert rc == EXIT_STOPPED and "SIGINT after step 1" in err and "requeue" not in out + err, out + err


@pytest.fixture(scope="module")
def straight2(cur):
    """The uninterrupted run on 2 gloo ranks (torchrun), no evals."""
    run_dir = cur.parent / "straight2"
    trainhelp.run([cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0"], nproc=2)
    return run_dir


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(cur, straight2, tmp_path):
    run_dir = tmp_path / "run"
    args = [cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0"]
    rc, out, _ = launch_hooked(tmp_path, args, at=1, sig="SIGTERM", target="parent")  # torchrun forwards it
    assert rc != 0, out
    m = re.search(r"stopped: SIGTERM after step (\d+)", out)
    assert m and out.count("stopped:") == 1, out[-3000:]
    step = int(m.group(1))
    assert 2 <= step < 8 and f"exit {EXIT_STOPPED}" in out
    assert checkpoint_problem(run_dir / "checkpoints" / f"step_{step:07d}") is None
    assert max(train_losses(run_dir)) == step  # both ranks stopped after the same step: nothing past it
    trainhelp.run([cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0", "--resume"], nproc=2)
    assert_same_run(run_dir, straight2)


# ------------------------------------------------------------------------------------ 3. a hung rank


def test_a_stopped_rank_is_named_and_resume_continues(cur, straight2, tmp_path):
    run_dir = tmp_path / "run"
    minutes = 0.2
    args = [cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0", f"train.dist_timeout={minutes}"]

    def kill_stopped(out: str):  # once torchrun has seen the survivor exit, the stopped rank goes (else it waits 30 s)
        pid = re.search(r"SIGSTOP to pid (\d+)", out)
        return int(pid.group(1)) if pid and f"Sending process {pid.group(1)} closing signal" in out else None

    rc, out, secs = launch_hooked(tmp_path, args, at=4, sig="SIGSTOP", rank=1, until=kill_stopped)
    lines = [l for l in out.splitlines() if "timed out after" in l]
    assert rc != 0 and len(lines) == 1, out[-3000:]
    assert lines[0].startswith("error: rank 0: a collective at step 5 ") and "waiting for rank 1;" in lines[0]
    assert f"exit {EXIT_PEER_LOST}" in lines[0] and "step_0000003" in lines[0]
    assert re.search(rf"exitcode\s*: {EXIT_PEER_LOST} ", out), out[-3000:]  # torchrun saw the survivor's status
    assert secs < 3 * minutes * 60 + 90, secs  # the timeout given, not gloo's default 30 minutes
    trainhelp.run(args + ["--resume"], nproc=2)
    assert_same_run(run_dir, straight2)


# ----------------------------------------------------------------------------------------- 2. disk


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on `disk`."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def ckpt_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in ckpt.rglob("*") if f.is_file())


def figures(text: str) -> tuple[float, float]:
    """(free, needed) from the preflight warning, in bytes."""
    unit = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    m = re.search(r"([\d.]+) (\w+) free, the run keeps about ([\d.]+) (\w+)", text)
    assert m, text
    return float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]


def test_too_little_disk_is_refused_before_step_0_with_strict_disk(cur, straight, small_disk, capsys):
    one = ckpt_bytes(list_checkpoints(straight)[-1])
    fill(small_disk, one)  # room for one checkpoint of the 3 the run keeps at a time
    rc, _, err = train([cur, "--run-dir", small_disk / "run", "--strict-disk"], capsys)
    assert rc == 2 and "--strict-disk" in err and "checkpoint.keep_last 2" in err, err
    free, need = figures(err)
    assert free < need and abs(free - shutil.disk_usage(small_disk).free) < 1e3
    assert need >= 3 * one * 0.9  # the estimate from the counts covers the real files
    assert not (small_disk / "run").exists()  # refused before anything was written


def test_disk_full_during_a_save_is_one_line_and_resume_works_once_freed(cur, straight, small_disk, capsys):
    one = ckpt_bytes(list_checkpoints(straight)[-1])
    filler = fill(small_disk, one * 3 // 2)  # the first checkpoint fits, the second does not
    run_dir = small_disk / "run"
    rc, out, err = train([cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0"], capsys)
    assert rc == EXIT_NO_SPACE, out + err
    assert "[disk]" in out and "--strict-disk makes this an error" in out  # warned before step 0
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device saving"), err
    assert str(run_dir / "checkpoints" / "step_0000006") in lines[0] and "step_0000003" in lines[0]
    assert re.search(r"needs ~[\d.]+ \wB, [\d.]+ \wB free", lines[0]) and "Traceback" not in err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_0000003"]  # partial one removed

    filler.unlink()
    rc, out, err = train([cur, "--run-dir", run_dir, "eval.every=0", "eval.batches=0", "--resume"], capsys)
    assert rc == 0 and "step_0000003" in out, err
    w, ref = final_weights(run_dir), final_weights(straight)  # evals change no weight
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    assert train_losses(run_dir) == train_losses(straight)
