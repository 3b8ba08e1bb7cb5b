"""Shard directories to and from S3-compatible object storage (AWS S3, Cloudflare R2, MinIO).

    upload(DIR, "s3://bucket/prefix")     local shard dir -> objects, manifest.json LAST
    download("s3://bucket/prefix", DIR)   objects -> local dir, manifest.json LAST
    sync(SRC, DST)                        either direction, picked by which side is s3://
    fetch_to_cache(uri, cache_dir)        what the trainer calls for an s3:// curriculum source
    storage_options(...)                  fsspec/s3fs options for datatrove s3:// folders

Every transfer moves only what differs. "Differs" is decided by size and sha256 against the
manifest: a local file is skipped when it hashes to the manifest's sha256; a remote object is skipped
when the checksum S3 itself computed on receipt (`ChecksumSHA256`, uploaded with
`ChecksumAlgorithm="SHA256"`) matches the local bytes.

Each file is hashed once, not once per transfer: the manifest (or checkpoint's checksums.json)
beside a local file is a record written after hashing it, so a file of the listed size that the
record vouches for (`shards.manifest.vouched_by`: content older than the record by a timestamp
tick, unchanged since) takes the recorded sha256 instead of being read again. Upload uses that for
its pre-send check; download for the local copy it would keep (every rank and split of a training
run asks for the same cache), and a download that had to hash or fetch renews the local record's
timestamps, since every file it lists has just been verified. Anything rewritten after its record
is hashed as before. So rerunning an interrupted transfer is the
resume: finished files are verified and skipped, stale multipart uploads under the prefix are
aborted (we never resume half a multipart: a part boundary/size mix-up is worse than re-sending one
file), downloads land in `NAME.part` and are renamed only after their sha256 matches.

What the upload check proves: for a multipart object S3 (and moto) hash every part they received
and report sha256-of-part-hashes ("<b64>-N"); we recompute that from the local file, which already
matched the manifest, so equal means the stored bytes are the manifest's bytes. For a single-part
object AWS rejects a body whose sha256 differs from the `x-amz-checksum-sha256` header we sent
(moto only stores the header). When a server returns no checksum at all, the object's
`x-amz-meta-sha256` (which we write) and its size are compared instead — weaker: it shows the object
is ours, not that its bytes survived; `download` hashes every fetched file, so a reader is never
fooled.

The S3 client underneath (credential chain, secret-free error messages, retries) is `shards.s3`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .manifest import MANIFEST, Manifest, sha256_file, vouched_by
# The client layer lives in shards.s3; its public names stay importable from here.
from .s3 import StorageError, _Remote, default_region, is_s3_uri, parse_s3_uri, storage_options  # noqa: F401

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB  # S3's minimum part is 5 MiB; s3transfer clamps to it


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


def _local_state(path: Path, size: int, sha: str, record: os.stat_result | None) -> str:
    """A local copy against its listing: "vouched" (its record stands in for hashing it), "hashed"
    (it hashes to sha) or "differs"."""
    if not path.is_file():
        return "differs"
    st = path.stat()
    if st.st_size != size:
        return "differs"
    if vouched_by(st, record):
        return "vouched"
    return "hashed" if sha256_file(path) == sha else "differs"


def _record_stat(path: Path) -> os.stat_result | None:
    return path.stat() if path.is_file() else None



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
        expected = {_safe_rel(rel, str(mpath)): v for rel, v in manifest_files(manifest_bytes, str(mpath)).items()}
    elif force:
        rels = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
                      if p.is_file() and not p.name.endswith((".part", ".tmp")))
        expected = {rel: ((local_dir / rel).stat().st_size, "") for rel in rels}
    else:
        raise StorageError(f"{mpath} missing: {local_dir} is not a finished shard directory (its pipeline has "
                           f"not completed); refusing to upload an incomplete dataset — pass --force to upload "
                           f"the files anyway (no manifest is written then)")
    return _upload(local_dir, uri, expected, MANIFEST, manifest_bytes, t0, endpoint_url, profile, region, workers,
                   multipart_threshold, multipart_chunksize, max_attempts, file_attempts, progress)


def parse_listing(data: bytes, where: str) -> dict[str, str]:
    """A JSON {file: sha256} listing (a checkpoint's checksums.json), or a StorageError naming `where`."""
    try:
        sums = json.loads(data)
    except ValueError as e:
        raise StorageError(f"{where}: unreadable ({e})") from None
    if not isinstance(sums, dict):
        raise StorageError(f"{where}: not a JSON object of file: sha256")
    return sums


def manifest_files(data: bytes, where: str) -> dict[str, tuple[int, str]]:
    """{file: (bytes, sha256)} from a manifest's bytes, or a StorageError naming `where`."""
    try:
        manifest = Manifest.from_dict(json.loads(data), where)
    except (ValueError, json.JSONDecodeError) as e:
        raise StorageError(f"{where}: unreadable manifest ({e})") from None
    return {rel: (e.bytes, e.sha256) for rel, e in manifest.files.items()}


def upload_files(local_dir: str | Path, uri: str, last: str, endpoint_url: str | None = None,
                 profile: str | None = None, region: str | None = None, workers: int = 8, *,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE, max_attempts: int = 5,
                 file_attempts: int = 3, progress: bool = True) -> TransferSummary:
    """`upload` for a folder that is not a shard dataset (a checkpoint): `last`, the file in it that
    lists each relative path with the sha256 it must have (a checkpoint's checksums.json: checked
    before sending, verified once stored), goes last: its presence says complete."""
    t0 = time.time()
    local_dir = Path(local_dir)
    path = local_dir / last
    try:
        last_bytes = path.read_bytes()
    except OSError as e:
        raise StorageError(f"{path}: unreadable ({e})") from None
    expected = {_safe_rel(rel, str(path)): ((local_dir / rel).stat().st_size if (local_dir / rel).is_file() else -1, sha)
                for rel, sha in parse_listing(last_bytes, str(path)).items()}
    return _upload(local_dir, uri, expected, last, last_bytes, t0, endpoint_url, profile,
                   region, workers, multipart_threshold, multipart_chunksize, max_attempts, file_attempts, progress)


def _upload(local_dir: Path, uri: str, expected: dict[str, tuple[int, str]], last: str, last_bytes: bytes | None,
            t0: float, endpoint_url, profile, region, workers: int, multipart_threshold: int,
            multipart_chunksize: int, max_attempts: int, file_attempts: int, progress: bool) -> TransferSummary:
    """Check the local files against `expected` ({rel: (bytes, sha256 or "")}), send what the
    destination lacks, then `last_bytes` as `last` (none when None)."""
    record = _record_stat(local_dir / last) if last_bytes is not None else None
    shas = _check_local(local_dir, expected, last, record, workers)
    remote = _Remote(uri, endpoint_url, profile, region, workers, max_attempts, file_attempts)
    remote.check_bucket()
    summary = TransferSummary("upload", remote.uri, str(local_dir), files=len(expected))
    summary.aborted_multipart = remote.abort_multipart()
    todo, summary.skipped, last_stored = _stored_already(remote, local_dir, expected, shas, last, last_bytes,
                                                         multipart_chunksize, workers)
    config = _transfer_config(workers, multipart_threshold, multipart_chunksize)
    _transfer_all(todo, expected, summary, f"upload {remote.uri}", progress, workers,
                  lambda rel, bar: _send(remote, local_dir / rel, rel, expected[rel][0], shas[rel], config,
                                         multipart_chunksize, bar))
    summary.aborted_multipart += remote.abort_multipart()  # nothing half-made stays behind
    if last_bytes is not None and not last_stored:
        _put_last(remote, last, last_bytes, summary)
    summary.seconds = time.time() - t0
    log.info(summary.line())
    return summary


def _check_local(local_dir: Path, expected: dict[str, tuple[int, str]], last: str, record: os.stat_result | None,
                 workers: int) -> dict[str, str]:
    """The local copy must be what its manifest says, or we would publish corrupt data: {rel: sha256},
    the recorded one where the record vouches for the file, else what it hashes to."""
    mpath = local_dir / last

    def check(rel: str) -> tuple[str, str]:
        path, (size, sha) = local_dir / rel, expected[rel]
        if not path.is_file():
            raise StorageError(f"{path}: listed in {mpath} but missing")
        st = path.stat()
        if st.st_size != size:
            raise StorageError(f"{path}: {st.st_size} bytes, manifest says {size}")
        if sha and vouched_by(st, record):  # hashed when the manifest was written, unchanged since
            return rel, sha
        got = sha256_file(path)
        if sha and got != sha:
            raise StorageError(f"{path}: sha256 {got[:12]}… does not match the manifest ({sha[:12]}…); "
                               f"run `python -m shards verify {local_dir}`")
        return rel, got

    return dict(_pool_map(check, list(expected), workers))


def _stored_already(remote: _Remote, local_dir: Path, expected: dict[str, tuple[int, str]], shas: dict[str, str],
                    last: str, last_bytes: bytes | None, chunksize: int,
                    workers: int) -> tuple[list[str], list[str], bool]:
    """(files to send, files the destination already holds verified, whether its `last` stays). A
    remote `last` that is about to be stale is taken down first."""
    listing = remote.list_objects()

    def there(rel: str) -> bool:
        size = expected[rel][0]
        return listing.get(remote.key(rel)) == size and remote.object_matches(
            rel, local_dir / rel, size, shas[rel], chunksize)

    present = _pool_map(there, list(expected), workers)
    todo = [rel for rel, ok in zip(expected, present) if not ok]
    skipped = [rel for rel, ok in zip(expected, present) if ok]
    mkey = remote.key(last)
    if mkey in listing and (todo or last_bytes is None or remote.get_bytes(last) != last_bytes):
        # files are about to change (or an older dataset lives here): take the manifest down first so
        # that nobody meanwhile sees a "complete" dataset whose manifest does not match its files
        remote.call(f"removing stale {remote.url(last)}", remote.client.delete_object,
                    Bucket=remote.bucket, Key=mkey)
        return todo, skipped, False
    return todo, skipped, mkey in listing


def _transfer_all(todo: list[str], expected: dict, summary: TransferSummary, desc: str, progress: bool,
                  workers: int, one) -> None:
    """`one(rel, bar)` for every file in todo, biggest first so the pool stays busy, behind one
    progress bar; each file that completes is counted in summary."""
    bar = _progress(sum(expected[r][0] for r in todo), desc, progress)
    lock = threading.Lock()

    def run(rel: str) -> None:
        one(rel, bar)
        with lock:
            summary.transferred.append(rel)
            summary.bytes_transferred += expected[rel][0]

    try:
        _pool_map(run, sorted(todo, key=lambda r: -expected[r][0]), workers)
    finally:
        bar.close()


def _send(remote: _Remote, path: Path, rel: str, size: int, sha: str, config, chunksize: int, bar) -> None:
    """One file up, then the stored object checked against sha (S3's own checksum of what it got)."""
    key = remote.key(rel)
    extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha}}
    remote.retry(f"uploading {path} to {remote.url(rel)}",
                 lambda: remote.client.upload_file(str(path), remote.bucket, key, ExtraArgs=extra,
                                                   Config=config, Callback=bar.update),
                 before_retry=lambda: remote.abort_multipart(key))
    if not remote.object_matches(rel, path, size, sha, chunksize):
        raise StorageError(f"{remote.url(rel)}: stored object does not match {path} after upload "
                           f"(checksum mismatch); rerun to retry")


def _put_last(remote: _Remote, last: str, last_bytes: bytes, summary: TransferSummary) -> None:
    """The manifest, last: its presence says "complete"."""
    sha = hashlib.sha256(last_bytes).hexdigest()
    remote.retry(f"uploading {remote.url(last)}",
                 lambda: remote.client.put_object(Bucket=remote.bucket, Key=remote.key(last), Body=last_bytes,
                                                  ChecksumAlgorithm="SHA256", Metadata={"sha256": sha}))
    summary.transferred.append(last)
    summary.bytes_transferred += len(last_bytes)


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
    return download_files(uri, local_dir, MANIFEST, manifest_files, endpoint_url, profile, region, workers,
                          multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                          max_attempts=max_attempts, file_attempts=file_attempts, progress=progress)


def download_files(uri: str, local_dir: str | Path, last: str, files_of, endpoint_url: str | None = None,
                   profile: str | None = None, region: str | None = None, workers: int = 8, *,
                   multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                   multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE, max_attempts: int = 5,
                   file_attempts: int = 3, progress: bool = True) -> TransferSummary:
    """`download` for any folder whose file `last` lists the others: `files_of(bytes of last, its
    URL)` gives {rel: (bytes or None for "as listed", sha256)} (paths from a bucket are untrusted: each
    must stay inside local_dir); `last` is written last."""
    t0 = time.time()
    local_dir = Path(local_dir)
    remote = _Remote(uri, endpoint_url, profile, region, workers, max_attempts, file_attempts)
    remote.check_bucket()
    last_bytes, expected = _remote_listing(remote, last, files_of)

    local_dir.mkdir(parents=True, exist_ok=True)
    mpath = local_dir / last
    if mpath.exists() and mpath.read_bytes() != last_bytes:
        mpath.unlink()  # the local copy is about to change: it must not look complete meanwhile
    summary = TransferSummary("download", remote.uri, str(local_dir), files=len(expected))
    todo, summary.skipped, hashed = _local_copies(local_dir, expected, _record_stat(mpath), workers)
    config = _transfer_config(workers, multipart_threshold, multipart_chunksize)
    try:
        _transfer_all(todo, expected, summary, f"download {remote.uri}", progress, workers,
                      lambda rel, bar: _fetch(remote, local_dir / rel, rel, expected[rel][1], config, bar))
    finally:
        for rel in todo:  # a failed or interrupted file leaves no .part behind
            (local_dir / (rel + ".part")).unlink(missing_ok=True)
    _write_last(local_dir, last, last_bytes, summary, renew=bool(todo) or hashed)
    summary.seconds = time.time() - t0
    log.info(summary.line())
    return summary


def _remote_listing(remote: _Remote, last: str, files_of) -> tuple[bytes, dict[str, tuple[int, str]]]:
    """The remote `last` and the files it lists, each in the bucket at its listed size: {rel: (bytes, sha256)}."""
    listing = remote.list_objects()
    if remote.key(last) not in listing:
        what = "not a ShardLoom dataset, or its upload" if last == MANIFEST else "no upload here, or it"
        raise StorageError(f"{remote.url(last)} not found: {what} has not finished ({last} is uploaded last)")
    last_bytes = remote.get_bytes(last)
    expected = {_safe_rel(rel, remote.url(last)): v for rel, v in files_of(last_bytes, remote.url(last)).items()}
    for rel, (size, sha) in expected.items():
        have = listing.get(remote.key(rel))
        if have is None:
            raise StorageError(f"{remote.url(rel)}: listed in the remote {last} but missing from the bucket")
        if size is not None and have != size:
            raise StorageError(f"{remote.url(rel)}: object is {have} bytes, the manifest says {size} "
                               f"(tampered or partially replaced dataset)")
        expected[rel] = (have, sha)
    return last_bytes, expected


def _local_copies(local_dir: Path, expected: dict[str, tuple[int, str]], record: os.stat_result | None,
                  workers: int) -> tuple[list[str], list[str], bool]:
    """(files to fetch, files already here and verified, whether any had to be hashed for that)."""
    for rel in expected:  # leftovers of an interrupted run are never trusted
        (local_dir / (rel + ".part")).unlink(missing_ok=True)
    states = _pool_map(lambda rel: _local_state(local_dir / rel, *expected[rel], record), list(expected), workers)
    todo = [rel for rel, state in zip(expected, states) if state == "differs"]
    skipped = [rel for rel, state in zip(expected, states) if state != "differs"]
    return todo, skipped, "hashed" in states


def _fetch(remote: _Remote, final: Path, rel: str, sha: str, config, bar) -> None:
    """One file down to NAME.part, renamed into place only once it hashes to sha."""
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)

    def once():
        # download_fileobj writes ranges in place into a file we own: no temp names of its own
        with open(part, "wb") as f:
            remote.client.download_fileobj(remote.bucket, remote.key(rel), f, Config=config, Callback=bar.update)

    remote.retry(f"downloading {remote.url(rel)}", once)
    got = sha256_file(part)
    if got != sha:
        part.unlink(missing_ok=True)
        raise StorageError(f"{rel}: sha256 mismatch after download from {remote.url(rel)}: got {got[:16]}…, "
                           f"manifest says {sha[:16]}… — the stored object does not match its manifest")
    os.replace(part, final)


def _write_last(local_dir: Path, last: str, last_bytes: bytes, summary: TransferSummary, renew: bool) -> None:
    """The listing file, last (atomically). One already in place is kept; when this run hashed or
    fetched files its timestamps are renewed: every file it lists was verified just now, so it
    vouches for them from here on."""
    mpath = local_dir / last
    if not mpath.exists():
        tmp = mpath.with_name(mpath.name + ".tmp")
        tmp.write_bytes(last_bytes)
        os.replace(tmp, mpath)
        summary.transferred.append(last)
        summary.bytes_transferred += len(last_bytes)
    elif renew:
        with contextlib.suppress(OSError):  # a read-only copy stays as it is (and is hashed next time)
            os.utime(mpath)


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


def listing(uri: str, endpoint_url: str | None = None, profile: str | None = None,
            region: str | None = None) -> dict[str, int]:
    """{path relative to URI: bytes} of every object under URI."""
    remote = _Remote(uri, endpoint_url, profile, region, 1, 5, 1)
    cut = len(remote.key(""))
    return {k[cut:]: size for k, size in remote.list_objects().items()}


def remove(uri: str, first: str | None = None, endpoint_url: str | None = None, profile: str | None = None,
           region: str | None = None) -> int:
    """Delete every object under URI, `first` (the file whose presence says complete) before the
    others, so a half-deleted folder never looks complete. Returns how many went."""
    remote = _Remote(uri, endpoint_url, profile, region, 1, 5, 1)
    keys = sorted(remote.list_objects(), key=lambda k: k != remote.key(first) if first else False)
    for k in keys:
        remote.call(f"deleting s3://{remote.bucket}/{k}", remote.client.delete_object, Bucket=remote.bucket, Key=k)
    return len(keys)


# ----------------------------------------------------------------------------------------------
# cache for s3:// curriculum sources


DEFAULT_CACHE_DIR = Path.home() / ".cache" / "shardloom"  # where s3:// sources and checkpoints are copied


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    cache_dir = DEFAULT_CACHE_DIR if cache_dir is None else cache_dir
    bucket, prefix = parse_s3_uri(uri)
    return Path(cache_dir) / bucket / prefix if prefix else Path(cache_dir) / bucket


def fetch_to_cache_with_summary(uri: str, cache_dir: str | Path | None = None, endpoint_url: str | None = None,
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


def fetch_to_cache(uri: str, cache_dir: str | Path | None = None, endpoint_url: str | None = None,
                   profile: str | None = None, region: str | None = None, **kwargs) -> Path:
    """Local, verified copy of the dataset at URI under CACHE_DIR (default DEFAULT_CACHE_DIR)/<bucket>/<prefix>;
    returns its path.

    A cache hit (cached manifest identical to the remote one, every file vouched for by it or
    hashing to it) transfers nothing, and hashes nothing once the cached manifest vouches for all. We copy rather than read byte ranges because the trainer memory-maps shards and samples
    windows at random: range reads would cost one round trip per window, and a verified local copy
    is what makes resume exact and the sha256 check meaningful."""
    return fetch_to_cache_with_summary(uri, cache_dir, endpoint_url, profile, region, **kwargs)[0]
