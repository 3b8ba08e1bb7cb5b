"""Muon under FSDP2 (`train.parallel: fsdp`, optim.name muon) on 2 gloo CPU processes: each rank holds
rows of every matrix, Newton–Schulz runs on whole matrices gathered to an owner rank and the rows go
back. The sharded step equals one process's Muon (uneven shards included), a 2-rank run equals a
1-process run on the hybrid model within fp32 tolerance, and its DCP checkpoint resumes at world 1."""
import shutil
import subprocess
import sys

import pytest
import torch

from trainhelp import ROOT, VOCAB, assert_rows_match, checkpoint_weights, env, metric_rows, run, tiny_curriculum, train

# tokens_per_step fixed, grad_accum following the world size: the run may resume at another world size
COMMON = ["train.parallel=fsdp", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=2",
          "batch.tokens_per_step=256", "batch.grad_accum=null"]

# Sharded Muon against plain Muon on the same full tensors: rows 5 -> [3, 2], 1 -> [1, 0] (a rank with
# no rows), a 3-D conv-like weight, and 5 params in blocks of 2 (the last block leaves rank 1 idle).
SHARDED_VS_PLAIN = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from trainer.optim import Muon
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
shapes = [(5, 7), (1, 4), (8, 3), (6, 1, 4), (3, 3)]
init = [torch.randn(s) for s in shapes]
plain = [torch.nn.Parameter(t.clone()) for t in init]
sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
opts = [Muon(plain, lr=0.02, weight_decay=0.1), Muon(sharded, lr=0.02, weight_decay=0.1)]
for _ in range(3):
    grads = [torch.randn(s) for s in shapes]
    for p, q, g in zip(plain, sharded, grads):
        p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
    for o in opts:
        o.step()
for p, q in zip(plain, sharded):
    assert torch.equal(p, q.full_tensor()), (p.shape, (p - q.full_tensor()).abs().max())
    assert opts[1].state[q]["momentum_buffer"].placements == (Shard(0),)  # the state stays sharded
print("sharded muon ok")
dist.destroy_process_group()
"""


def test_sharded_muon_step_equals_plain_muon(tmp_path):
    script = tmp_path / "sharded_vs_plain.py"
    script.write_text(SHARDED_VS_PLAIN)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], check=False, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "sharded muon ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def assert_same_run(a_dir, b_dir, steps):
    assert_rows_match(a_dir, b_dir, steps)
    wa, wb = checkpoint_weights(a_dir, steps[-1]), checkpoint_weights(b_dir, steps[-1])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_fsdp_muon_on_the_hybrid_model_matches_one_process_and_resumes_at_world_1(tmp_path):
    cur = tiny_curriculum(tmp_path, model={"arch": "hybrid", "preset": "hybrid-tiny", "vocab_size": VOCAB},
                          optim={"name": "muon", "lr": 0.02}, train={"steps": 4, "seed": 3, "dtype": "fp32"},
                          eval={"every": 0, "batches": 0})
    one, two = tmp_path / "one", tmp_path / "two"
    run([cur, *COMMON, "--run-dir", one])
    r = run([cur, *COMMON, "--run-dir", two], nproc=2)
    assert "world 2" in r.stdout
    assert_same_run(one, two, [1, 2, 3, 4])
    assert metric_rows(two)[-1]["loss"] < metric_rows(two)[0]["loss"]  # it trained

    # Muon's momentum and AdamW's moments in one DCP state, a shard per rank
    ck = two / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in (ck / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # the step-2 checkpoint of the 2-rank run resumed in one process (DCP reshards 2 -> 1): steps 3-4 as before
    back = tmp_path / "back"
    shutil.copytree(two, back)
    shutil.rmtree(back / "checkpoints" / "step_0000004")
    (back / "DONE").unlink()
    r = run([cur, *COMMON, "--run-dir", back, "--resume"])
    assert "[resume]" in r.stdout and "world 1" in r.stdout
    assert_same_run(two, back, [3, 4])


def test_llama_think_95m_dry_runs_under_fsdp(capsys):
    rc, out, err = train([ROOT / "curricula/llama-think-95m.yaml", "train.parallel=fsdp", "--dry-run", "--skip-data"],
                         capsys)
    assert rc == 0 and "optimizer       muon" in out, err[-2000:]
    rc, out, err = train([ROOT / "curricula/llama-think-95m.yaml", "train.parallel=fsdp", "optim.name=adamw8bit",
                          "--dry-run", "--skip-data"], capsys)
    assert rc == 2 and "not adamw8bit" in err and "Traceback" not in err, err[-2000:]
