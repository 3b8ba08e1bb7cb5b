"""Two "nodes" on loopback: two torchrun processes (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
127.0.0.1) train as one process does with the same global batch (grad_accum 2 per rank vs 4): the
same data rows and the same losses: the first bit for bit (same weights, same rows), later ones to the
order of the gradient sums ((g1+g2)+(g3+g4) across nodes vs ((g1+g2)+g3)+g4 in one process), as in
test_ddp."""
import pytest

from trainhelp import run, tiny_curriculum, train_losses

SETTINGS = ["train.steps=3", "eval.every=0", "eval.batches=0", "checkpoint.every=0"]


@pytest.mark.slow
def test_two_nodes_c10d_on_loopback_equal_one_process(tmp_path):
    cur = tiny_curriculum(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run([cur, *SETTINGS, "batch.grad_accum=4", "--run-dir", one])
    r = run([cur, *SETTINGS, "batch.grad_accum=2", "--run-dir", two], nnodes=2, timeout=180)  # asserts both exit 0
    assert "world 2" in r.stdout
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    assert l1[1] == l2[1]  # bit for bit
    assert l1 == pytest.approx(l2, rel=1e-5)
