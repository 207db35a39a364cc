"""Step outputs under content-keyed prefixes of an artifact store: a folder or an ``s3://`` prefix.

A step's outputs (a pool, a trained state with its evaluation) live at ``<root>/<kind>/<key>/``. Publishing
uploads every file, then a ``manifest.json`` of their SHA-256s and sizes, then ``result.json`` last: an
object store has no rename, so the presence of ``result.json`` is the completion marker, and a reader never
trusts a prefix without it. Fetching downloads a completed prefix into a local content-keyed cache and checks
every file against the manifest (a mismatch names the object; retrying would read the same bytes). A folder
root keeps today's layout: the step writes its folder in place and publishing only adds the markers.

This is what lets a GPU step run on a worker that shares nothing with the orchestrator but object storage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from components import storage

RESULT = "result.json"
MANIFEST = "manifest.json"


class IncompleteArtifact(storage.StorageError):
    """A prefix read as complete (its ``result.json`` exists) whose files do not match its manifest."""


class ArtifactStore:
    def __init__(self, root: str | Path, cache: Path, s3: storage.S3Settings | None = None):
        self.root = str(root).rstrip("/")
        self.cache = Path(cache)
        self._s3 = s3
        self._client = None

    @property
    def remote(self) -> bool:
        return storage.is_s3(self.root)

    def uri(self, kind: str, key: str) -> str:
        return f"{self.root}/{kind}/{key}"

    # ---- writing -------------------------------------------------------------------------------------------

    def staging(self, kind: str, key: str) -> Path:
        """Where a step writes its outputs before :meth:`publish`: the final folder itself for a folder root."""
        if self.remote:
            return self.cache / "staging" / kind / f"{key}.{os.getpid()}"
        return Path(self.root) / kind / key

    def publish(self, folder: Path, kind: str, key: str, result: dict[str, Any]) -> str:
        """Make ``folder`` the completed outputs of ``kind/key``: files, manifest, then ``result.json`` last."""
        folder = Path(folder)
        markers = {folder / RESULT, folder / MANIFEST}  # the store's own, at the top only
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p not in markers)
        manifest = {
            p.relative_to(folder).as_posix(): {"sha256": storage.sha256_file(p), "size": p.stat().st_size}
            for p in files
        }
        text = json.dumps(result, indent=2, default=str)
        if not self.remote:
            storage.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            storage.atomic_write_text(folder / RESULT, text)
            return self.uri(kind, key)
        prefix = storage.S3Uri.parse(self.uri(kind, key))
        client = self._s3_client()
        for rel in manifest:
            self._put(client, prefix.join(rel), (folder / rel).read_bytes())
        self._put(client, prefix.join(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        self._put(client, prefix.join(RESULT), text.encode())
        shutil.rmtree(folder, ignore_errors=True)
        return self.uri(kind, key)

    # ---- reading -------------------------------------------------------------------------------------------

    def result(self, kind: str, key: str) -> dict[str, Any] | None:
        """The completed step's ``result.json``, or None while there is none (absent, or not finished)."""
        if not self.remote:
            path = Path(self.root) / kind / key / RESULT
            return json.loads(path.read_text()) if path.is_file() else None
        uri = storage.S3Uri.parse(self.uri(kind, key)).join(RESULT)
        try:
            return json.loads(storage.get_bytes(uri, self._s3_client(), max_bytes=16 << 20))
        except storage.StorageUnavailable:
            raise  # an unreachable store is not "not done yet"
        except storage.StorageError:
            return None

    def fetch(self, kind: str, key: str) -> Path:
        """A local folder holding the completed outputs of ``kind/key``, every file checked against the manifest."""
        if not self.remote:
            folder = Path(self.root) / kind / key
            if not (folder / RESULT).is_file():
                raise IncompleteArtifact(f"{folder} is not a completed step (no {RESULT})")
            return folder
        folder = self.cache / "fetched" / kind / key
        if (folder / RESULT).is_file():
            return folder
        client = self._s3_client()
        prefix = storage.S3Uri.parse(self.uri(kind, key))
        try:
            result = storage.get_bytes(prefix.join(RESULT), client, max_bytes=16 << 20)
        except storage.StorageUnavailable:
            raise
        except storage.StorageError as exc:
            raise IncompleteArtifact(f"{prefix} is not a completed step (no {RESULT})") from exc
        manifest = json.loads(storage.get_bytes(prefix.join(MANIFEST), client, max_bytes=64 << 20))
        tmp = folder.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, expected in sorted(manifest.items()):
                _check_relpath(rel)
                data = storage.get_bytes(prefix.join(rel), client)
                if storage.sha256_bytes(data) != expected["sha256"]:
                    raise IncompleteArtifact(
                        f"{prefix.join(rel)} does not match the manifest of {prefix} (damaged or replaced)"
                    )
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            (tmp / RESULT).write_bytes(result)  # last: a cached folder with it is complete
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # fetched meanwhile by another process of this machine
                if not (folder / RESULT).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # ---- training checkpoints ------------------------------------------------------------------------------

    CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.json")

    def push_checkpoint(self, key: str, folder: Path) -> None:
        """Mirror a checkpoint just saved in ``folder`` (``<checkpoints>/<task_id>``) to ``checkpoints/<key>/``:
        the tensors, then ``checkpoint.json`` with their SHA-256, last. Nothing to do for a folder root."""
        if not self.remote:
            return
        tensors = (Path(folder) / self.CHECKPOINT_FILES[0]).read_bytes()
        meta = json.loads((Path(folder) / self.CHECKPOINT_FILES[1]).read_text())
        meta["tensors_sha256"] = storage.sha256_bytes(tensors)
        prefix = storage.S3Uri.parse(self.uri("checkpoints", key)).join(Path(folder).name)
        client = self._s3_client()
        self._put(client, prefix.join(self.CHECKPOINT_FILES[0]), tensors)
        self._put(client, prefix.join(self.CHECKPOINT_FILES[1]), json.dumps(meta, indent=2, sort_keys=True).encode())

    def pull_checkpoints(self, key: str, folder: Path) -> list[str]:
        """Copy the checkpoints of ``checkpoints/<key>/`` that are further on than this machine's into
        ``folder`` (a step that died on another worker resumes here); returns the task ids copied."""
        if not self.remote:
            return []
        client = self._s3_client()
        base = storage.S3Uri.parse(self.uri("checkpoints", key)).as_prefix()
        copied = []
        for task_id in storage.list_prefixes(base, client):
            prefix = base.join(task_id)
            try:
                meta = json.loads(storage.get_bytes(prefix.join(self.CHECKPOINT_FILES[1]), client, max_bytes=1 << 20))
            except storage.StorageUnavailable:
                raise
            except storage.StorageError:
                continue  # tensors without their json: a push that died half-way
            here = Path(folder) / task_id
            mine = here / self.CHECKPOINT_FILES[1]
            if mine.is_file() and json.loads(mine.read_text()).get("next_step", 0) >= meta.get("next_step", 0):
                continue
            tensors = storage.get_bytes(prefix.join(self.CHECKPOINT_FILES[0]), client)
            if storage.sha256_bytes(tensors) != meta.get("tensors_sha256"):
                continue  # overwritten by a newer push meanwhile, or damaged: not a checkpoint to resume from
            here.mkdir(parents=True, exist_ok=True)
            storage.atomic_write_bytes(here / self.CHECKPOINT_FILES[0], tensors)
            storage.atomic_write_text(mine, json.dumps(meta, indent=2, sort_keys=True))
            copied.append(task_id)
        return copied

    def drop_checkpoints(self, key: str) -> None:
        """The step is complete: its checkpoints in the store are removed (best effort: they are never reused)."""
        if not self.remote:
            return
        client = self._s3_client()
        base = storage.S3Uri.parse(self.uri("checkpoints", key)).as_prefix()
        try:
            for object_key, _ in list(storage.list_keys(base, client)):
                client.delete_object(Bucket=base.bucket, Key=object_key)
        except Exception:  # noqa: BLE001 - a left-over checkpoint costs storage, not correctness
            pass

    # ---- S3 ------------------------------------------------------------------------------------------------

    def _s3_client(self):
        if self._client is None:
            self._client = storage.s3_client(self._s3)
        return self._client

    @staticmethod
    def _put(client, uri: storage.S3Uri, data: bytes) -> None:
        try:
            client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data)
        except Exception as exc:  # resets, 5xx and refusals: the caller's retry policy decides
            raise storage.storage_error(exc, f"cannot write {uri}") from exc


def _check_relpath(rel: str) -> None:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise IncompleteArtifact(f"manifest entry {rel!r} leaves its prefix")
