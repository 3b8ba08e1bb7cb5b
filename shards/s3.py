"""The S3 client layer under `shards.storage`: URIs, the credential chain, error messages, retries.

Credentials come only from boto3's usual chain (environment, `--profile`, ~/.aws files, instance
roles). They are never printed, logged or stored, and any error text is scrubbed of the secret key
and session token before it is raised. Errors a user can act on (rejected credentials, a missing
bucket, an unreachable endpoint) become one `StorageError` line naming the endpoint and bucket.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import re
import threading
import time
from pathlib import Path

log = logging.getLogger("shards.storage")

CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed", "403",
}
MISSING_BUCKET_CODES = {"NoSuchBucket", "404"}
RETRYABLE_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "503", "500"}



class StorageError(RuntimeError):
    """A transfer failed in a way the user can act on; the message names the file/bucket and never
    contains a secret."""



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


def _error_code(e: BaseException) -> str:
    """The S3 error code of a ClientError, or of the S3UploadFailedError that s3transfer wraps one in
    (only its text survives: "... An error occurred (SlowDown) when calling ...")."""
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    if "S3UploadFailedError" in type(e).__name__:
        m = re.search(r"error occurred \((\w+)\)", str(e)) or re.search(r"\((\w+)\)", str(e))
        return m.group(1) if m else ""
    return ""


def _retryable(e: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    return _error_code(e) in RETRYABLE_CODES


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
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(e, StorageError):
            return StorageError(self.scrub(str(e)))
        code = _error_code(e)
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

