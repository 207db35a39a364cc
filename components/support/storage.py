"""Local and S3 storage: URIs, atomic writes, checksummed downloads.

Credentials, region and endpoint come from the usual AWS configuration (environment variables such as
``AWS_ACCESS_KEY_ID``/``AWS_ENDPOINT_URL``, ``~/.aws/config``, instance roles); cliploop's config may add an
endpoint URL and a region, never credentials. Nothing here logs a credential or a presigned URL.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report as is."""


class ChecksumMismatch(StorageError):
    pass


class StorageUnavailable(StorageError):
    """The store gave no usable answer after the client's retries: connection refused or reset, a timeout,
    a 5xx or a throttling error. Nothing is known about the object, so callers must not treat it as
    absent or bad (no quarantine, no "missing"): the step ends as a storage failure and is re-run."""


# Client errors that say "this object or request is wrong"; every other failure is the store's.
_DEFINITE_CODES = {
    "NoSuchKey",
    "NoSuchBucket",
    "404",
    "NotFound",
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "InvalidRange",
    "400",
    "InvalidRequest",
}


def storage_error(exc: BaseException, what: str) -> StorageError:
    """``exc`` (from boto3, botocore or the socket) as a StorageError saying what failed, or, when the store
    could not answer, as a StorageUnavailable."""
    if isinstance(exc, StorageError):
        return exc
    text = _client_error_text(exc)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _DEFINITE_CODES or (400 <= status < 500 and status not in (408, 429)):
            return StorageError(f"{what}: {text}")
    return StorageUnavailable(
        f"{what}: the S3 store did not answer usably after retries ({type(exc).__name__}: "
        f"{text}); safe to re-run when the store is reachable"
    )


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # no leading slash; "" for the bucket root

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if len(bucket) < 3:
            raise ValueError(f"bad S3 bucket name in {uri!r}")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        key = self.key
        for part in parts:
            part = part.strip("/")
            if not part:
                continue
            key = f"{key.rstrip('/')}/{part}" if key else part
        return S3Uri(self.bucket, key)

    def as_prefix(self) -> S3Uri:
        return self if (not self.key or self.key.endswith("/")) else S3Uri(self.bucket, self.key + "/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(uri: str | os.PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


@dataclass(frozen=True)
class S3Settings:
    """Non-secret S3 settings from cliploop's config; None means "from the AWS configuration".

    Retries: ``max_attempts`` (in all, the first one included) and ``retry_mode`` here, else the AWS
    configuration's (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``, ``max_attempts``/``retry_mode`` in
    ``~/.aws/config``), else 6 attempts in botocore's ``standard`` mode (which retries resets, timeouts,
    5xx and throttling with backoff).
    The timeouts bound a store that accepts connections and never answers (``s3.connect_timeout_s`` and
    ``s3.read_timeout_s`` in cliploop's config, per attempt; DVC's transfers get the same, docs/storage.md).
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int | None = None
    retry_mode: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


DEFAULT_MAX_ATTEMPTS = 6  # the first and 5 retries, as before the AWS configuration was honoured
DEFAULT_RETRY_MODE = "standard"


def retry_config(settings: S3Settings | None = None, botocore_session=None) -> dict:
    """botocore's ``retries`` setting: cliploop's config first, then the AWS configuration, then our default.

    An explicit ``retries`` in a client's Config hides the AWS configuration's, so it is resolved here.
    ``total_max_attempts`` counts the first attempt, as ``AWS_MAX_ATTEMPTS`` does (botocore's
    ``max_attempts`` key would count retries only).
    """
    settings = settings or S3Settings()
    if botocore_session is None:
        import botocore.session

        botocore_session = botocore.session.get_session()
    from botocore.exceptions import ProfileNotFound

    try:  # the profile's own settings (botocore's config variables would answer with its defaults)
        profile = botocore_session.get_scoped_config()
    except ProfileNotFound:  # botocore says so itself when the client is made
        profile = {}
    attempts = settings.max_attempts or os.environ.get("AWS_MAX_ATTEMPTS") or profile.get("max_attempts")
    mode = settings.retry_mode or os.environ.get("AWS_RETRY_MODE") or profile.get("retry_mode")
    return {"total_max_attempts": int(attempts or DEFAULT_MAX_ATTEMPTS), "mode": mode or DEFAULT_RETRY_MODE}


def retry_env(settings: S3Settings | None = None) -> dict[str, str]:
    """The same attempts as :func:`retry_config`, as the AWS variables a child process (DVC's s3fs) reads."""
    retries = retry_config(settings)
    return {"AWS_MAX_ATTEMPTS": str(retries["total_max_attempts"]), "AWS_RETRY_MODE": retries["mode"]}


def s3_client(settings: S3Settings | None = None):
    """A boto3 S3 client. boto3 is imported here so that local-only work never pays for it."""
    import boto3
    import botocore.session
    from botocore.config import Config

    settings = settings or S3Settings()
    core = botocore.session.get_session()
    kwargs = {
        "config": Config(
            retries=retry_config(settings, core),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
    }
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.region:
        kwargs["region_name"] = settings.region
    return boto3.session.Session(botocore_session=core).client("s3", **kwargs)


def list_keys(uri: S3Uri, client) -> Iterator[tuple[str, int]]:
    """(key, size) of every object under a prefix."""
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.as_prefix().key if uri.key else ""):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"])
    except Exception as exc:  # botocore and socket errors alike: classified, never a raw traceback
        raise storage_error(exc, f"cannot list {uri}") from exc


def list_prefixes(uri: S3Uri, client) -> list[str]:
    """The immediate "sub-folders" of a prefix (their names, without slashes)."""
    prefix = uri.as_prefix().key if uri.key else ""
    names: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=uri.bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.append(common["Prefix"][len(prefix) :].rstrip("/"))
    except Exception as exc:
        raise storage_error(exc, f"cannot list {uri}") from exc
    return sorted(names)


def get_bytes(uri: S3Uri, client, max_bytes: int | None = None) -> bytes:
    """Read an object whole, refusing objects larger than ``max_bytes`` before reading them."""
    try:
        head = client.head_object(Bucket=uri.bucket, Key=uri.key)
    except Exception as exc:  # 404/403 say so; a reset or a 5xx says nothing about the object
        raise storage_error(exc, f"cannot read {uri}") from exc
    size = int(head["ContentLength"])
    if max_bytes is not None and size > max_bytes:
        raise StorageError(f"{uri} is {size} bytes, over the limit of {max_bytes}")
    try:
        # The ETag pins the version whose size was checked; a replaced object fails with 412, not a mix.
        body = client.get_object(Bucket=uri.bucket, Key=uri.key, IfMatch=head["ETag"])["Body"]
        try:
            data = body.read()
        finally:
            body.close()
    except Exception as exc:  # a reset inside the body is a ResponseStreamingError or a socket error
        raise storage_error(exc, f"cannot read {uri}") from exc
    if len(data) != size:
        raise StorageUnavailable(f"cannot read {uri}: got {len(data)} of {size} bytes")
    return data


def _client_error_text(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return f"{err.get('Code', '?')} {err.get('Message', '')}".strip()
    return str(exc)


# ---- local files ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give ordinary permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def download(
    uri: str, cache_dir: Path, expected_sha256: str | None = None, settings: S3Settings | None = None, client=None
) -> Path:
    """Fetch an ``s3://`` object into a content cache and verify it.

    The cache file is named by the object's SHA-256, so two URIs with the same content share it and a
    cached file is re-verified by name. With ``expected_sha256`` a mismatch is an error and nothing is
    cached; without it, a ``<key>.sha256`` sidecar object is used when present.
    """
    s3 = S3Uri.parse(uri)
    client = client or s3_client(settings)
    if expected_sha256 is None:
        try:
            sidecar = get_bytes(S3Uri(s3.bucket, s3.key + ".sha256"), client, max_bytes=1024)
            expected_sha256 = sidecar.decode("ascii").split()[0].strip().lower()
        except StorageUnavailable:
            raise  # an unreachable store is not "no sidecar": the check must not be skipped silently
        except StorageError:
            expected_sha256 = None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if expected_sha256:
        cached = cache_dir / f"{expected_sha256}{Path(s3.key).suffix}"
        if cached.exists() and sha256_file(cached) == expected_sha256:
            return cached
    fd, tmp = tempfile.mkstemp(prefix=".download.", dir=cache_dir)
    os.close(fd)
    try:
        try:
            client.download_file(s3.bucket, s3.key, tmp)
        except Exception as exc:
            raise storage_error(exc, f"cannot download {uri}") from exc
        actual = sha256_file(Path(tmp))
        if expected_sha256 and actual != expected_sha256:
            raise ChecksumMismatch(
                f"{uri}: sha256 is {actual}, expected {expected_sha256}; the object is corrupt or was replaced"
            )
        final = cache_dir / f"{actual}{Path(s3.key).suffix}"
        os.replace(tmp, final)
        return final
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_local_no_follow(root: Path, relpath: str) -> BinaryIO:
    """Open ``root/relpath`` for reading, refusing any symlink on the way (the target could be anywhere)."""
    current = Path(root)
    parts = Path(relpath).parts
    for i, part in enumerate(parts):
        current = current / part
        if current.is_symlink():
            raise PermissionError(f"{relpath}: '{'/'.join(parts[: i + 1])}' is a symbolic link")
    fd = os.open(current, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    return os.fdopen(fd, "rb")


def cache_dir() -> Path:
    """Where downloaded weights and built models are kept (``CLIPLOOP_CACHE``, else ``~/.cache/cliploop``)."""
    return Path(os.environ.get("CLIPLOOP_CACHE") or Path.home() / ".cache" / "cliploop")
