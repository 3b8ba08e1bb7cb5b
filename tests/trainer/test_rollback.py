"""Rollback on a bad step (trainer/guard.py): a forward made to return a non-finite loss at a chosen
data step (patched from outside the loop) rolls back to the last checkpoint, skips exactly that
step's batches, logs it, and the run completes; a SIGKILL + resume after the rollback is bit-exact;
after max_rollbacks it stops with one line."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

import trainer.loop as loop
from trainer.guard import data_step, problem
from trainhelp import ROOT, checkpoint_weights, env, metric_rows, tiny_curriculum, train

ROWS_PER_STEP = 4  # tiny_curriculum: micro_batch 2 x grad_accum 2 x world 1
BAD = 5            # the data step whose loss is made non-finite
SETTINGS = ["train.steps=8", "checkpoint.every=2", "eval.every=0"]


def poison(rows_seen: list, bad_rows=lambda row: row == BAD * ROWS_PER_STEP):
    """loop.forward_backward, with a NaN loss for the chosen rows (recording every step's first row)."""
    real = loop.forward_backward

    def fb(model, batches, *a, **k):
        row = batches[0][3]["row"]
        rows_seen.append(row)
        total = real(model, batches, *a, **k)
        return total * float("nan") if bad_rows(row) else total
    return fb


def test_data_step_skips_exactly_the_listed_steps():
    assert [data_step(t, [2, 5]) for t in range(6)] == [0, 1, 3, 4, 6, 7]
    assert problem(float("nan"), 1.0, [], None, 20) and problem(1.0, float("inf"), [], None, 20)
    assert problem(9.0, 1.0, [1.0, 1.1, 0.9] * 10, 6.0, 20) and not problem(1.2, 1.0, [1.0, 1.1, 0.9] * 10, 6.0, 20)


def test_nan_step_rolls_back_skips_its_batches_and_completes(tmp_path, monkeypatch):
    cur, rows = tiny_curriculum(tmp_path), []
    monkeypatch.setattr(loop, "forward_backward", poison(rows))
    rc, _, err = train([cur, *SETTINGS, "--run-dir", tmp_path / "run"])
    assert rc == 0, err
    r = ROWS_PER_STEP
    # steps 0-5 (data 5 poisoned), back to the step-4 checkpoint, then data 4, 6, 7, 8 for steps 4-7
    assert rows == [0, r, 2 * r, 3 * r, 4 * r, 5 * r, 4 * r, 6 * r, 7 * r, 8 * r]
    (rb,) = metric_rows(tmp_path / "run", "rollback")
    assert (rb["step"], rb["at_step"], rb["skipped_data_step"], rb["rollbacks"]) == (4, 6, BAD, 1)
    assert "loss is nan" in rb["reason"]
    assert [t["step"] for t in metric_rows(tmp_path / "run")] == list(range(1, 9))  # one run, each step once
    st = torch.load(tmp_path / "run/checkpoints/step_0000008/train_state.pt", weights_only=True)
    assert st["guard"]["skipped"] == [BAD]


def test_the_skip_list_is_on_disk_at_once(tmp_path, monkeypatch):
    """The checkpoint rolled back to is saved again with the skip list, so a kill before the next save
    still resumes past the bad batch."""
    cur, rows = tiny_curriculum(tmp_path), []
    monkeypatch.setattr(loop, "forward_backward", poison(rows))
    rc, _, err = train([cur, "train.steps=6", "checkpoint.every=2", "eval.every=0", "--run-dir", tmp_path / "run"])
    assert rc == 0, err
    st = torch.load(tmp_path / "run/checkpoints/step_0000004/train_state.pt", weights_only=True)
    assert st["guard"]["skipped"] == [BAD] and st["guard"]["rollbacks"] == 1 and st["step"] == 4


CHILD = """
import os, signal, sys
import trainer.loop as loop
import trainer.run as run
real, set_lr, kill = loop.forward_backward, loop.set_lr, int(sys.argv[1])
def fb(model, batches, *a, **k):
    total = real(model, batches, *a, **k)
    return total * float("nan") if batches[0][3]["row"] == %d else total
def killer(opt, step, *a, **k):
    if step == kill and os.path.exists(sys.argv[2]):  # after the rollback: the marker is its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return set_lr(opt, step, *a, **k)
loop.forward_backward, loop.set_lr = fb, killer
sys.exit(run.main(sys.argv[3:]))
""" % (BAD * ROWS_PER_STEP)


def child(kill_step: int, marker, args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_step), str(marker), *map(str, args)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_sigkill_after_a_rollback_then_resume_is_bit_exact(tmp_path):
    cur = tiny_curriculum(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = child(-1, tmp_path / "none", [cur, *SETTINGS, "--run-dir", straight])
    assert r.returncode == 0, r.stderr[-3000:]
    # killed as step 7 begins, once the step-6 checkpoint (saved after the rollback) exists
    r = child(7, killed / "checkpoints/step_0000006", [cur, *SETTINGS, "--run-dir", killed])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    r = child(-1, tmp_path / "none", [cur, *SETTINGS, "--run-dir", killed, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = checkpoint_weights(straight, 8), checkpoint_weights(killed, 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [t["loss"] for t in metric_rows(straight)] == [t["loss"] for t in metric_rows(killed)]


def test_gives_up_after_max_rollbacks_with_one_line(tmp_path, monkeypatch, capsys):
    cur, rows = tiny_curriculum(tmp_path), []
    monkeypatch.setattr(loop, "forward_backward", poison(rows, lambda row: row >= BAD * ROWS_PER_STEP))
    rc, _, err = train([cur, *SETTINGS, "train.rollback.max_rollbacks=2", "--run-dir", tmp_path / "run"], capsys)
    assert rc == 3
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "gave up after 2 rollbacks" in line and "Traceback" not in err
    assert len(metric_rows(tmp_path / "run", "rollback")) == 2
