"""shards.storage against a real S3 server (moto's server app, over HTTP on 127.0.0.1).

The server is moto's WSGI app under werkzeug's threaded server, started here on a free port. It
runs in this process so that "stopping the server" can be real — the listening socket is closed and
every open connection is severed mid-request — while moto's storage (its in-process backend)
survives for the restart, the way a real S3 endpoint's durable storage outlives a front-end outage.
moto has no persistence across a *process* restart (its multipart upload ids come from os.urandom,
so even its request recorder cannot replay an interrupted multipart upload); client-side
interruption is covered separately by SIGKILLing a transfer subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from shards import storage  # noqa: E402
from shards.s3 import _composite_sha256  # noqa: E402
from shards.__main__ import add_storage_commands  # noqa: E402
from shards.manifest import TokenizerInfo, read_manifest  # noqa: E402
from shards.reader import open_split  # noqa: E402
from shards.storage import StorageError  # noqa: E402
from trainhelp import SECRET, write_shards  # noqa: E402  (the s3 fixture's secret key: must never appear in any output)

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


# the server: trainhelp.StoppableS3, as conftest's `server` and `s3` fixtures


# ----------------------------------------------------------------------------------------------
# datasets


def make_dataset(directory: Path, big_mib: float = 0, small: int = 2, seed: int = 0) -> Path:
    """A shard dir: `small` train shards of a few KB, a val shard, and optionally one train shard
    of about `big_mib` MiB (to force multipart with 5 MiB parts)."""
    rng = np.random.default_rng(seed)
    tok = TokenizerInfo("test-tok", vocab_size=50_000, vocab_hash="0" * 64, eos_id=0)
    shards = {f"train/{i:05d}": [rng.integers(1, 50_000, size=int(rng.integers(50, 400))) for _ in range(20 + i)]
              for i in range(small)}
    if big_mib:
        per_doc = 100_000
        shards[f"train/{small:05d}"] = [rng.integers(1, 50_000, size=per_doc) for _ in range(int(big_mib * MiB / 2 / per_doc))]
    shards["val/00000"] = [rng.integers(1, 50_000, size=int(rng.integers(50, 400))) for _ in range(5)]
    return write_shards(directory, shards, tok, source="test", seeds={"seed": seed})


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def objects(client, bucket, prefix) -> dict[str, int]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        out.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    return out


def multipart_uploads(client, bucket) -> list:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


_REAL_PROGRESS = storage._progress
FAST = dict(max_attempts=2, file_attempts=1, progress=False)


# ----------------------------------------------------------------------------------------------
# tests


def test_round_trip_is_byte_identical_with_multipart(s3, server, tmp_path):
    client, bucket = s3
    src = make_dataset(tmp_path / "src", big_mib=11)
    uri = f"s3://{bucket}/datasets/v1"
    up = storage.upload(src, uri, endpoint_url=server.endpoint, workers=4,
                        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, progress=False)
    files = set(read_manifest(src).files)
    assert set(up.transferred) == files | {"manifest.json"} and up.transferred[-1] == "manifest.json"
    assert objects(client, bucket, "datasets/v1") == {k: len(v) for k, v in tree(src).items()}
    assert multipart_uploads(client, bucket) == []
    # the big shard really went multipart and S3's composite sha256 is what we verified against
    head = client.head_object(Bucket=bucket, Key="datasets/v1/train/00002.ds", ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"')
    assert head["ChecksumSHA256"].split("-")[0] == _composite_sha256(src / "train/00002.ds", 5 * MiB)

    dst = tmp_path / "dst"
    down = storage.download(uri, dst, endpoint_url=server.endpoint, workers=4,
                            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, progress=False)
    assert set(down.transferred) == files | {"manifest.json"} and down.transferred[-1] == "manifest.json"
    assert tree(dst) == tree(src)
    assert open_split(dst, "train").tokens == open_split(src, "train").tokens

    # rerunning either way moves nothing
    assert storage.upload(src, uri, endpoint_url=server.endpoint, **FAST).transferred == []
    assert storage.download(uri, dst, endpoint_url=server.endpoint, **FAST).transferred == []


def test_server_stopped_mid_upload_then_resumed(s3, server, tmp_path, monkeypatch):
    client, bucket = s3
    src = make_dataset(tmp_path / "src", big_mib=11, small=6)
    uri = f"s3://{bucket}/ds"
    kw = dict(endpoint_url=server.endpoint, workers=2, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    stopped = threading.Event()

    class StopAfter:  # stands in for the tqdm bar: stops the server once 8 MiB have been sent
        def __init__(self, *a, **k):
            self.n = 0
            self.lock = threading.Lock()

        def update(self, n):
            with self.lock:
                self.n += n
                if self.n >= 8 * MiB and not stopped.is_set():
                    stopped.set()
                    server.stop()

        def close(self):
            pass

    monkeypatch.setattr(storage, "_progress", StopAfter)
    with pytest.raises(StorageError) as err:
        storage.upload(src, uri, **kw, **FAST)
    assert stopped.is_set()
    msg = str(err.value)
    assert f"cannot reach {server.endpoint}" in msg and "rerun" in msg and SECRET not in msg
    monkeypatch.setattr(storage, "_progress", _REAL_PROGRESS)

    server.start()  # same port, same storage
    stale = multipart_uploads(client, bucket)
    before = objects(client, bucket, "ds")
    # the 11 MiB shard cannot have finished when only 8 MiB were sent: its multipart upload is stale
    assert any(u["Key"] == "ds/train/00006.ds" for u in stale)
    assert "manifest.json" not in before  # an interrupted dataset never looks complete

    again = storage.upload(src, uri, **kw, progress=False)
    src_files = tree(src)
    assert again.aborted_multipart == len(stale)
    assert set(again.skipped) == {k for k, size in before.items() if size == len(src_files[k])}
    assert set(again.transferred) == set(src_files) - set(again.skipped)
    assert again.transferred[-1] == "manifest.json"
    assert multipart_uploads(client, bucket) == []
    assert objects(client, bucket, "ds") == {k: len(v) for k, v in src_files.items()}
    dst = tmp_path / "dst"
    storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)
    assert tree(dst) == src_files


_KILLER = """
import os, signal, sys
from shards import storage
class Bar:
    n = 0
    def __init__(self, *a, **k): pass
    def update(self, n):
        Bar.n += n
        if Bar.n >= int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)
    def close(self): pass
storage._progress = Bar
fn = storage.upload if sys.argv[1] == "upload" else storage.download
fn(sys.argv[2], sys.argv[3], endpoint_url=sys.argv[5], workers=2, multipart_threshold=5 << 20,
   multipart_chunksize=5 << 20, progress=False)
"""


def _killed_run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _KILLER, *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_sigkilled_transfers_resume_without_leftovers(s3, server, tmp_path):
    client, bucket = s3
    src = make_dataset(tmp_path / "src", big_mib=11, small=3)
    uri = f"s3://{bucket}/killed"
    src_files = tree(src)

    r = _killed_run(["upload", str(src), uri, str(7 * MiB), server.endpoint])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "manifest.json" not in objects(client, bucket, "killed")
    assert multipart_uploads(client, bucket)  # the killed process left its multipart upload behind
    up = storage.upload(src, uri, endpoint_url=server.endpoint, **FAST)
    assert up.aborted_multipart >= 1 and up.transferred[-1] == "manifest.json"
    assert multipart_uploads(client, bucket) == []
    assert objects(client, bucket, "killed") == {k: len(v) for k, v in src_files.items()}

    # a local copy that lacks the big shard (deterministic: the small files are already verified
    # there), then a download SIGKILLed in the middle of that shard
    dst = tmp_path / "dst"
    storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)
    big = "train/00003.ds"
    (dst / big).unlink()
    (dst / "manifest.json").unlink()
    r = _killed_run(["download", uri, str(dst), str(7 * MiB), server.endpoint])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (dst / "manifest.json").exists()  # half a download is not a dataset
    assert [p.name for p in dst.rglob("*.part")] == ["00003.ds.part"]  # the partial file is only a .part
    assert not (dst / big).exists()
    down = storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)
    assert tree(dst) == src_files and not list(dst.rglob("*.part"))
    assert down.transferred == [big, "manifest.json"]  # what was verified is kept, not fetched again
    assert set(down.skipped) == set(src_files) - {big, "manifest.json"}


def test_wrong_credentials_and_missing_bucket_are_clear_and_secret_free(s3, server, tmp_path, monkeypatch, capsys):
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    iam = boto3.client("iam", endpoint_url=server.endpoint)
    iam.create_user(UserName="loader")
    iam.put_user_policy(UserName="loader", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="loader")["AccessKey"]
    server.post("/moto-api/reset-auth", b"0")  # from now on moto checks every signature
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        ok = storage.upload(src, f"s3://{bucket}/auth", endpoint_url=server.endpoint, **FAST)
        assert ok.transferred[-1] == "manifest.json"  # the right key works: the server really checks

        cases = [("AKIAUNKNOWNKEY000000", SECRET), (key["AccessKeyId"], SECRET)]  # unknown id; wrong secret
        for key_id, secret in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            for call in (lambda: storage.upload(src, f"s3://{bucket}/x", endpoint_url=server.endpoint, **FAST),
                         lambda: storage.download(f"s3://{bucket}/auth", tmp_path / "d", endpoint_url=server.endpoint,
                                                  **FAST)):
                with pytest.raises(StorageError) as err:
                    call()
                msg = str(err.value)
                assert f"credentials rejected by {server.endpoint} for bucket {bucket}" in msg, msg
                assert "AWS_ACCESS_KEY_ID" in msg and secret not in msg and key["SecretAccessKey"] not in msg
        # the CLI prints the same clear line and nothing secret
        parser = argparse.ArgumentParser()
        add_storage_commands(parser.add_subparsers(dest="cmd"))
        args = parser.parse_args(["upload", str(src), f"s3://{bucket}/cli", "--endpoint-url", server.endpoint,
                                  "--no-progress"])
        assert args.func(args) == 1
        out = capsys.readouterr()
        assert "credentials rejected" in out.err and SECRET not in out.out + out.err
    finally:
        server.post("/moto-api/reset-auth", b"inf")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for call in (lambda: storage.upload(src, "s3://no-such-bucket/p", endpoint_url=server.endpoint, **FAST),
                 lambda: storage.download("s3://no-such-bucket/p", tmp_path / "d", endpoint_url=server.endpoint,
                                          **FAST)):
        with pytest.raises(StorageError) as err:
            call()
        assert f"bucket no-such-bucket does not exist at {server.endpoint}" in str(err.value)
        assert SECRET not in str(err.value)

    with pytest.raises(StorageError, match="AWS profile 'nope' not found"):
        storage.upload(src, f"s3://{bucket}/p", endpoint_url=server.endpoint, profile="nope", **FAST)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials found"):
        storage.upload(src, f"s3://{bucket}/p", endpoint_url=server.endpoint, **FAST)


def test_tampered_object_fails_verification_naming_the_file(s3, server, tmp_path):
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    uri = f"s3://{bucket}/t"
    storage.upload(src, uri, endpoint_url=server.endpoint, **FAST)
    good = (src / "train/00001.ds").read_bytes()
    bad = bytearray(good)
    bad[100] ^= 0xFF  # same size, one byte flipped
    client.put_object(Bucket=bucket, Key="t/train/00001.ds", Body=bytes(bad))

    dst = tmp_path / "dst"
    with pytest.raises(StorageError) as err:
        storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)
    assert "train/00001.ds" in str(err.value) and "sha256 mismatch" in str(err.value)
    assert not (dst / "train/00001.ds").exists() and not list(dst.rglob("*.part"))
    assert not (dst / "manifest.json").exists()

    client.put_object(Bucket=bucket, Key="t/train/00001.ds", Body=good + b"x")  # a different size
    with pytest.raises(StorageError, match=r"train/00001\.ds: object is \d+ bytes, the manifest says"):
        storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)

    # an upload rerun does not trust the tampered object either: it replaces exactly that file
    fix = storage.upload(src, uri, endpoint_url=server.endpoint, **FAST)
    assert fix.transferred == ["train/00001.ds", "manifest.json"]
    storage.download(uri, dst, endpoint_url=server.endpoint, **FAST)
    assert tree(dst) == tree(src)


def test_sync_transfers_only_what_differs(s3, server, tmp_path):
    client, bucket = s3
    src = make_dataset(tmp_path / "src", small=3)
    uri = f"s3://{bucket}/sync"
    first = storage.sync(src, uri, endpoint_url=server.endpoint, **FAST)
    assert len(first.transferred) == len(tree(src))
    mirror = tmp_path / "mirror"
    storage.sync(uri, mirror, endpoint_url=server.endpoint, **FAST)
    assert storage.sync(src, uri, endpoint_url=server.endpoint, **FAST).transferred == []

    # a new version of the dataset in which only the val shard differs
    old = read_manifest(src).files
    import shutil

    shutil.rmtree(src / "val")
    rng = np.random.default_rng(123)
    write_shards(src, {"val/00000": [rng.integers(1, 50_000, size=300) for _ in range(7)]}, read_manifest(src).tokenizer,
                 source="test", seeds={"seed": 0})
    new = read_manifest(src).files
    changed = {rel for rel in new if old.get(rel) != new[rel]}
    assert changed and all(rel.startswith("val/") for rel in changed)

    up = storage.sync(src, uri, endpoint_url=server.endpoint, **FAST)
    assert set(up.transferred) == changed | {"manifest.json"} and up.transferred[-1] == "manifest.json"
    assert set(up.skipped) == set(new) - changed
    down = storage.sync(uri, mirror, endpoint_url=server.endpoint, **FAST)
    assert set(down.transferred) == changed | {"manifest.json"}
    assert tree(mirror) == tree(src)
    with pytest.raises(StorageError, match="exactly one s3:// side"):
        storage.sync(src, tmp_path / "elsewhere")


def test_fetch_to_cache_hit_and_miss(s3, server, tmp_path, monkeypatch):
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    uri = f"s3://{bucket}/corpora/web"
    storage.upload(src, uri, endpoint_url=server.endpoint, **FAST)
    cache = tmp_path / "cache"

    path, miss = storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)
    assert path == cache / bucket / "corpora/web" and len(miss.transferred) == len(tree(src))
    inodes = {p: p.stat().st_ino for p in path.rglob("*") if p.is_file()}
    _, hit = storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)
    assert hit.transferred == [] and len(hit.skipped) == len(read_manifest(src).files)
    assert {p: p.stat().st_ino for p in path.rglob("*") if p.is_file()} == inodes
    assert storage.fetch_to_cache(uri, cache, endpoint_url=server.endpoint, **FAST) == path
    # the trainer passes no endpoint: botocore's AWS_ENDPOINT_URL_S3 (or a profile's endpoint_url) picks it
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    assert storage.fetch_to_cache(uri, cache, progress=False) == path

    # a corrupted cached file is noticed (rewritten after the cached manifest: hashed) and only it is fetched again
    f = path / "train/00000.ds"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))
    _, repair = storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)
    assert repair.transferred == ["train/00000.ds"] and tree(path) == tree(src)
    assert open_split(path, "val").documents == 5


def _count_hashes(monkeypatch) -> list[str]:
    """Every file shards.storage hashes with sha256_file, as a path relative to its directory's root."""
    seen, lock, real = [], threading.Lock(), storage.sha256_file

    def counting(path, *a, **k):
        with lock:
            seen.append(Path(path).as_posix())
        return real(path, *a, **k)

    monkeypatch.setattr(storage, "sha256_file", counting)
    return seen


def _settle(record: Path, files) -> None:
    """Rewrite `record`'s timestamps a clock tick after every file's (a manifest job runs after the
    tokenize job): the state a real pipeline leaves."""
    deadline = time.time() + 5
    while True:
        os.utime(record)
        if all(f.stat().st_mtime_ns < record.stat().st_mtime_ns for f in files) or time.time() > deadline:
            return
        time.sleep(0.01)


def _rewrite_keeping_mtime(f: Path) -> None:
    """Same size, one byte flipped, mtime set back: only the ctime shows the change."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_each_file_is_hashed_once_while_its_record_vouches(s3, server, tmp_path, monkeypatch):
    """A settled shard dir uploads without hashing a file again (its manifest vouches, and S3's own
    sha256 of the stored bytes is checked against the manifest); a download hashes each file once,
    and later fetches of the cache (every rank, every split) hash nothing. A same-size rewrite with
    its mtime set back is still hashed and caught, on either side."""
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    files = [src / rel for rel in read_manifest(src).files]
    _settle(src / "manifest.json", files)
    hashed = _count_hashes(monkeypatch)
    uri = f"s3://{bucket}/once"
    up = storage.upload(src, uri, endpoint_url=server.endpoint, **FAST)
    assert len(up.transferred) == len(files) + 1 and hashed == []

    cache = tmp_path / "cache"
    path, first = storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)
    assert sorted(hashed) == sorted(f"{(path / rel).as_posix()}.part" for rel in read_manifest(src).files)
    record = (path / "manifest.json").stat().st_mtime_ns
    same_tick = sorted(p.as_posix() for p in path.rglob("*.*") if p.name != "manifest.json"
                       and p.stat().st_mtime_ns >= record)
    time.sleep(0.02)
    hashed.clear()
    storage.fetch_to_cache(uri, cache, endpoint_url=server.endpoint, **FAST)  # the val split, or rank 1
    assert sorted(hashed) == same_tick  # files written in the manifest's own tick: hashed, then vouched for
    hashed.clear()
    for _ in range(3):
        assert storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)[1].transferred == []
    assert hashed == []

    _rewrite_keeping_mtime(path / "train/00001.ds")
    _, repair = storage.fetch_to_cache_with_summary(uri, cache, endpoint_url=server.endpoint, **FAST)
    assert repair.transferred == ["train/00001.ds"] and tree(path) == tree(src)

    _rewrite_keeping_mtime(src / "val/00000.ds")
    with pytest.raises(StorageError, match=r"val/00000\.ds: sha256 .* does not match the manifest"):
        storage.upload(src, f"s3://{bucket}/other", endpoint_url=server.endpoint, **FAST)


def test_incomplete_local_dir_and_missing_remote_manifest(s3, server, tmp_path):
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    (src / "manifest.json").unlink()
    with pytest.raises(StorageError, match="refusing to upload an incomplete dataset"):
        storage.upload(src, f"s3://{bucket}/inc", endpoint_url=server.endpoint, **FAST)
    forced = storage.upload(src, f"s3://{bucket}/inc", endpoint_url=server.endpoint, force=True, **FAST)
    assert "manifest.json" not in forced.transferred
    assert set(objects(client, bucket, "inc")) == set(tree(src))
    with pytest.raises(StorageError, match=r"s3://.*/inc/manifest\.json not found.*uploaded last"):
        storage.download(f"s3://{bucket}/inc", tmp_path / "d", endpoint_url=server.endpoint, **FAST)

    # a local copy that no longer matches its manifest is never published
    src2 = make_dataset(tmp_path / "src2")
    (src2 / "val/00000.ds").write_bytes(b"\x01\x00" * ((src2 / "val/00000.ds").stat().st_size // 2))
    with pytest.raises(StorageError, match=r"val/00000\.ds: sha256 .* does not match the manifest"):
        storage.upload(src2, f"s3://{bucket}/c", endpoint_url=server.endpoint, **FAST)


def test_storage_options_drive_s3fs(s3, server, tmp_path):
    client, bucket = s3
    assert storage.storage_options() == {}
    r2 = "https://0123abcd.r2.cloudflarestorage.com"
    assert storage.storage_options(endpoint_url=r2) == {"client_kwargs": {"endpoint_url": r2, "region_name": "auto"}}
    opts = storage.storage_options(endpoint_url=server.endpoint, region="auto", profile="p")
    assert opts == {"client_kwargs": {"endpoint_url": server.endpoint, "region_name": "auto"}, "profile": "p"}
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **storage.storage_options(endpoint_url=server.endpoint))
    with fs.open(f"{bucket}/via-s3fs/hello.txt", "wb") as f:
        f.write(b"hi")
    assert client.get_object(Bucket=bucket, Key="via-s3fs/hello.txt")["Body"].read() == b"hi"


def test_fineweb_tokenize_lands_a_verifiable_dataset_in_s3(s3, server, tmp_path):
    """The pipeline CLI end to end: tokenize a small local JSONL straight to s3://, then download
    it with shards.storage and check it against the input text."""
    pytest.importorskip("datatrove")
    client, bucket = s3
    texts = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs. " * (1 + i % 5) for i in range(60)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipelines.fineweb", "tokenize", "--input", str(src),
           "--output", f"s3://{bucket}/fineweb/cl100k", "--tokenizer", "cl100k", "--val-fraction", "0.2",
           "--endpoint-url", server.endpoint, "--logging-dir", str(tmp_path / "logs")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr
    assert "fineweb/cl100k/manifest.json" in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}

    dst = tmp_path / "dl"
    storage.download(f"s3://{bucket}/fineweb/cl100k", dst, endpoint_url=server.endpoint, **FAST)
    from shards.tokenizers import get_tokenizer

    enc = get_tokenizer("cl100k")  # offline ranks; decode(encode(x)) == x is what is checked
    decoded = []
    for split in ("train", "val"):
        reader = open_split(dst, split)
        assert reader.manifest.tokenizer.name == "cl100k" and reader.dtype == np.dtype("uint32")
        for doc in reader.documents_iter():
            assert int(doc[-1]) == reader.manifest.tokenizer.eos_id  # EOS closes every document
            decoded.append(enc.decode(doc[:-1].tolist()))
    assert sorted(decoded) == sorted(texts)


def test_cli_commands_round_trip(s3, server, tmp_path, capsys):
    client, bucket = s3
    src = make_dataset(tmp_path / "src")
    from shards.__main__ import main  # `python -m shards`, which registers our commands

    common = ["--endpoint-url", server.endpoint, "--workers", "2", "--no-progress"]
    for argv in (["upload", str(src), f"s3://{bucket}/cli/ds", *common],
                 ["download", f"s3://{bucket}/cli/ds", str(tmp_path / "dst"), *common],
                 ["sync", str(src), f"s3://{bucket}/cli/ds", *common]):
        assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(tree(src))
    assert f"{n} transferred" in out[0] and f"{n} transferred" in out[1] and "0 transferred" in out[2]
    assert tree(tmp_path / "dst") == tree(src)


def test_wrapped_upload_error_code_is_read_from_the_error_not_the_file_name():
    # s3transfer keeps only the text; a file named ...00500.ds must not make AccessDenied look like a 500
    from boto3.exceptions import S3UploadFailedError

    from shards.s3 import _retryable

    denied = S3UploadFailedError("Failed to upload /d/train/00500.ds to b/k/train/00500.ds: An error occurred "
                                 "(AccessDenied) when calling the PutObject operation: Access Denied")
    slow = S3UploadFailedError("Failed to upload /d/train/00001.ds to b/k: An error occurred (SlowDown) when "
                               "calling the UploadPart operation: Reduce your request rate")
    assert not _retryable(denied) and _retryable(slow)
