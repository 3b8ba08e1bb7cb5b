"""DDP: 2 CPU processes under torchrun (gloo) with grad_accum k match 1 process with grad_accum 2k,
on plain pretraining data and on SFT data with loss masks."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from trainer.data import MixtureLoader, MixturePoint, SourceSpec
from trainer.models import build_model
from trainhelp import VOCAB, make_sft_source, metric_rows, run, tiny_curriculum, train_losses


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_with_double_accumulation(tmp_path):
    cur = tiny_curriculum(tmp_path)
    common = ["train.steps=4", "checkpoint.every=0", "eval.every=2", "eval.batches=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run([cur, *common, "batch.grad_accum=4", "--run-dir", one])  # asserts exit 0, with the output tail
    r2 = run([cur, *common, "batch.grad_accum=2", "--run-dir", two], nproc=2)  # torchrun, gloo
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


@pytest.mark.slow
def test_ddp_masked_sft_matches_one_rank_token_weighted(tmp_path):
    """SFT data whose micro-batches hold very different numbers of loss tokens: 2 ranks x grad_accum 2
    match 1 rank x grad_accum 4 (losses, pre-clip grad norms, weights), and the logged step loss is the
    mean over every loss token of the step, recomputed here from the loader's batches. The 2-rank run
    also starts with --overwrite over a stale run dir."""
    sft = make_sft_source(tmp_path / "sft", seed=3, docs=64, prompt_lens=(2, 8, 28), answer_lens=(1, 3, 28))
    cur = tiny_curriculum(tmp_path, data={"sources": [{"name": "chat", "path": str(sft)}], "packing": "document"},
                          train={"steps": 3, "seed": 5, "dtype": "fp32"}, eval={"every": 0, "batches": 0},
                          checkpoint={"every": 0, "keep_last": 1})
    one, two = tmp_path / "one", tmp_path / "two"
    # a stale run in `two`: under --overwrite rank 0 deletes it before any rank checks for checkpoints
    (two / "checkpoints" / "step_0000009").mkdir(parents=True)
    (two / "checkpoints" / "step_0000009" / "model.safetensors").write_bytes(b"stale")
    (two / "metrics.jsonl").write_text('{"type": "train", "step": 9, "loss": 0.0}\n')
    r1 = run([cur, "batch.grad_accum=4", "--run-dir", one])
    r2 = run([cur, "batch.grad_accum=2", "--run-dir", two, "--overwrite"], nproc=2)
    assert not (two / "checkpoints" / "step_0000009").exists()
    assert "world 2" in r2.stdout and "world 1" in r1.stdout
    rows1, rows2 = metric_rows(one), metric_rows(two)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        # pre-clip norm of the all-reduced gradient: catches a rank scaling error AdamW would hide
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    w1 = load_file(one / "checkpoints" / "step_0000003" / "model.safetensors")
    w2 = load_file(two / "checkpoints" / "step_0000003" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k
    for r in (one, two):  # tokens per source count every rank's rows, like tokens_seen
        st = torch.load(r / "checkpoints" / "step_0000003" / "train_state.pt", weights_only=True)
        assert st["tokens_seen"] == sum(st["tokens_by_source"].values()) == 3 * 4 * 2 * 32, r

    # step 1's loss (before any update) from scratch: the trainer's init, the loader's step-0 batches
    loader = MixtureLoader([SourceSpec("chat", str(sft))], [MixturePoint(tokens=0.0, weights={"chat": 1.0})],
                           seq_len=32, micro_batch=2, seed=5, grad_accum=4, packing="document")
    batches = [loader.batch(0, m)[:3] for m in range(4)]
    counts = [int(mask.sum()) for _, _, mask in batches]
    assert max(counts) > 2 * min(counts), counts  # the data really exercises the weighting
    torch.manual_seed(5)
    model = build_model(yaml.safe_load(cur.read_text())["model"])
    with torch.no_grad():
        ce = [F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1), reduction="none")[mask.reshape(-1)]
              for x, y, mask in batches]
    token_mean = float(torch.cat(ce).mean())
    assert rows1[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
    assert float(torch.stack([c.mean() for c in ce]).mean()) != pytest.approx(token_mean, rel=1e-3)
