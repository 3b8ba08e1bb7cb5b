"""Checkpoints to object storage against moto's S3 server on 127.0.0.1 (conftest's `s3` fixture):
`checkpoint.upload` pushes each checkpoint in the background (verified, checksums.json last, remote
keep_last), `--resume s3://...` continues bit for bit, `train.init_from: s3://...` takes the weights."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("moto")

from trainhelp import tiny_curriculum, train, train_losses  # noqa: E402

SETTINGS = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=2", "eval.every=0", "eval.batches=1"]


def remote_files(client, bucket, prefix) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_upload_resume_and_init_from_s3(s3, server, tmp_path, capsys):
    client, bucket = s3
    cur = tiny_curriculum(tmp_path)
    up = [f"checkpoint.upload=s3://{bucket}/runs/tiny", f"checkpoint.endpoint_url={server.endpoint}"]
    a = tmp_path / "a"
    rc, out, _ = train([cur, *SETTINGS, *up, "--run-dir", a], capsys)
    assert rc == 0
    assert out.count("(verified)") == 3 and "FAILED" not in out, out[-3000:]
    # remote retention follows keep_last: steps 4 and 6 remain, byte for byte the local checkpoints
    remote = remote_files(client, bucket, "runs/tiny")
    assert {k.split("/")[0] for k in remote} == {"step_0000004", "step_0000006"}
    for step in ("step_0000004", "step_0000006"):
        local = {p.name: p.read_bytes() for p in (a / "checkpoints" / step).iterdir()}
        assert {k.split("/", 1)[1]: v for k, v in remote.items() if k.startswith(step)} == local
    assert not (a / "checkpoints" / ".upload").exists() or not any((a / "checkpoints" / ".upload").iterdir())

    # --resume from the remote step-4 checkpoint in a fresh run dir: steps 5-6 as the uninterrupted run
    b = tmp_path / "b"
    rc, out, _ = train([cur, *SETTINGS, "--run-dir", b, "--resume", f"s3://{bucket}/runs/tiny/step_0000004",
                        f"checkpoint.endpoint_url={server.endpoint}"], capsys)
    assert rc == 0
    assert "[resume]" in out and f"[fetch] s3://{bucket}/runs/tiny/step_0000004 -> " in out  # trainer.telemetry.console, rank 0
    la, lb = train_losses(a), train_losses(b)
    assert sorted(lb) == [5, 6] and all(lb[s] == la[s] for s in lb), (la, lb)

    # train.init_from an s3:// run: its newest checkpoint's weights (only), through the cache
    c = tmp_path / "c"
    rc, out, _ = train([cur, "train.steps=1", "eval.batches=0", f"train.init_from=s3://{bucket}/runs/tiny",
                        f"checkpoint.endpoint_url={server.endpoint}", f"data.cache_dir={tmp_path / 'cache'}",
                        "--run-dir", c], capsys)
    assert rc == 0
    cached = tmp_path / "cache" / "checkpoints" / bucket / "runs" / "tiny" / "step_0000006"
    assert f"[init] model weights from {cached}" in out
    assert (cached / "model.safetensors").read_bytes() == (a / "checkpoints" / "step_0000006" / "model.safetensors").read_bytes()
    assert not (cached / "train_state.pt").exists()  # weights only

    # a bucket that does not exist: the upload fails, said in one line; training is not stopped
    d = tmp_path / "d"
    rc, out, _ = train([cur, "train.steps=2", "checkpoint.every=0", "eval.batches=0", "checkpoint.upload=s3://no-such-bucket/x",
                        f"checkpoint.endpoint_url={server.endpoint}", "--run-dir", d], capsys)
    assert rc == 0
    assert "[upload] FAILED step_0000002" in out and (d / "DONE").exists()
    assert json.loads((d / "checkpoints" / "step_0000002" / "checksums.json").read_text())
