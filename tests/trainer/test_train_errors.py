"""Bad input stops BEFORE training with one clear line naming the file/field (corrupted shard, wrong
dtype, missing source, bad YAML field), and SFT's loss ignores masked-out targets."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainhelp import VOCAB, make_sft_source, make_source, metric_rows, run, tiny_curriculum, train, write_shards
from trainer.models import build_model
from trainer.loop import forward_backward
from trainer.loss import compute_loss


def assert_stopped_before_training(run_dir: Path):
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_missing_source(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path)
    rc, _, err = train([cur, "data.sources.1.path=" + str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "source 'b'" in err and "nope" in err and "Traceback" not in err
    assert_stopped_before_training(tmp_path / "r")


def test_truncated_shard(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path)
    ds = tmp_path / "data" / "a" / "train" / "00000.ds"
    ds.write_bytes(ds.read_bytes()[:-10])  # even byte count: only the manifest size check can catch it
    rc, _, err = train([cur, "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "00000.ds" in err and "source 'a'" in err, err
    assert_stopped_before_training(tmp_path / "r")


def test_bit_flipped_shard_caught_by_checksums(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path)
    ds = tmp_path / "data" / "b" / "train" / "00000.ds"
    raw = bytearray(ds.read_bytes())
    raw[100] ^= 0xFF  # same size, different content
    ds.write_bytes(bytes(raw))
    rc, _, err = train([cur, "data.verify_checksums=true", "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "sha256" in err and str(ds) in err, err
    assert_stopped_before_training(tmp_path / "r")


def test_checksum_run_names_a_size_change_without_hashing(tmp_path, capsys):
    """data.verify_checksums goes through shards verify's file check: a file of another size is named
    with both sizes (it used to be hashed and reported as a sha256 failure)."""
    cur = tiny_curriculum(tmp_path)
    ds = tmp_path / "data" / "b" / "train" / "00000.ds"
    size = ds.stat().st_size
    ds.write_bytes(ds.read_bytes()[:-10])
    rc, _, err = train([cur, "data.verify_checksums=true", "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and f"{ds} is {size - 10} bytes, manifest says {size}" in err and "source 'b'" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert_stopped_before_training(tmp_path / "r")


def test_wrong_dtype(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path)
    # a uint32 shard where the manifest of a small vocab says uint16
    bad = tmp_path / "data" / "c"
    make_source(bad, 3)
    write_shards(bad, {f"{split}/00000": [np.arange(1, 50) % VOCAB] for split in ("train", "val")}, dtype="<u4",
                 manifest=False)
    m = json.loads((bad / "manifest.json").read_text())
    assert m["dtype"] == "uint16"
    rc, _, err = train([cur, f"data.sources.0.path={bad}", "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "uint16" in err and "uint32" in err and "00000.ds" in err, err
    assert_stopped_before_training(tmp_path / "r")


def test_bad_yaml_field_cli(tmp_path):
    cur = tiny_curriculum(tmp_path)
    d = yaml.safe_load(cur.read_text())
    d["optim"]["lr"] = "abc"
    cur.write_text(yaml.safe_dump(d))
    r = run([cur, "--run-dir", tmp_path / "r"], check=False, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {cur}: optim.lr: expected a number, got 'abc'"
    assert_stopped_before_training(tmp_path / "r")


def test_sft_loss_ignores_masked_tokens():
    torch.manual_seed(0)
    model = build_model(dict(arch="dense", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32))
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 8:] = True  # "assistant" half

    def loss_and_grads(targets):
        model.zero_grad()
        loss = compute_loss(model(x), targets, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    l1, g1 = loss_and_grads(y)
    y2 = y.clone()
    y2[~mask] = (y2[~mask] + 7) % VOCAB  # change every masked-out target
    l2, g2 = loss_and_grads(y2)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    # and it is the mean over the unmasked tokens only
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x)[:, 8:].reshape(-1, VOCAB), y[:, 8:].reshape(-1))
    assert torch.allclose(l1, ce)
    y3 = y.clone()
    y3[mask] = (y3[mask] + 7) % VOCAB  # changing a target that counts does change the loss
    assert not torch.equal(loss_and_grads(y3)[0], l1)


def test_step_loss_is_token_weighted_over_micro_batches_and_ranks():
    """A step's gradient is that of the mean over ALL its loss tokens (one big batch, computed here
    straight from F.cross_entropy), however the tokens fall across micro-batches and ranks."""
    torch.manual_seed(0)
    model = build_model(dict(arch="dense", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32))
    B, T = 2, 16
    counts = [0, 2, 9, 31]  # loss tokens per micro-batch: very different densities (rank 0 gets 2, rank 1 40)
    batches = []
    for n in counts:
        mask = torch.zeros(B * T, dtype=torch.bool)
        mask[torch.randperm(B * T)[:n]] = True
        batches.append((torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T)), mask.view(B, T), {}))
    total = sum(counts)

    def grads():
        g = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return g

    X, Y, M = (torch.cat([b[i] for b in batches]) for i in range(3))
    ce = torch.nn.functional.cross_entropy(model(X).reshape(-1, VOCAB), Y.reshape(-1), reduction="none")
    ref_loss = ce[M.reshape(-1)].mean()
    ref_loss.backward()
    ref = grads()

    def close(g):  # atol: the fused head (train.loss_chunk) sums the tied embedding's gradient in another order
        return all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g, ref))

    # one rank, four micro-steps
    loss_sum = forward_backward(model, batches, total, 1, torch.device("cpu"))
    assert close(grads())
    assert float(loss_sum) / total == pytest.approx(ref_loss.item(), rel=1e-6)
    # two ranks, two micro-steps each; DDP's average of the ranks' gradients done by hand
    per_rank = []
    for r in range(2):
        forward_backward(model, batches[2 * r : 2 * r + 2], total, 2, torch.device("cpu"))
        per_rank.append(grads())
    assert close([(a + b) / 2 for a, b in zip(*per_rank)])
    # the former reduction (mean of per-micro-batch means) is a different gradient on this data
    for x, y, mask, _ in batches:
        (compute_loss(model(x), y, mask) / len(batches)).backward()
    assert not close(grads())


def test_sft_training_end_to_end_with_loss_masks(tmp_path):
    """Document-packed SFT shards with `.ds.loss` masks train, and the loss is over masked tokens only."""
    d = make_sft_source(tmp_path / "sft")
    cur = tiny_curriculum(tmp_path, data={"sources": [{"name": "chat", "path": str(d)}], "packing": "document"},
                          train={"steps": 3, "seed": 1, "dtype": "fp32"}, checkpoint={"every": 0, "keep_last": 1})
    run([cur, "--run-dir", tmp_path / "r"], timeout=120)  # fails the test with its output unless exit 0
    assert [x["step"] for x in metric_rows(tmp_path / "r")] == [1, 2, 3]
    assert metric_rows(tmp_path / "r", "eval")


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    cur = tiny_curriculum(tmp_path, train={"steps": 1, "seed": 1, "dtype": "fp32"}, eval={"every": 0, "batches": 0})
    out = tmp_path / "r"
    assert train([cur, "--run-dir", out])[0] == 0
    (out / "checkpoints" / "step_0000005").mkdir()  # a stale checkpoint --overwrite must remove
    capsys.readouterr()
    rc, _, err = train([cur, "--run-dir", str(out)], capsys)
    assert rc == 2 and "already holds checkpoints" in err and "--overwrite" in err, err
    assert train([cur, "--run-dir", out, "--overwrite"])[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
