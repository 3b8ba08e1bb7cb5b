"""Shard directories to and from S3-compatible object storage (AWS S3, Cloudflare R2, MinIO).

    upload(DIR, "s3://bucket/prefix")     local shard dir -> objects, manifest.json LAST
    download("s3://bucket/prefix", DIR)   objects -> local dir, manifest.json LAST
    sync(SRC, DST)                        either direction, picked by which side is s3://
    fetch_to_cache(uri, cache_dir)        what the trainer calls for an s3:// curriculum source
    storage_options(...)                  fsspec/s3fs options for datatrove s3:// folders

Every transfer moves only what differs. "Differs" is decided by size and sha256 against the
manifest, never by mtime: a local file is skipped when it hashes to the manifest's sha256; a remote
object is skipped when the checksum S3 itself computed on receipt (`ChecksumSHA256`, uploaded with
`ChecksumAlgorithm="SHA256"`) matches the local bytes. So rerunning an interrupted transfer is the
resume: finished files are verified and skipped, stale multipart uploads under the prefix are
aborted (we never resume half a multipart: a part boundary/size mix-up is worse than re-sending one
file), downloads land in `NAME.part` and are renamed only after their sha256 matches.

What the upload check proves: for a multipart object S3 (and moto) hash every part they received
and report sha256-of-part-hashes ("<b64>-N"); we recompute that from the local file, which already
matched the manifest, so equal means the stored bytes are the manifest's bytes. For a single-part
object AWS rejects a body whose sha256 differs from the `x-amz-checksum-sha256` header we sent
(moto only stores the header). When a server returns no checksum at all, the object's
`x-amz-meta-sha256` (which we write) and its size are compared instead — weaker: it shows the object
is ours, not that its bytes survived; `download` always re-hashes, so a reader is never fooled.

Credentials come only from boto3's usual chain (environment, `--profile`, ~/.aws files, instance
roles). They are never printed, logged or stored, and any error text is scrubbed of the secret key
and session token before it is raised.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .manifest import MANIFEST, Manifest, sha256_file

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB  # S3's minimum part is 5 MiB; s3transfer clamps to it
CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed", "403",
}
MISSING_BUCKET_CODES = {"NoSuchBucket", "404"}
RETRYABLE_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "503", "500"}


class StorageError(RuntimeError):
    """A transfer failed in a way the user can act on; the message names the file/bucket and never
    contains a secret."""


@dataclass
class TransferSummary:
    direction: str  # "upload" | "download"
    uri: str
    local_dir: str
    files: int = 0  # files in the dataset (manifest excluded)
    transferred: list[str] = field(default_factory=list)  # relative paths sent/fetched (manifest included)
    skipped: list[str] = field(default_factory=list)  # already present and verified
    bytes_transferred: int = 0
    aborted_multipart: int = 0  # stale multipart uploads cleaned up
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.direction} {self.local_dir} {'->' if self.direction == 'upload' else '<-'} {self.uri}: "
                f"{len(self.transferred)} transferred ({self.bytes_transferred / MiB:.1f} MiB), "
                f"{len(self.skipped)} already verified, {self.aborted_multipart} stale multipart aborted, "
                f"{self.seconds:.1f}s")


def is_s3_uri(s: str | os.PathLike) -> bool:
    return str(s).startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/a/b/" -> ("bucket", "a/b")."""
    m = re.fullmatch(r"s3://([^/]+)/?(.*)", str(uri))
    if not m:
        raise StorageError(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
    return m.group(1), m.group(2).strip("/")


def default_region(endpoint_url: str | None, region: str | None) -> str | None:
    """R2's region is always "auto" (it also aliases us-east-1); fill it in when not given."""
    if region is None and endpoint_url and re.search(r"\.r2\.cloudflarestorage\.com(:\d+)?/?$", endpoint_url):
        return "auto"
    return region


def storage_options(endpoint_url: str | None = None, profile: str | None = None,
                    region: str | None = None) -> dict:
    """fsspec/s3fs options for a datatrove `(path, storage_options)` s3:// folder. Holds no
    credentials: s3fs resolves them from the same chain boto3 uses."""
    opts: dict = {}
    region = default_region(endpoint_url, region)
    client_kwargs = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if profile:
        opts["profile"] = profile
    return opts


# ----------------------------------------------------------------------------------------------
# connection, errors, retries


def _retryable(e: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    from boto3.exceptions import S3UploadFailedError

    if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, ClientError):
        return e.response.get("Error", {}).get("Code", "") in RETRYABLE_CODES
    if isinstance(e, S3UploadFailedError):  # s3transfer wraps the ClientError; keep only its text
        return any(code in str(e) for code in RETRYABLE_CODES)
    return False


_LOADER = None
_LOADER_LOCK = threading.Lock()


def _botocore_session():
    """A fresh session (credentials are resolved anew each time) sharing one service-model loader:
    parsing S3's JSON models costs ~0.3 s per session otherwise."""
    global _LOADER
    import botocore.session

    session = botocore.session.get_session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _LOADER)
    return session


class _Remote:
    """One bucket/prefix on one endpoint: a thread-safe boto3 client plus error translation."""

    def __init__(self, uri: str, endpoint_url: str | None, profile: str | None, region: str | None,
                 workers: int, max_attempts: int, file_attempts: int):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.profile = profile
        self.file_attempts = max(1, file_attempts)
        self._secrets: list[str] = []
        try:
            session = boto3.Session(botocore_session=_botocore_session(), profile_name=profile,
                                    region_name=default_region(endpoint_url, region))
        except ProfileNotFound:
            raise StorageError(f"AWS profile '{profile}' not found in ~/.aws/config or ~/.aws/credentials") from None
        try:
            creds = session.get_credentials()
        except ProfileNotFound:
            raise StorageError(f"AWS profile '{profile}' not found in ~/.aws/config or ~/.aws/credentials") from None
        except BotoCoreError as e:  # e.g. a malformed config file: name the type, not the content
            raise StorageError(f"could not load AWS credentials ({type(e).__name__})") from None
        if creds is None:
            raise StorageError("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               "or pass --profile / set AWS_PROFILE")
        frozen = creds.get_frozen_credentials()
        self._secrets = [s for s in (frozen.secret_key, frozen.token) if s]
        # botocore retries each request (throttling, 5xx, dropped connections) with backoff; _retry
        # below adds whole-file attempts on top for outages longer than that.
        config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                        max_pool_connections=max(10, workers * 4), connect_timeout=10, read_timeout=120)
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # userinfo in an endpoint URL would be a secret too
        self.endpoint = re.sub(r"//[^/@]*@", "//", self.client.meta.endpoint_url)

    # -- naming
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    # -- errors
    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def explain(self, e: BaseException, what: str) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(e, StorageError):
            return StorageError(self.scrub(str(e)))
        code = ""
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
        elif "S3UploadFailedError" in type(e).__name__:
            m = re.search(r"\((\w+)\)", str(e))
            code = m.group(1) if m else ""
        if code in CREDENTIAL_CODES:
            hint = f"profile {self.profile}" if self.profile else "AWS_PROFILE"
            msg = (f"credentials rejected by {self.endpoint} for bucket {self.bucket} ({code}) while {what} "
                   f"(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / {hint})")
        elif code in MISSING_BUCKET_CODES:
            msg = f"bucket {self.bucket} does not exist at {self.endpoint} (while {what})"
        elif isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            msg = "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --profile"
        elif _retryable(e):
            msg = f"{what}: cannot reach {self.endpoint} ({type(e).__name__}: {e}); rerun to resume"
        else:
            msg = f"{what}: {type(e).__name__}: {e}"
        return StorageError(self.scrub(msg))

    def call(self, what: str, fn, *args, **kwargs):
        """One API call with botocore's own retries; failures become a scrubbed StorageError."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is translated, never re-raised raw
            raise self.explain(e, what) from None

    def retry(self, what: str, fn, before_retry=None):
        """Whole-file attempts with exponential backoff + jitter, for connection-class failures that
        outlast botocore's per-request retries (an endpoint restarting, a dropped link)."""
        for attempt in range(self.file_attempts):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001
                if attempt + 1 >= self.file_attempts or not _retryable(e):
                    raise self.explain(e, what) from None
                delay = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
                log.warning("%s failed (%s), retrying in %.1fs", what, type(e).__name__, delay)
                time.sleep(delay)
                if before_retry is not None:
                    with contextlib.suppress(Exception):
                        before_retry()

    # -- bucket level
    def check_bucket(self) -> None:
        self.call(f"opening bucket {self.bucket}", self.client.head_bucket, Bucket=self.bucket)

    def list_objects(self) -> dict[str, int]:
        """key -> size under the prefix."""
        out: dict[str, int] = {}
        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        self.call(f"listing {self.uri}", lambda: [out.update({o["Key"]: o["Size"]}) for p in pages
                                                   for o in p.get("Contents", [])])
        return out

    def list_multipart(self, key: str | None = None) -> list[tuple[str, str]]:
        prefix = key if key is not None else (f"{self.prefix}/" if self.prefix else "")
        out: list[tuple[str, str]] = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        self.call(f"listing multipart uploads under {self.uri}",
                  lambda: [out.append((u["Key"], u["UploadId"])) for p in pages for u in p.get("Uploads", [])
                           if key is None or u["Key"] == key])
        return out

    def abort_multipart(self, key: str | None = None) -> int:
        """Abort stale multipart uploads (for one key, or all under the prefix). We are the only
        writer of a dataset prefix, so anything in flight here is left over from a dead run."""
        stale = self.list_multipart(key)
        for k, upload_id in stale:
            self.call(f"aborting stale multipart upload of {k}", self.client.abort_multipart_upload,
                      Bucket=self.bucket, Key=k, UploadId=upload_id)
        return len(stale)

    def get_bytes(self, rel: str) -> bytes:
        r = self.call(f"reading {self.url(rel)}", self.client.get_object, Bucket=self.bucket, Key=self.key(rel))
        return self.call(f"reading {self.url(rel)}", r["Body"].read)

    # -- verification
    def object_matches(self, rel: str, path: Path, size: int, sha256_hex: str, chunksize: int) -> bool:
        """Does the stored object hold exactly the bytes of `path` (already checked against the
        manifest)? See the module docstring for what each branch proves."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(rel), ChecksumMode="ENABLED")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise self.explain(e, f"checking {self.url(rel)}") from None
        if head.get("ContentLength") != size:
            return False
        checksum = head.get("ChecksumSHA256")
        if not checksum:
            return head.get("Metadata", {}).get("sha256") == sha256_hex
        value, _, parts = checksum.partition("-")
        if value == base64.b64encode(bytes.fromhex(sha256_hex)).decode():
            return True
        # composite: AWS says "<b64>-N"; moto drops the "-N", so fall back to the ETag's part count
        m = re.search(r"-(\d+)\"?$", head.get("ETag", ""))
        parts = parts or (m.group(1) if m else "")
        for part_size in self._part_sizes(rel, size, int(parts or 0), chunksize) if parts else []:
            if _composite_sha256(path, part_size) == value:
                return True
        return False

    def _part_sizes(self, rel: str, size: int, parts: int, chunksize: int) -> list[int]:
        from s3transfer.utils import ChunksizeAdjuster

        cands = [ChunksizeAdjuster().adjust_chunksize(chunksize, size)]
        with contextlib.suppress(Exception):  # AWS reports part 1's length; moto returns the whole object
            n = self.client.head_object(Bucket=self.bucket, Key=self.key(rel), PartNumber=1)["ContentLength"]
            if n < size:
                cands.append(n)
        return [c for c in dict.fromkeys(cands) if c > 0 and -(-size // c) == parts]


def _composite_sha256(path: Path, part_size: int) -> str:
    """S3's COMPOSITE checksum: sha256 over the concatenated raw sha256 of each part."""
    outer = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(part_size):
            outer.update(hashlib.sha256(block).digest())
    return base64.b64encode(outer.digest()).decode()


def _safe_rel(rel: str, where: str) -> str:
    """A manifest from a bucket is untrusted: its paths must stay inside the target directory."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel == MANIFEST:
        raise StorageError(f"{where}: refusing unsafe file path {rel!r} in manifest")
    return p.as_posix()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                dynamic_ncols=True)


def _pool_map(fn, items, workers: int) -> list:
    """Run fn over items on a thread pool; the first failure cancels what has not started."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, it) for it in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _transfer_config(workers: int, threshold: int, chunksize: int):
    from boto3.s3.transfer import TransferConfig

    # parts of one file in parallel too: a dataset is often a few big shards
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunksize,
                          max_concurrency=max(1, min(4, workers)), use_threads=True)


def _local_matches(path: Path, size: int, sha: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha


# ----------------------------------------------------------------------------------------------
# upload


def upload(local_dir: str | Path, uri: str, endpoint_url: str | None = None, profile: str | None = None,
           region: str | None = None, workers: int = 8, *, force: bool = False,
           multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
           multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE, max_attempts: int = 5,
           file_attempts: int = 3, progress: bool = True) -> TransferSummary:
    """Upload a finished shard directory. Files already stored and verified are skipped; the
    manifest goes last. Without a manifest the directory is incomplete and is refused unless
    `force` (then every file goes, hashed locally, and no manifest is written)."""
    t0 = time.time()
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    mpath = local_dir / MANIFEST
    manifest_bytes: bytes | None = None
    if mpath.exists():
        manifest_bytes = mpath.read_bytes()
        try:
            manifest = Manifest.from_dict(json.loads(manifest_bytes), str(mpath))
        except (ValueError, json.JSONDecodeError) as e:
            raise StorageError(f"{mpath}: unreadable manifest ({e})") from None
        expected = {_safe_rel(rel, str(mpath)): (e.bytes, e.sha256) for rel, e in manifest.files.items()}
    elif force:
        rels = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                      if p.is_file() and not p.name.endswith((".part", ".tmp")))
        expected = {rel: ((local_dir / rel).stat().st_size, "") for rel in rels}
    else:
        raise StorageError(f"{mpath} missing: {local_dir} is not a finished shard directory (its pipeline has "
                           f"not completed); refusing to upload an incomplete dataset — pass --force to upload "
                           f"the files anyway (no manifest is written then)")

    # 1. the local copy must be what its manifest says, or we would publish corrupt data
    def local_check(rel: str) -> tuple[str, str]:
        path, (size, sha) = local_dir / rel, expected[rel]
        if not path.is_file():
            raise StorageError(f"{path}: listed in {mpath} but missing")
        if path.stat().st_size != size:
            raise StorageError(f"{path}: {path.stat().st_size} bytes, manifest says {size}")
        got = sha256_file(path)
        if sha and got != sha:
            raise StorageError(f"{path}: sha256 {got[:12]}… does not match the manifest ({sha[:12]}…); "
                               f"run `python -m shards verify {local_dir}`")
        return rel, got

    shas = dict(_pool_map(local_check, list(expected), workers))

    # 2. what the destination already holds
    remote = _Remote(uri, endpoint_url, profile, region, workers, max_attempts, file_attempts)
    remote.check_bucket()
    summary = TransferSummary("upload", remote.uri, str(local_dir), files=len(expected))
    summary.aborted_multipart = remote.abort_multipart()
    listing = remote.list_objects()
    mkey = remote.key(MANIFEST)

    def already_there(rel: str) -> bool:
        size = expected[rel][0]
        return listing.get(remote.key(rel)) == size and remote.object_matches(
            rel, local_dir / rel, size, shas[rel], multipart_chunksize)

    present = _pool_map(already_there, list(expected), workers)
    todo = [rel for rel, ok in zip(expected, present) if not ok]
    summary.skipped = [rel for rel, ok in zip(expected, present) if ok]
    if mkey in listing and (todo or manifest_bytes is None or remote.get_bytes(MANIFEST) != manifest_bytes):
        # files are about to change (or an older dataset lives here): take the manifest down first so
        # that nobody meanwhile sees a "complete" dataset whose manifest does not match its files
        remote.call(f"removing stale {remote.url(MANIFEST)}", remote.client.delete_object,
                    Bucket=remote.bucket, Key=mkey)
        listing.pop(mkey)

    # 3. send what differs, biggest first so the pool stays busy
    todo.sort(key=lambda r: -expected[r][0])
    config = _transfer_config(workers, multipart_threshold, multipart_chunksize)
    bar = _progress(sum(expected[r][0] for r in todo), f"upload {remote.uri}", progress)
    lock = threading.Lock()

    def send(rel: str) -> None:
        key, path = remote.key(rel), local_dir / rel
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": shas[rel]}}
        remote.retry(f"uploading {path} to {remote.url(rel)}",
                     lambda: remote.client.upload_file(str(path), remote.bucket, key, ExtraArgs=extra,
                                                       Config=config, Callback=bar.update),
                     before_retry=lambda: remote.abort_multipart(key))
        if not remote.object_matches(rel, path, expected[rel][0], shas[rel], multipart_chunksize):
            raise StorageError(f"{remote.url(rel)}: stored object does not match {path} after upload "
                               f"(checksum mismatch); rerun to retry")
        with lock:
            summary.transferred.append(rel)
            summary.bytes_transferred += expected[rel][0]

    try:
        _pool_map(send, todo, workers)
    finally:
        bar.close()
    summary.aborted_multipart += remote.abort_multipart()  # nothing half-made stays behind

    # 4. the manifest, last: its presence says "complete"
    if manifest_bytes is not None and mkey not in listing:
        sha = hashlib.sha256(manifest_bytes).hexdigest()
        remote.retry(f"uploading {remote.url(MANIFEST)}",
                     lambda: remote.client.put_object(Bucket=remote.bucket, Key=mkey, Body=manifest_bytes,
                                                      ChecksumAlgorithm="SHA256", Metadata={"sha256": sha}))
        summary.transferred.append(MANIFEST)
        summary.bytes_transferred += len(manifest_bytes)
    summary.seconds = time.time() - t0
    log.info(summary.line())
    return summary


# ----------------------------------------------------------------------------------------------
# download


def download(uri: str, local_dir: str | Path, endpoint_url: str | None = None, profile: str | None = None,
             region: str | None = None, workers: int = 8, *,
             multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
             multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE, max_attempts: int = 5,
             file_attempts: int = 3, progress: bool = True) -> TransferSummary:
    """Download a dataset whose manifest is at URI/manifest.json. Local files that already hash to
    the manifest are kept; each other file goes to NAME.part, is hashed, and renamed into place only
    if it matches; the manifest is written last."""
    t0 = time.time()
    local_dir = Path(local_dir)
    remote = _Remote(uri, endpoint_url, profile, region, workers, max_attempts, file_attempts)
    remote.check_bucket()
    listing = remote.list_objects()
    mkey = remote.key(MANIFEST)
    if mkey not in listing:
        raise StorageError(f"{remote.url(MANIFEST)} not found: not a ShardLoom dataset, or its upload has not "
                           f"finished (the manifest is uploaded last)")
    manifest_bytes = remote.get_bytes(MANIFEST)
    try:
        manifest = Manifest.from_dict(json.loads(manifest_bytes), remote.url(MANIFEST))
    except (ValueError, json.JSONDecodeError) as e:
        raise StorageError(f"{remote.url(MANIFEST)}: unreadable manifest ({e})") from None
    expected = {_safe_rel(rel, remote.url(MANIFEST)): (e.bytes, e.sha256) for rel, e in manifest.files.items()}
    for rel, (size, _) in expected.items():
        have = listing.get(remote.key(rel))
        if have is None:
            raise StorageError(f"{remote.url(rel)}: listed in the remote manifest but missing from the bucket")
        if have != size:
            raise StorageError(f"{remote.url(rel)}: object is {have} bytes, the manifest says {size} "
                               f"(tampered or partially replaced dataset)")

    local_dir.mkdir(parents=True, exist_ok=True)
    mpath = local_dir / MANIFEST
    if mpath.exists() and mpath.read_bytes() != manifest_bytes:
        mpath.unlink()  # the local copy is about to change: it must not look complete meanwhile
    summary = TransferSummary("download", remote.uri, str(local_dir), files=len(expected))

    for rel in expected:  # leftovers of an interrupted run are never trusted
        (local_dir / (rel + ".part")).unlink(missing_ok=True)
    present = _pool_map(lambda rel: _local_matches(local_dir / rel, *expected[rel]), list(expected), workers)
    todo = sorted((rel for rel, ok in zip(expected, present) if not ok), key=lambda r: -expected[r][0])
    summary.skipped = [rel for rel, ok in zip(expected, present) if ok]
    config = _transfer_config(workers, multipart_threshold, multipart_chunksize)
    bar = _progress(sum(expected[r][0] for r in todo), f"download {remote.uri}", progress)
    lock = threading.Lock()

    def fetch(rel: str) -> None:
        size, sha = expected[rel]
        final = local_dir / rel
        part = final.with_name(final.name + ".part")
        final.parent.mkdir(parents=True, exist_ok=True)

        def once():
            # download_fileobj writes ranges in place into a file we own: no temp names of its own
            with open(part, "wb") as f:
                remote.client.download_fileobj(remote.bucket, remote.key(rel), f, Config=config,
                                               Callback=bar.update)

        remote.retry(f"downloading {remote.url(rel)}", once)
        got = sha256_file(part)
        if got != sha:
            part.unlink(missing_ok=True)
            raise StorageError(f"{rel}: sha256 mismatch after download from {remote.url(rel)}: got {got[:16]}…, "
                               f"manifest says {sha[:16]}… — the stored object does not match its manifest")
        os.replace(part, final)
        with lock:
            summary.transferred.append(rel)
            summary.bytes_transferred += size

    try:
        _pool_map(fetch, todo, workers)
    finally:
        bar.close()
        for rel in todo:  # a failed or interrupted file leaves no .part behind
            (local_dir / (rel + ".part")).unlink(missing_ok=True)
    if not mpath.exists():
        tmp = mpath.with_name(MANIFEST + ".tmp")
        tmp.write_bytes(manifest_bytes)
        os.replace(tmp, mpath)
        summary.transferred.append(MANIFEST)
        summary.bytes_transferred += len(manifest_bytes)
    summary.seconds = time.time() - t0
    log.info(summary.line())
    return summary


def sync(src: str | Path, dst: str | Path, endpoint_url: str | None = None, profile: str | None = None,
         region: str | None = None, workers: int = 8, **kwargs) -> TransferSummary:
    """Make DST equal SRC; the side that is s3:// picks the direction. Only files whose size or
    sha256 differ from the manifest move (upload/download already work that way)."""
    if is_s3_uri(dst) and not is_s3_uri(src):
        return upload(src, str(dst), endpoint_url, profile, region, workers, **kwargs)
    if is_s3_uri(src) and not is_s3_uri(dst):
        kwargs.pop("force", None)
        return download(str(src), dst, endpoint_url, profile, region, workers, **kwargs)
    raise StorageError(f"sync needs exactly one s3:// side (got {src} -> {dst})")


# ----------------------------------------------------------------------------------------------
# cache for s3:// curriculum sources


def cache_path(uri: str, cache_dir: str | Path) -> Path:
    bucket, prefix = parse_s3_uri(uri)
    return Path(cache_dir) / bucket / prefix if prefix else Path(cache_dir) / bucket


def fetch_to_cache_with_summary(uri: str, cache_dir: str | Path, endpoint_url: str | None = None,
                                profile: str | None = None, region: str | None = None,
                                **kwargs) -> tuple[Path, TransferSummary]:
    dest = cache_path(uri, cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # every DDP rank on a node may ask at once: one downloads, the others then find a verified copy
    with open(dest.parent / f".{dest.name}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            summary = download(uri, dest, endpoint_url, profile, region, **kwargs)
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
    return dest, summary


def fetch_to_cache(uri: str, cache_dir: str | Path, endpoint_url: str | None = None,
                   profile: str | None = None, region: str | None = None, **kwargs) -> Path:
    """Local, verified copy of the dataset at URI under CACHE_DIR/<bucket>/<prefix>; returns its path.

    A cache hit (cached manifest identical to the remote one, every file hashing to it) transfers
    nothing. We copy rather than read byte ranges because the trainer memory-maps shards and samples
    windows at random: range reads would cost one round trip per window, and a verified local copy
    is what makes resume exact and the sha256 check meaningful."""
    return fetch_to_cache_with_summary(uri, cache_dir, endpoint_url, profile, region, **kwargs)[0]
