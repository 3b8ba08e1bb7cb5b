"""FSDP2 (`train.parallel: fsdp`) on 2 CPU processes under torchrun (gloo has the all-gather and
reduce-scatter FSDP2 needs): the same losses, grad norms, eval and weights as DDP, and a checkpoint
(optimizer sharded through torch.distributed.checkpoint) that resumes at world size 1. The FSDP runs
also recompute each block in the backward (activation checkpointing), which must not change a number."""
import json
import shutil

import pytest
import torch

from trainhelp import assert_rows_match, checkpoint_weights, metric_rows, run, tiny_curriculum

# tokens_per_step fixed, grad_accum following the world size: the run may resume at another world size
COMMON = ["train.steps=4", "eval.every=2", "eval.batches=3", "checkpoint.every=2", "checkpoint.keep_last=2",
          "batch.tokens_per_step=256", "batch.grad_accum=null"]
FSDP = ["train.parallel=fsdp", "train.activation_checkpointing=true"]


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_at_another_world_size(tmp_path):
    cur = tiny_curriculum(tmp_path)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run([cur, *COMMON, "--run-dir", ddp], nproc=2)
    r = run([cur, *COMMON, *FSDP, "--run-dir", fsdp], nproc=2)
    assert "world 2" in r.stdout
    assert_rows_match(ddp, fsdp, [1, 2, 3, 4])
    w_ddp, w_fsdp = checkpoint_weights(ddp, 4), checkpoint_weights(fsdp, 4)
    assert w_ddp.keys() == w_fsdp.keys()
    for k in w_ddp:
        assert torch.allclose(w_ddp[k], w_fsdp[k], rtol=1e-4, atol=1e-5), k
    assert metric_rows(fsdp)[-1]["loss"] < metric_rows(fsdp)[0]["loss"]  # it trained
    # eval: 3 batches over 2 ranks (one rank runs an uncounted forward so the all-gathers pair up)
    e_ddp, e_fsdp = metric_rows(ddp, "eval"), metric_rows(fsdp, "eval")
    assert [e["step"] for e in e_ddp] == [e["step"] for e in e_fsdp] == [2, 4]
    for a, b in zip(e_ddp, e_fsdp):
        assert a["loss"].keys() == b["loss"].keys()
        for src in a["loss"]:
            assert a["loss"][src] == pytest.approx(b["loss"][src], rel=1e-5), src

    # the checkpoint: full weights in model.safetensors, the optimizer sharded through DCP, all checksummed
    ck = fsdp / "checkpoints" / "step_0000002"
    assert (ck / "optimizer" / ".metadata").is_file()
    assert sorted(p.name for p in (ck / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard per rank
    sums = json.loads((ck / "checksums.json").read_text())
    assert {"model.safetensors", "optimizer/.metadata"} <= set(sums) and len(sums) > 4
    assert torch.load(ck / "train_state.pt", weights_only=True)["optimizer"] == {}

    # resume the step-2 checkpoint in one process (DCP reshards 2 -> 1): steps 3-4 as the 2-rank run
    one = tmp_path / "one"
    shutil.copytree(fsdp, one)
    shutil.rmtree(one / "checkpoints" / "step_0000004")
    (one / "DONE").unlink()
    r = run([cur, *COMMON, "--run-dir", one, "--resume"], check=False)  # ddp over a DCP optimizer state: refused
    assert r.returncode == 2 and "train.parallel=fsdp" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run([cur, *COMMON, *FSDP, "--run-dir", one, "--resume"])
    assert "[resume]" in r.stdout and "world 1" in r.stdout and "grad_accum 4" in r.stdout
    assert_rows_match(fsdp, one, [3, 4])
    w_one = checkpoint_weights(one, 4)
    for k in w_fsdp:
        assert torch.allclose(w_fsdp[k], w_one[k], rtol=1e-4, atol=1e-5), k
