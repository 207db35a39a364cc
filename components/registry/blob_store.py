"""Where tensor blobs live: the ``tensors/`` folder of an artifact store (a folder or an ``s3://`` prefix), each
blob at ``tensors/<d[:2]>/<d>.safetensors`` under the SHA-256 ``d`` of its bytes (what a blob is:
``components/registry/tensor_store.py``). A blob is written once and never changed; a reader takes it only when
its bytes have its digest, so any store that holds it will do (:func:`candidates`); ``cliploop gc`` removes the
ones no manifest names (:func:`collect`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from components.registry.registry_runs import RegistryError
from components.support import storage

FOLDER = "tensors"  # under the artifact store's root
ENV = "CLIPLOOP_TENSOR_STORE"  # where to look first for blobs (a folder or an s3:// prefix: an artifacts.root)
GRACE_S = 24 * 3600  # gc leaves younger unreferenced blobs alone: a step may be about to publish a manifest naming them


class TensorStoreError(RegistryError):
    """A blob missing, changed or planted, or a manifest that does not rebuild its file: nothing was loaded."""


class BlobStore:
    """The ``tensors/`` folder of an artifact store (a folder or an ``s3://`` prefix)."""

    def __init__(self, root: str | Path, s3: storage.S3Settings | None = None):
        self.root = str(root).rstrip("/")
        self._s3 = s3
        self._client = None

    def __repr__(self) -> str:
        return f"BlobStore({self.root!r})"

    @property
    def remote(self) -> bool:
        return storage.is_s3(self.root)

    def name(self, digest: str) -> str:
        return f"{self.root}/{FOLDER}/{digest[:2]}/{digest}.safetensors"

    def _uri(self, digest: str) -> storage.S3Uri:
        return storage.S3Uri.parse(self.name(digest))

    def client(self):
        if self._client is None:
            self._client = storage.s3_client(self._s3)
        return self._client

    def get(self, digest: str) -> bytes | None:
        """The blob's bytes as stored (unverified), or None when this store does not hold it."""
        if not self.remote:
            path = Path(self.name(digest))
            return path.read_bytes() if path.is_file() else None
        try:
            return storage.get_bytes(self._uri(digest), self.client())
        except storage.StorageUnavailable:
            raise
        except storage.StorageError:
            return None

    def has(self, digest: str) -> bool:
        if not self.remote:
            return Path(self.name(digest)).is_file()
        try:
            self.client().head_object(Bucket=self._uri(digest).bucket, Key=self._uri(digest).key)
            return True
        except Exception as exc:  # noqa: BLE001 - an outage must not read as "absent": it is raised
            error = storage.storage_error(exc, f"cannot read {self.name(digest)}")
            if isinstance(error, storage.StorageUnavailable):
                raise error from exc
            return False

    def put(self, digest: str, blob: bytes) -> bool:
        """Store a blob under its digest unless an intact one is there; True when this call wrote it."""
        if not self.remote:
            path = Path(self.name(digest))
            if path.is_file() and storage.sha256_file(path) == digest:
                os.utime(path)  # in use again: gc's grace counts from now
                return False
            storage.atomic_write_bytes(path, blob)  # absent, or damaged: the right bytes replace it
            return True
        if self.has(digest):
            return False
        uri = self._uri(digest)
        try:
            self.client().put_object(Bucket=uri.bucket, Key=uri.key, Body=blob)
        except Exception as exc:
            raise storage.storage_error(exc, f"cannot write {uri}") from exc
        return True

    def listing(self) -> list[tuple[str, int, float]]:
        """(digest, size, age in seconds) of every blob."""
        now = time.time()
        if not self.remote:
            folder = Path(self.root) / FOLDER
            files = sorted(folder.glob("??/*.safetensors")) if folder.is_dir() else []
            return [(p.name.removesuffix(".safetensors"), p.stat().st_size, now - p.stat().st_mtime) for p in files]
        prefix = storage.S3Uri.parse(f"{self.root}/{FOLDER}").as_prefix()
        out = []
        try:
            for page in (
                self.client().get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key)
            ):
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if name.endswith(".safetensors"):
                        age = now - obj["LastModified"].timestamp()
                        out.append((name.removesuffix(".safetensors"), int(obj["Size"]), age))
        except Exception as exc:
            raise storage.storage_error(exc, f"cannot list {prefix}") from exc
        return sorted(out)

    def delete(self, digest: str) -> None:
        if not self.remote:
            Path(self.name(digest)).unlink(missing_ok=True)
            return
        uri = self._uri(digest)
        try:
            self.client().delete_object(Bucket=uri.bucket, Key=uri.key)
        except Exception as exc:
            raise storage.storage_error(exc, f"cannot delete {uri}") from exc


def candidates(*stores: BlobStore | None, recorded: str | None = None) -> list[BlobStore]:
    """Where to look for a blob, in order: ``$CLIPLOOP_TENSOR_STORE``, the caller's stores, the store the manifest
    says it was written to. Any of them will do: a blob is taken only if its bytes have its digest."""
    out: list[BlobStore] = []
    s3 = next((s._s3 for s in stores if s is not None), None)
    for store in [BlobStore(os.environ[ENV], s3) if os.environ.get(ENV) else None, *stores]:
        if store is not None and store.root not in {o.root for o in out}:
            out.append(store)
    if recorded and recorded not in {o.root for o in out}:
        out.append(BlobStore(recorded, s3))
    return out


def fetch_blob(digest: str, stores: list[BlobStore]) -> bytes:
    """The blob from the first store that holds it, checked against its digest."""
    for store in stores:
        blob = store.get(digest)
        if blob is None:
            continue
        found = storage.sha256_bytes(blob)
        if found != digest:
            raise TensorStoreError(
                f"tensor blob {store.name(digest)} has sha256 {found}: changed or planted, nothing was loaded"
            )
        return blob
    where = ", ".join(s.root for s in stores) or "no store"
    raise TensorStoreError(
        f"tensor blob {digest} is in none of: {where} (set {ENV} to the artifact store that holds it)"
    )


def collect(store: BlobStore, keep: set[str], delete: bool, grace_s: float = GRACE_S) -> dict[str, Any]:
    """Blobs no manifest in ``keep`` names and older than ``grace_s``; with ``delete``, removed. The same
    summary as ``cliploop gc`` prints for each DVC store."""
    blobs = store.listing()
    unused = [(d, size) for d, size, age in blobs if d not in keep and age >= grace_s]
    if delete:
        for digest, _ in unused:
            store.delete(digest)
    return {
        "store": f"{store.root}/{FOLDER}",
        "objects": len(blobs),
        "unused": len(unused),
        "bytes": sum(size for _, size in unused),
        "removed": len(unused) if delete else 0,
    }
