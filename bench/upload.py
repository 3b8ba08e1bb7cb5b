"""Does `checkpoint.upload` make training wait? Step times of `python -m trainer.run` (Atom, as in
bench.train) checkpointing every K steps, without and with the background upload to an S3 server
(moto's, in its own process on 127.0.0.1, so its CPU use is the machine's, not the trainer's GIL).
Writes bench/results/upload.json.

    python -m bench.upload [--steps 40] [--every 5] [--repeats 2]

Step time = wall clock between consecutive metrics rows (the save of step N lands in step N+1's
time, in both runs). The upload runs while the next steps train, so what it costs shows as CPU
contention on those steps (sha256 of every file, twice: checked before sending, verified after).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train import curriculum, step_times, synth_shards  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "upload.json"))
    a = ap.parse_args()
    a.seq_len, a.micro_batch = 128, 4
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cur = curriculum(tmp / "bench.yaml", str(synth_shards(tmp / "shards")), a)
            raw = yaml.safe_load(cur.read_text())
            raw["checkpoint"] = {"every": a.every, "keep_last": 2}
            cur.write_text(yaml.safe_dump(raw))
            up = ["checkpoint.upload=s3://bench/run", f"checkpoint.endpoint_url={endpoint}"]
            plain, upload = [], []
            for r in range(a.repeats):  # alternate, so neither side always runs second
                for name in (("plain", "upload") if r % 2 == 0 else ("upload", "plain")):
                    t = step_times(cur, tmp / name, 2, up if name == "upload" else [])  # step 1 includes start-up
                    (upload if name == "upload" else plain).extend(t)
                    print(f"repeat {r} {name:7s}: median step {statistics.median(t) * 1e3:.1f} ms, "
                          f"mean {statistics.mean(t) * 1e3:.1f} ms", flush=True)
            ckpt_mb = sum(p.stat().st_size for p in (tmp / "upload" / "checkpoints").rglob("*") if p.is_file()) / 2**20 / 2
    finally:
        server.terminate()
        server.wait(10)
    res = {
        "model": "atom (3,412,800 params)", "steps": a.steps, "checkpoint_every": a.every, "repeats": a.repeats,
        "checkpoint_mib": round(ckpt_mb, 1),
        "plain_median_ms": statistics.median(plain) * 1e3, "upload_median_ms": statistics.median(upload) * 1e3,
        "plain_mean_ms": statistics.mean(plain) * 1e3, "upload_mean_ms": statistics.mean(upload) * 1e3,
        "plain_step_ms": [round(t * 1e3, 1) for t in plain], "upload_step_ms": [round(t * 1e3, 1) for t in upload],
        "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    print(f"median step: {res['plain_median_ms']:.1f} ms without upload, {res['upload_median_ms']:.1f} ms with "
          f"({ckpt_mb:.0f} MiB per checkpoint every {a.every} steps); means {res['plain_mean_ms']:.1f} / "
          f"{res['upload_mean_ms']:.1f} ms | load avg {res['load_avg_1m']:.1f} on {os.cpu_count()} cpus")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
