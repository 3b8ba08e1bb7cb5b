"""Run loggers mirror metrics.jsonl: TensorBoard event files read back with TensorBoard's own
EventAccumulator; W&B in offline mode, its run file (.wandb, a record log) read back with W&B's
protobuf schema. Each is skipped when its optional package is not installed."""
from __future__ import annotations

import json
import struct

import pytest

import trainhelp
from trainhelp import metric_rows, tiny_curriculum

SETTINGS = ["train.steps=4", "eval.every=2", "eval.batches=1", "checkpoint.every=0"]


def test_tensorboard_holds_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cur = tiny_curriculum(tmp_path)
    run_dir, tb = tmp_path / "run", tmp_path / "tb"
    assert trainhelp.train([cur, *SETTINGS, f"logging.tensorboard={tb}", "--run-dir", run_dir])[0] == 0
    ea = EventAccumulator(str(tb))
    ea.Reload()

    def series(tag):
        return {e.step: e.value for e in ea.Scalars(tag)}

    train = metric_rows(run_dir)
    assert series("train/loss") == pytest.approx({r["step"]: r["loss"] for r in train}, rel=1e-6)
    assert series("train/lr") == pytest.approx({r["step"]: r["lr"] for r in train}, rel=1e-6)
    assert series("mixture/b") == pytest.approx({r["step"]: r["weights"]["b"] for r in train}, rel=1e-6)
    with_rate = [r for r in train if "tokens_per_s" in r]  # every row after the first
    assert len(with_rate) == len(train) - 1 and all(r["mfu"] > 0 for r in with_rate)
    assert series("train/tokens_per_s") == pytest.approx({r["step"]: r["tokens_per_s"] for r in with_rate}, rel=1e-6)
    assert "train/mfu" in ea.Tags()["scalars"]
    evals = metric_rows(run_dir, "eval")
    assert [e["step"] for e in evals] == [2, 4]
    for src in ("a", "b", "overall"):
        assert series(f"val/{src}") == pytest.approx({e["step"]: e["loss"][src] for e in evals}, rel=1e-6)


def wandb_history(run_file) -> list[dict]:
    """The history records of an offline run file: W&B writes a LevelDB-style log (a 7-byte header,
    32 KiB blocks of [crc32, length, type] framed chunks) of its Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record; middle/last extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_offline_run_history_holds_the_losses(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install -e '.[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cur = tiny_curriculum(tmp_path)
    run_dir = tmp_path / "run"
    assert trainhelp.train([cur, *SETTINGS, "logging.wandb.project=shardloom-test", "logging.wandb.name=tiny",
                            "--run-dir", run_dir])[0] == 0
    import wandb

    # finish() can return before wandb's service process has written the last records to the offline
    # file (a read right after it once found no history); teardown waits for the service, as the
    # trainer's own process exit does
    wandb.teardown()
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history = {h["_step"]: h for h in wandb_history(files[0])}
    train = metric_rows(run_dir)
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(
        {r["step"]: r["loss"] for r in train}, rel=1e-9)
    assert history[4]["val/overall"] == pytest.approx(metric_rows(run_dir, "eval")[-1]["loss"]["overall"])
    assert history[4]["mixture/a"] == pytest.approx(train[-1]["weights"]["a"])
    assert (run_dir / "wandb_id").read_text().strip() in files[0].name


def test_peak_flops_tells_gpu_variants_apart_and_invents_none():
    """An H100 PCIe is not an SXM, an L40S is not an L40; an unknown GPU gets no peak (MFU left out, as
    a fallback figure once reported 200% MFU)."""
    from trainer.telemetry.metrics import Progress, gpu_peak

    assert gpu_peak("NVIDIA H100 PCIe") == 756e12 and gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak("NVIDIA L40S") == 362e12 and gpu_peak("NVIDIA L40") == 181e12
    assert gpu_peak("NVIDIA H200") == 989e12 and gpu_peak("Tesla T4") is None
    line = Progress(10, 0, 100, 6.0, 0.0).line(0, 1.0, 1e-3)
    assert "MFU" not in line and "tok/s" in line
    assert "MFU" in Progress(10, 0, 100, 6.0, 1e12).line(0, 1.0, 1e-3)
