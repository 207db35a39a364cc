"""A stored task fetched by its content address from the DVC remote, for a worker that shares nothing with the
orchestrator but object storage.

The orchestrator (the only process that reads DVC metadata and the ledger) resolves a task to a
:class:`TaskAddress`: DVC's hash of the task's folder, the list of ``{relpath, md5}`` it stands for, and the DVC
remote (a folder or an ``s3://`` URI). A worker calls :func:`fetch_task`: every file is read from the remote by its
md5 (DVC 3 keeps it at ``files/md5/<first 2 hex>/<other 30>``), its bytes are hashed before they are used, and a
mismatch is an error naming the object and the file (a retry would read the same bad bytes). Files land in a
content-keyed folder of a local cache, laid out as the task was stored, and the folder is renamed into place
last, so a folder that exists is complete; a second fetch of the same address does no work.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from components.intake.versioning import dir_md5
from components.support import storage


class CorruptObject(storage.StorageError):
    """An object of the DVC remote whose bytes do not hash to its name: damaged or replaced in the store."""


class BadAddress(ValueError):
    """A task address that contradicts itself (its file list does not hash to its md5) or escapes its folder."""


@dataclass(frozen=True)
class TaskAddress:
    task_id: str
    md5: str  # DVC's hash of data/tasks/<task_id> (see versioning.dir_md5)
    files: tuple[dict[str, str], ...]  # {"relpath", "md5"}, as DVC lists them
    remote: str  # the DVC remote: a folder or an s3:// URI

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"files": [dict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TaskAddress:
        return cls(doc["task_id"], doc["md5"], tuple(dict(f) for f in doc["files"]), doc["remote"])

    def object_path(self, md5: str) -> str:
        return f"files/md5/{md5[:2]}/{md5[2:]}"


def address_of(
    ws: Path, task_id: str, md5: str, remote: str, entries: list[dict[str, str]] | None = None
) -> TaskAddress:
    """The orchestrator's side: a stored task's address, from the workspace's DVC cache listing (or the
    task's ``entries`` already read from it)."""
    from components.intake.versioning import task_entries

    files = tuple(sorted(task_entries(ws, task_id) if entries is None else entries, key=lambda e: e["relpath"]))
    return TaskAddress(task_id, md5, files, remote)


def fetch_task(address: TaskAddress, cache_root: Path, s3: storage.S3Settings | None = None) -> Path:
    """The task's folder under ``cache_root/tasks/<md5>``, fetched from the remote and checked file by file."""
    _check(address)
    folder = Path(cache_root) / "tasks" / address.md5
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{address.md5}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    read = _reader(address.remote, s3)
    try:
        for entry in address.files:
            target = tmp / entry["relpath"]
            target.parent.mkdir(parents=True, exist_ok=True)
            data = read(address.object_path(entry["md5"]))
            actual = hashlib.md5(data).hexdigest()
            if actual != entry["md5"]:
                raise CorruptObject(
                    f"DVC remote object {address.remote.rstrip('/')}/{address.object_path(entry['md5'])} "
                    f"(task {address.task_id}, {entry['relpath']}) hashes to {actual}: damaged or replaced in the "
                    "store; restore it from the workspace with `dvc push`"
                )
            target.write_bytes(data)
            target.chmod(0o444)
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker finished the same address first: its folder is as good
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check(address: TaskAddress) -> None:
    if dir_md5([dict(f) for f in address.files]) != address.md5:
        raise BadAddress(f"task {address.task_id}: its file list does not hash to {address.md5}")
    for entry in address.files:
        rel = PurePosixPath(entry["relpath"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BadAddress(f"task {address.task_id}: file path {entry['relpath']!r} leaves the task's folder")


def _reader(remote: str, s3: storage.S3Settings | None):
    """bytes of a remote object by its path inside the remote (``files/md5/..``)."""
    if storage.is_s3(remote):
        base = storage.S3Uri.parse(remote).as_prefix()
        client = storage.s3_client(s3)
        return lambda rel: storage.get_bytes(base.join(rel), client)
    root = Path(remote)

    def local(rel: str) -> bytes:
        try:
            return (root / rel).read_bytes()
        except FileNotFoundError as exc:
            raise storage.StorageError(f"DVC remote {root} has no object {rel} (was the task pushed?)") from exc

    return local


def fetched(address: dict, s3) -> str:
    """The folder of a task handed by its content address: fetched into this machine's cache, every file's md5
    checked (``task_fetch.fetch_task``)."""
    return str(fetch_task(TaskAddress.from_dict(address), storage.cache_dir() / "dvc", s3))
