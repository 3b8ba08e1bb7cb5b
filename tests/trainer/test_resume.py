"""Bit-exact resume: N steps straight == k steps, a real SIGKILL of the training process, `--resume`,
the remaining steps (same per-step losses, same eval rows, same final weights). Plus multi-stage runs:
stage 2 starts from stage 1's final weights with a fresh optimizer."""
import json

import torch
import yaml
from safetensors.torch import load_file

from trainhelp import VOCAB, run, run_killed_at, tiny_curriculum, train_losses


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    cur = tiny_curriculum(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([cur, "--run-dir", straight])

    run_killed_at(5, [cur, "--run-dir", killed])  # steps 0-4 done (checkpoint at 3, eval at 4), then SIGKILL
    ck = killed / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000003"]
    assert max(train_losses(killed)) == 5  # rows past the checkpoint were logged before the kill
    # debris a crash could leave: a half-written save and a dir missing files — both must be ignored
    (ck / "step_0000006.tmp").mkdir()
    (ck / "step_0000006.tmp" / "model.safetensors").write_bytes(b"partial")
    (ck / "step_0000007").mkdir()
    (ck / "step_0000007" / "config.json").write_text("{}")

    r = run([cur, "--run-dir", killed, "--resume"])
    assert "[resume]" in r.stdout and "step_0000003" in r.stdout

    assert train_losses(killed) == train_losses(straight)  # exact floats, every step
    assert (killed / "eval.csv").read_text() == (straight / "eval.csv").read_text()
    w1 = load_file(straight / "checkpoints" / "step_0000008" / "model.safetensors")
    w2 = load_file(killed / "checkpoints" / "step_0000008" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    # the run really trained, and kept only the last 2 checkpoints
    losses = train_losses(straight)
    assert losses[8] < losses[1]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    assert (straight / "training.png").stat().st_size > 1000
    st = torch.load(straight / "checkpoints" / "step_0000008" / "train_state.pt", weights_only=True)
    assert st["step"] == 8 and st["tokens_seen"] == 8 * 32 * 2 * 2
    # realised mixture: weights 0.9 -> 0.1 (a) and 0.1 -> 0.9 (b) linearly integrate to half each
    got = st["tokens_by_source"]
    assert sum(got.values()) == 8 * 32 * 2 * 2 and abs(got["a"] - got["b"]) <= 2 * 32, got
    cfg = json.loads((straight / "checkpoints" / "step_0000008" / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["tokenizer"]["name"] == "tiny"


def test_two_stages_init_from_previous_with_fresh_optimizer(tmp_path):
    cur = tiny_curriculum(tmp_path)
    d = yaml.safe_load(cur.read_text())
    d["train"]["steps"] = 4
    d["eval"] = {"every": 0, "batches": 0}
    d["stages"] = [
        {"name": "pretrain"},
        # the second stage: other data, near-zero lr so its weights stay those of stage 1
        {"name": "continued", "data": {"sources": [{"name": "b", "path": d["data"]["sources"][1]["path"]}], "schedule": []},
         "optim": {"lr": 1e-12}, "schedule": {"warmup": 0},
         "train": {"steps": 3, "init_from": "@previous", "reset_data_cursor": True}},
    ]
    cur.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    r = run([cur, "--run-dir", out])
    s1 = out / "0-pretrain" / "checkpoints" / "step_0000004"
    s2 = out / "1-continued" / "checkpoints" / "step_0000003"
    assert "[init] model weights from" in r.stdout and str(s1) in r.stdout
    w1, w2 = load_file(s1 / "model.safetensors"), load_file(s2 / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6), k
    st2 = torch.load(s2 / "train_state.pt", weights_only=True)
    steps = {int(s["step"]) for s in st2["optimizer"]["state"].values()}
    assert steps == {3}  # fresh AdamW: 3 steps of state, not 4 + 3
    assert st2["loader"]["sources"] == ["b"] and st2["tokens_by_source"] == {"b": 3 * 4 * 32}
    # --resume on a finished run skips both stages
    r = run([cur, "--run-dir", out, "--resume"])
    assert r.stdout.count("already done") == 2


def test_resume_with_muon_on_the_hybrid_model(tmp_path):
    """Muon's combined optimizer state (Muon + AdamW) round-trips through train_state.pt
    (weights_only) and the resumed step is bit-exact, on the hybrid (Gated DeltaNet) model."""
    cur = tiny_curriculum(tmp_path, model={"arch": "hybrid", "preset": "hybrid-tiny", "vocab_size": VOCAB},
                          optim={"name": "muon", "lr": 0.02}, train={"steps": 4, "seed": 3, "dtype": "fp32"},
                          eval={"every": 0, "batches": 0})
    out = tmp_path / "run"
    run([cur, "--run-dir", out])
    straight = train_losses(out)
    w_straight = load_file(out / "checkpoints" / "step_0000004" / "model.safetensors")
    st = torch.load(out / "checkpoints" / "step_0000003" / "train_state.pt", weights_only=True)
    assert set(st["optimizer"]) == {"0", "1"}  # Muon, AdamW
    assert all("momentum_buffer" in s for s in st["optimizer"]["0"]["state"].values())
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_0000004")
    (out / "DONE").unlink()
    run([cur, "--run-dir", out, "--resume"])
    assert train_losses(out) == straight
    w = load_file(out / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(w[k], w_straight[k]) for k in w)
