"""Step outputs under content-keyed prefixes of an artifact store: a folder or an ``s3://`` prefix.

A step's outputs (a pool, a trained state with its evaluation) live at ``<root>/<kind>/<key>/``. Publishing
uploads every file, then a ``manifest.json`` of their SHA-256s and sizes, then ``result.json`` last: an
object store has no rename, so the presence of ``result.json`` is the completion marker, and a reader never
trusts a prefix without it. Fetching downloads a completed prefix into a local content-keyed cache and checks
every file against the manifest (a mismatch names the object; retrying would read the same bytes). A folder
root keeps today's layout: the step writes its folder in place and publishing only adds the markers.

A step publishes as an *attempt* that owns its key (``components/support/fencing.py``): its files go where no reader
looks (``<key>/attempts/<id>/`` under an object store, ``.<key>.<id>/`` beside the folder), every write is checked
against the key's owner log first, and the step becomes complete by the one write a superseded attempt cannot
make (the log's ``done`` record); only then do ``result.json`` (naming the attempt) or the folder appear.

This is what lets a GPU step run on a worker that shares nothing with the orchestrator but object storage.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from components.support import fencing, storage
from components.support.faults import fault_point

RESULT = "result.json"
MANIFEST = "manifest.json"
ATTEMPTS = "attempts"  # under an object store's key: each attempt's files, read only once its result names it


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

    # ---- owners of step keys ------------------------------------------------------------------------------

    def owners(self, kind: str, key: str) -> fencing.OwnerLog:
        """The owner log of ``kind/key`` (``owners/<kind>/<key>/``): which attempt may write under the key."""
        if self.remote:
            return fencing.S3Log(self._s3_client(), storage.S3Uri.parse(f"{self.root}/{fencing.OWNERS}/{kind}/{key}"))
        return fencing.FolderLog(Path(self.root) / fencing.OWNERS / kind / key)

    def claim(self, kind: str, key: str) -> fencing.Attempt | None:
        """A new attempt of ``kind/key`` as the key's owner, superseding any earlier one; None when the step is
        complete (a completion whose publishing was cut short is finished here first)."""
        held = fencing.claim(self.owners(kind, key), f"{kind}/{key}")
        if isinstance(held, fencing.Attempt):
            return held
        self._settle(kind, key, held)
        return None

    def hold(self, kind: str, key: str, attempt_id: str) -> fencing.Attempt | None:
        """The attempt a worker was handed, still the owner (else :class:`fencing.Superseded`); None when it
        completed the step already."""
        held = fencing.hold(self.owners(kind, key), f"{kind}/{key}", attempt_id)
        if isinstance(held, fencing.Attempt):
            return held
        self._settle(kind, key, held)
        return None

    # ---- writing -------------------------------------------------------------------------------------------

    def staging(self, kind: str, key: str, attempt: fencing.Attempt | None = None) -> Path:
        """Where a step writes its outputs before :meth:`publish`: the final folder itself for a folder root
        written without an attempt, else a folder of the attempt's own that no reader looks into."""
        if self.remote:
            return self.cache / "staging" / kind / f"{key}.{attempt.id if attempt else os.getpid()}"
        if attempt is not None:
            return Path(self.root) / kind / f".{key}.{attempt.id}"
        return Path(self.root) / kind / key

    def publish(
        self, folder: Path, kind: str, key: str, result: dict[str, Any], attempt: fencing.Attempt | None = None
    ) -> str:
        """Make ``folder`` the completed outputs of ``kind/key``: files, manifest, then ``result.json`` last.

        With an ``attempt`` (``folder`` is its :meth:`staging`), every write is fenced: a superseded attempt
        stops with :class:`fencing.Superseded` and leaves nothing behind, even one superseded after its last
        check (its ``done`` record cannot be created, and its files were never where readers look)."""
        folder = Path(folder)
        markers = {folder / RESULT, folder / MANIFEST}  # the store's own, at the top only
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p not in markers)
        manifest = {
            p.relative_to(folder).as_posix(): {"sha256": storage.sha256_file(p), "size": p.stat().st_size}
            for p in files
        }
        if attempt is not None:
            result = result | {"attempt": attempt.id}
        text = json.dumps(result, indent=2, default=str)
        if not self.remote:
            storage.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            storage.atomic_write_text(folder / RESULT, text)
            if attempt is not None:  # the attempt's own folder: it becomes the key's folder once complete
                self._finish(attempt, json.loads(text), lambda: shutil.rmtree(folder, ignore_errors=True))
                self._settle_folder(kind, key, attempt.id)
            return self.uri(kind, key)
        prefix = storage.S3Uri.parse(self.uri(kind, key))
        files_at = prefix.join(ATTEMPTS, attempt.id) if attempt is not None else prefix
        client = self._s3_client()
        try:
            for rel in manifest:
                if attempt is not None:
                    attempt.check()
                self._put(client, files_at.join(rel), (folder / rel).read_bytes())
            if attempt is not None:
                attempt.check()
            self._put(client, files_at.join(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        except fencing.Superseded:
            self._remove_prefix(files_at)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if attempt is not None:
            self._finish(attempt, json.loads(text), lambda: self._remove_prefix(files_at))
        self._put(client, prefix.join(RESULT), text.encode())
        shutil.rmtree(folder, ignore_errors=True)
        return self.uri(kind, key)

    def _finish(self, attempt: fencing.Attempt, result: dict[str, Any], discard) -> None:
        """The attempt's ``done`` record: the step is complete, by this attempt alone. A superseded attempt's
        files are discarded (``discard``): written where no reader looks, they would only take space."""
        fault_point("before_result_flip")
        try:
            attempt.finish(result, "nothing published (its unpublished files were removed)")
        except fencing.Superseded:
            discard()
            raise

    def _settle(self, kind: str, key: str, done: dict[str, Any]) -> None:
        """Finish publishing a step whose ``done`` record exists: its result in place (idempotent)."""
        if not self.remote:
            self._settle_folder(kind, key, done["attempt"])
        elif self.result(kind, key) is None:
            text = json.dumps(done["result"], indent=2, default=str)  # the bytes its attempt would have written
            self._put(self._s3_client(), storage.S3Uri.parse(self.uri(kind, key)).join(RESULT), text.encode())

    def _settle_folder(self, kind: str, key: str, attempt_id: str) -> None:
        """Move the completed attempt's folder to the key's place (whoever gets there first; a left-over
        folder without ``result.json`` there, from a crash of older code, is set aside first)."""
        final = Path(self.root) / kind / key
        private = final.with_name(f".{key}.{attempt_id}")
        for _ in range(8):
            if (final / RESULT).is_file():
                return
            _set_aside_unfinished(final)
            try:
                os.rename(private, final)
            except OSError:  # moved by another process finishing it, or a folder reappeared there: look again
                continue
        if not (final / RESULT).is_file():
            raise IncompleteArtifact(f"{final}: attempt {attempt_id} completed it but its folder {private} is gone")

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
        files_at = _files_prefix(prefix, json.loads(result))
        manifest = json.loads(storage.get_bytes(files_at.join(MANIFEST), client, max_bytes=64 << 20))
        tmp = folder.with_name(f".{key}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, expected in sorted(manifest.items()):
                _check_relpath(rel)
                data = storage.get_bytes(files_at.join(rel), client)
                if storage.sha256_bytes(data) != expected["sha256"]:
                    raise IncompleteArtifact(
                        f"{files_at.join(rel)} does not match the manifest of {prefix} (damaged or replaced)"
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

    def push_checkpoint(self, key: str, folder: Path, attempt: fencing.Attempt | None = None) -> None:
        """Mirror a checkpoint just saved in ``folder`` (``<checkpoints>/<task_id>``) to ``checkpoints/<key>/``:
        the tensors, then ``checkpoint.json`` with their SHA-256, last, each only while ``attempt`` owns the
        run's key. Nothing to do for a folder root."""
        if not self.remote:
            return
        tensors = (Path(folder) / self.CHECKPOINT_FILES[0]).read_bytes()
        meta = json.loads((Path(folder) / self.CHECKPOINT_FILES[1]).read_text())
        meta["tensors_sha256"] = storage.sha256_bytes(tensors)
        prefix = storage.S3Uri.parse(self.uri("checkpoints", key)).join(Path(folder).name)
        client = self._s3_client()
        for name, data in ((self.CHECKPOINT_FILES[0], tensors), (self.CHECKPOINT_FILES[1], _json_bytes(meta))):
            if attempt is not None:
                attempt.check()
            self._put(client, prefix.join(name), data)

    def pull_checkpoints(self, key: str, folder: Path, attempt: fencing.Attempt | None = None) -> list[str]:
        """Copy the checkpoints of ``checkpoints/<key>/`` that are further on than this machine's into
        ``folder`` (a step that died on another worker resumes here), while ``attempt`` owns the run's key;
        returns the task ids copied."""
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
            if attempt is not None:
                attempt.check()
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

    def _remove_prefix(self, prefix: storage.S3Uri) -> None:
        """Best effort: what is left costs storage, never correctness (no reader looks there)."""
        client = self._s3_client()
        try:
            for object_key, _ in list(storage.list_keys(prefix.as_prefix(), client)):
                client.delete_object(Bucket=prefix.bucket, Key=object_key)
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _put(client, uri: storage.S3Uri, data: bytes) -> None:
        try:
            client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data)
        except Exception as exc:  # resets, 5xx and refusals: the caller's retry policy decides
            raise storage.storage_error(exc, f"cannot write {uri}") from exc


def _json_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def _files_prefix(prefix: storage.S3Uri, result: dict[str, Any]) -> storage.S3Uri:
    """Where a completed step's files are: its attempt's prefix when its result names one (else the key's own,
    as published without an attempt)."""
    attempt = result.get("attempt")
    if attempt is None:
        return prefix
    if not isinstance(attempt, str) or not fencing.ATTEMPT_ID.match(attempt):
        raise IncompleteArtifact(f"{prefix}/{RESULT} names no valid attempt ({attempt!r})")
    return prefix.join(ATTEMPTS, attempt)


def _set_aside_unfinished(final: Path) -> None:
    """A folder at a key's place without ``result.json`` is no step's result: moved aside (one rename), removed.
    If a completed folder took its place meanwhile, that one is what was moved: it is put back."""
    if not final.exists() or (final / RESULT).is_file():
        return
    aside = final.with_name(f".{final.name}.unfinished.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return
    if (aside / RESULT).is_file():
        os.rename(aside, final)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _check_relpath(rel: str) -> None:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise IncompleteArtifact(f"manifest entry {rel!r} leaves its prefix")
