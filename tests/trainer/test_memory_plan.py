"""trainer/memory.py: the memory plan of one step (FakeTensorMode under torch's MemTracker) against the
peak of the same step really run on the CPU by the loop's own forward_backward, read from the CPU
allocator through the profiler's memory events (an independent count); fsdp's sharding; the dry
run's memory lines and JSON."""
from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from trainhelp import ROOT, tiny_curriculum, train

from trainer.config import load_curriculum
from trainer.loop import forward_backward
from trainer.memory import plan_memory
from trainer.models import build_model
from trainer.optim import build_optimizer

DENSE = {"arch": "dense", "vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "ffn_dim": 256, "max_seq_len": 128, "logit_softcap": 15.0}
HYBRID = {"arch": "hybrid", "preset": "hybrid-tiny", "max_seq_len": 128}
MUON = {"name": "muon", "lr": 0.02, "grad_clip": 1.0}


def tiny(tmp_path, model, micro_batch=8, grad_accum=1, ckpt=False, optim=None, loss_chunk=2048):
    batch = {"seq_len": 128, "micro_batch": micro_batch, "grad_accum": grad_accum}
    cur = tiny_curriculum(tmp_path, model=model, batch=batch,
                          train={"steps": 2, "dtype": "fp32", "device": "cpu", "activation_checkpointing": ckpt,
                                 "loss_chunk": loss_chunk},
                          **({"optim": optim} if optim else {}))
    return load_curriculum(cur, [], world_size=1)[0]


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def real_peak(cfg) -> int:
    """Bytes live at the peak of one steady step run for real: what exists before it (weights,
    optimizer state, earlier micro-steps' gradients, the batch) plus the allocator's largest net
    growth during it (allocations minus frees, in time order)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    model.loss_chunk = cfg.train.loss_chunk  # as trainer.loop sets it
    opt = build_optimizer(model, cfg.optim, "cpu")
    B, T, V = cfg.batch.micro_batch, cfg.batch.seq_len, cfg.model.vocab_size
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    for p in model.parameters():  # one update first: the optimizer state exists, as the plan assumes
        p.grad = torch.zeros_like(p)
    opt.step()
    accum = cfg.resolved.grad_accum
    if accum == 1:
        opt.zero_grad(set_to_none=True)
    state = [v for o in getattr(opt, "optimizers", [opt]) for s in o.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    before = storage_bytes([*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                            *state, x, y])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(model, [(x, y, None, {})], B * T * accum, 1, torch.device("cpu"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = top = 0
    for e in events:
        live += e.nbytes()
        top = max(top, live)
    return before + top


@pytest.mark.parametrize("name,model,kw", [
    ("dense", DENSE, {}),
    ("dense, full logits", DENSE, {"loss_chunk": 0}),
    ("dense, 4 loss chunks", DENSE, {"loss_chunk": 256}),
    ("dense, grad accumulation", DENSE, {"grad_accum": 2, "micro_batch": 4}),
    ("dense, activation checkpointing", DENSE, {"ckpt": True}),
    ("hybrid, muon", HYBRID, {"micro_batch": 4, "optim": MUON}),
])
def test_plan_within_15_percent_of_the_real_peak(tmp_path, name, model, kw):
    torch.set_num_threads(1)  # CPU kernels' per-thread scratch buffers are not what a GPU plan is about
    cfg = tiny(tmp_path, model, **kw)
    plan = plan_memory(cfg, device="cpu")
    planned, real = sum(plan.parts.values()), real_peak(cfg)
    assert abs(planned - real) <= 0.15 * real, (name, planned, real, plan.parts)
    assert plan.parts["loss"] > 0 and plan.parts["activations"] > 0 and plan.parts["optimizer"] > 0


def test_checkpointing_and_fsdp_lower_their_parts(tmp_path):
    cfg = tiny(tmp_path, DENSE)
    plain, ckpt = plan_memory(cfg, device="cpu"), plan_memory(cfg, device="cpu", checkpointing=True)
    assert ckpt.parts["activations"] < plain.parts["activations"]
    ddp, fsdp = plan_memory(cfg, world=2, parallel="ddp"), plan_memory(cfg, world=2, parallel="fsdp")
    assert ddp.analytical == ("ddp_buckets",) and ddp.parts["ddp_buckets"] == ddp.parts["weights"]
    assert fsdp.parts["optimizer"] == pytest.approx(ddp.parts["optimizer"] / 2, rel=0.05)
    assert fsdp.parts["weights"] < ddp.parts["weights"] and fsdp.per_rank_gb < ddp.per_rank_gb


def test_dry_run_prints_the_plan_and_json(tmp_path, capsys):
    rc, out, err = train([tiny_curriculum(tmp_path), "--dry-run", "--json", "--skip-data", "--gpu-mem", "80"], capsys)
    assert rc == 0, err
    mem = json.loads(out.strip().splitlines()[-1])["memory"]
    assert mem["per_rank_gb"] > 0 and mem["fits"] is True and mem["gpu_mem_gb"] == 80
    assert set(mem["parts"]) >= {"weights", "gradients", "optimizer", "activations", "loss"}
    assert "memory/rank" in out and "fits 80 GB" in out


def test_too_big_names_what_would_fit(capsys):
    # Atom at its real size (64 x 512 tokens, AdamW, no checkpointing) plans ~2.6 GB per rank (+ 2 GB reserve)
    rc, out, err = train([ROOT / "curricula/atom.yaml", "--dry-run", "--json", "--skip-data", "--gpu-mem", "4"], capsys)
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "DOES NOT FIT" in ln)
    assert "fits with" in line and ("train.activation_checkpointing=true" in line or "batch.micro_batch=" in line)
    mem = json.loads(out.strip().splitlines()[-1])["memory"]
    assert mem["fits"] is False and mem["suggestion"]["per_rank_gb"] + 2 <= 4
