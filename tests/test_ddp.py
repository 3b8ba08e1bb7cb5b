"""DDP: 2 CPU processes under torchrun (gloo) with grad_accum k match 1 process with grad_accum 2k."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainhelp import ROOT, env, tiny_curriculum, train_losses


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_with_double_accumulation(tmp_path):
    cur = tiny_curriculum(tmp_path)
    common = ["train.steps=4", "checkpoint.every=0", "eval.every=2", "eval.batches=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "trainer.run", str(cur), *common, "batch.grad_accum=4", "--run-dir", str(one)],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r2 = subprocess.run([*torchrun, "-m", "trainer.run", str(cur), *common, "batch.grad_accum=2", "--run-dir", str(two)],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    assert "world 2" in r2.stdout and "world 1" in r1.stdout
    # same tokens per step, same schedule, same data rows: losses and weights agree to float tolerance
    l1, l2 = train_losses(one), train_losses(two)
    assert l1.keys() == l2.keys() and len(l1) == 4
    for s in l1:
        assert l1[s] == pytest.approx(l2[s], rel=1e-5, abs=1e-6), s
    w1 = load_file(one / "checkpoints" / "step_0000004" / "model.safetensors")
    w2 = load_file(two / "checkpoints" / "step_0000004" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k
    assert l1[4] < l1[1]  # training moved: not a comparison of two untouched inits
    # eval rows: each rank evaluated half the batches, the all-reduce gives the same numbers
    e1 = (one / "eval.csv").read_text().splitlines()
    e2 = (two / "eval.csv").read_text().splitlines()
    assert len(e1) == len(e2) > 1
    for a, b in zip(e1[1:], e2[1:]):
        fa, fb = a.split(","), b.split(",")
        assert fa[:3] == fb[:3] and float(fa[3]) == pytest.approx(float(fb[3]), rel=1e-5)
