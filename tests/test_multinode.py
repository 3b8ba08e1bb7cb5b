"""Two "nodes" on loopback: two torchrun processes (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
127.0.0.1) train as one process does with the same global batch (grad_accum 2 per rank vs 4): the
same data rows, the same losses bit for bit."""
import socket
import subprocess
import sys

import pytest

from trainhelp import ROOT, env, run, tiny_curriculum, train_losses

SETTINGS = ["train.steps=3", "eval.every=0", "eval.batches=0", "checkpoint.every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_c10d_on_loopback_equal_one_process(tmp_path):
    cur = tiny_curriculum(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run([cur, *SETTINGS, "batch.grad_accum=4", "--run-dir", one])
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=shardloom-test", "--rdzv-conf=timeout=60",
         "-m", "trainer.run", str(cur), *SETTINGS, "batch.grad_accum=2", "--run-dir", str(two)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = []
    for p in nodes:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            pytest.fail("two-node run did not finish in 180 s")
    assert [p.returncode for p in nodes] == [0, 0], "\n---\n".join(o[-2000:] for o in outs)
    assert any("world 2" in o for o in outs)
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    assert l1 == l2  # bit for bit
