"""Checkpoints to and from object storage (S3, Cloudflare R2 through an endpoint URL).

`checkpoint.upload: s3://bucket/run` pushes every finished checkpoint to URI/step_NNNNNNN/ with
shards.storage's transfer code: each file checked against the checkpoint's checksums.json before it
is sent and verified once stored (S3's own sha256), checksums.json last, so a remote checkpoint
holding checksums.json is complete. A background thread runs each upload, one at a time, as a
child process at low CPU priority (`nice python -m shards upload CKPT URI --listing checksums.json`),
so neither the transfer's Python work nor its GIL lands on the training loop; the thread itself
only waits, then applies keep_last remotely (a listing and a few deletes). The files are
hard-linked into checkpoints/.upload/ first, so the local keep_last pruning cannot pull them away
mid-transfer. After each upload the remote copies beyond the newest
`keep_last` are deleted (checksums.json first). A failed upload is logged and training goes on; the
end of the run waits for the queue and names any checkpoint that did not make it.

`--resume s3://bucket/run[/step_N]` and `train.init_from: s3://...` download a checkpoint (the
newest complete one of a run, or the one named) first: into the run's own checkpoints/ for
--resume, into a local cache for init_from (weights only). The endpoint is `checkpoint.endpoint_url`,
else the usual AWS chain (AWS_ENDPOINT_URL_S3 for R2); credentials only from that chain.
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from shards.storage import (DEFAULT_CACHE_DIR, StorageError, cache_path, download_files, listing, parse_listing,
                            parse_s3_uri, remove)
from shards.s3 import is_s3_uri

from .config import ConfigError
from .checkpoint import CHECKSUMS, STEP_RE, WEIGHT_FILES
from .telemetry.console import log

UPLOAD_STAGING = ".upload"  # under checkpoints/: hard links of what is queued


class Uploader:
    """Queued checkpoints uploaded in order, each by a child process (rank 0 only)."""

    def __init__(self, uri: str, keep_last: int, endpoint_url: str | None = None):
        parse_s3_uri(uri)  # a malformed URI fails here, before training
        self.uri, self.keep_last, self.endpoint_url = uri.rstrip("/"), keep_last, endpoint_url
        self.failed: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def push(self, ckpt: Path) -> None:
        """Queue a finished checkpoint (its files hard-linked aside first: instant, same filesystem)."""
        staged = ckpt.parent / UPLOAD_STAGING / ckpt.name
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for rel in list(json.loads((ckpt / CHECKSUMS).read_text())) + [CHECKSUMS]:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(ckpt / rel, staged / rel)
        self._queue.put(staged)

    def close(self) -> list[str]:
        """Wait for every queued upload; returns the checkpoints that failed."""
        self._queue.put(None)
        self._thread.join()
        return self.failed

    def _work(self) -> None:
        while (staged := self._queue.get()) is not None:
            try:
                self._push(staged)
            except Exception as e:  # noqa: BLE001 - an upload problem must not stop training
                self.failed.append(staged.name)
                why = str(e).splitlines()[-1] if str(e) else type(e).__name__
                log.warning(f"[upload] FAILED {staged.name} -> {self.uri}: {why} (the local checkpoint is kept; "
                            f"training goes on)")
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _push(self, staged: Path) -> None:
        cmd = ["nice", "-n", "10", sys.executable, "-m", "shards", "upload", str(staged), f"{self.uri}/{staged.name}",
               "--listing", CHECKSUMS, "--no-progress"] + (["--endpoint-url", self.endpoint_url] if self.endpoint_url else [])
        import shards

        path = os.pathsep.join(filter(None, [str(Path(shards.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().removeprefix("error: ") or f"exit {r.returncode}")
        pruned = prune_remote(self.uri, self.keep_last, self.endpoint_url)
        log.info(f"[upload] {staged.name} -> {self.uri}/{staged.name} (verified)"
                 + (f"; removed {', '.join(pruned)} there (keep_last {self.keep_last})" if pruned else ""))


def remote_checkpoints(uri: str, endpoint_url: str | None = None) -> list[str]:
    """Names of the complete checkpoints (checksums.json uploaded) under a remote run, oldest first."""
    names = {rel.split("/")[0] for rel in listing(uri, endpoint_url) if rel.endswith("/" + CHECKSUMS)}
    return sorted((n for n in names if STEP_RE.match(n)), key=lambda n: int(STEP_RE.match(n).group(1)))


def prune_remote(uri: str, keep_last: int, endpoint_url: str | None = None) -> list[str]:
    old = remote_checkpoints(uri, endpoint_url)[:-keep_last]
    for name in old:
        remove(f"{uri}/{name}", CHECKSUMS, endpoint_url)
    return old


def fetch_checkpoint(uri: str, dest_parent: Path, weights_only: bool = False, endpoint_url: str | None = None) -> Path:
    """Download a remote checkpoint (URI ends in step_N) or the newest complete one of a remote run
    into dest_parent/step_N/, verified file by file against its checksums.json. Concurrent callers
    (every rank of a node) take turns: the first downloads, the others find verified files."""
    uri = uri.rstrip("/")
    name = uri.rsplit("/", 1)[-1]
    if not STEP_RE.match(name):
        found = remote_checkpoints(uri, endpoint_url)
        if not found:
            raise StorageError(f"{uri}: no complete checkpoint there (step_*/{CHECKSUMS})")
        name, uri = found[-1], f"{uri}/{found[-1]}"
    wanted = WEIGHT_FILES if weights_only else None

    def files_of(data: bytes, where: str) -> dict[str, tuple[int | None, str]]:
        return {rel: (None, sha) for rel, sha in parse_listing(data, where).items() if wanted is None or rel in wanted}

    dest = Path(dest_parent) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        download_files(uri, dest, CHECKSUMS, files_of, endpoint_url, progress=False)
    return dest


def fetch_init(init: str | Path, cfg) -> str | Path:
    """train.init_from: an s3:// run or checkpoint becomes its local copy (weights and config only)
    under the cache (data.cache_dir, else ~/.cache/shardloom); anything else is returned as is."""
    if not is_s3_uri(init):
        return init
    uri = str(init).rstrip("/")
    run = uri.rsplit("/", 1)[0] if STEP_RE.match(uri.rsplit("/", 1)[-1]) else uri
    cache = Path(cfg.data.cache_dir or DEFAULT_CACHE_DIR) / "checkpoints"
    return _fetch(uri, cache_path(run, cache), cfg, "train.init_from", weights_only=True)


def fetch_resume(uri: str, stage_dir: Path, cfg, stage: str | None = None) -> Path:
    """--resume s3://...: the checkpoint into STAGE_DIR/checkpoints/, where --resume then finds and
    verifies it. A multi-stage run's stages live under URI/<stage folder>."""
    if stage:
        if STEP_RE.match(uri.rstrip("/").rsplit("/", 1)[-1]):
            raise ConfigError(f"--resume {uri}: a multi-stage curriculum resumes from its run's URI (each stage "
                              f"from its own folder under it), not from one checkpoint")
        uri = f"{uri.rstrip('/')}/{stage}"
    return _fetch(uri, Path(stage_dir) / "checkpoints", cfg, "--resume")


def _fetch(uri: str, dest_parent: Path, cfg, what: str, weights_only: bool = False) -> Path:
    try:
        p = fetch_checkpoint(uri, dest_parent, weights_only, cfg.checkpoint.endpoint_url)
    except StorageError as e:
        raise ConfigError(f"{what} {uri}: {e}") from None
    log.info(f"[fetch] {uri} -> {p}")
    return p

