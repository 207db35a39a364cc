"""A task's images packed into a few plain tar files, read back by offset.

Why shards: DVC pushes and pulls of many small files are slow at scale, and a few large files read
sequentially feed an encoder far faster than one open() per image. Tar keeps the shards inspectable
with standard tools. Members are named by content digest, so an image listed twice is stored once.
Headers carry no time, owner or mode information, so the same images give byte-identical shards,
and re-ingesting the same task reproduces the same DVC hash.

Shards are never extracted (``extractall`` on outside data is unsafe): a reader seeks to the offset
recorded in the task's index and reads exactly ``size`` bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

SHARD_PATTERN = "shard-{:05d}.tar"


class CorruptShard(IOError):
    """Stored bytes that do not match the digest the index recorded for them (bit rot, a bad copy, tampering)."""


@dataclass(frozen=True)
class Located:
    shard: str
    offset: int
    size: int


class ShardWriter:
    """Append images to shards of about ``target_bytes`` each; ``close()`` returns where each digest lives."""

    def __init__(self, folder: Path, target_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.target_bytes = target_bytes
        self._index = 0
        self._tar: tarfile.TarFile | None = None
        self._written = 0
        self._members: dict[str, str] = {}  # member name -> shard file name
        self._names: list[str] = []

    def _open_next(self) -> None:
        self._finish_current()
        name = SHARD_PATTERN.format(self._index)
        self._index += 1
        self._tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
        self._written = 0
        self._names.append(name)

    def _finish_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            path = self.folder / self._names[-1]
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            self._tar = None

    def add(self, sha256: str, suffix: str, data: bytes) -> str:
        """Store ``data`` (whose digest is ``sha256``) once; returns the member name."""
        member = f"{sha256}{suffix}"
        if member in self._members:
            return member
        if self._tar is None or (self._written and self._written + len(data) > self.target_bytes):
            self._open_next()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self._written += len(data)
        self._members[member] = self._names[-1]
        return member

    def close(self) -> dict[str, Located]:
        """Finish the last shard and return ``member name -> (shard, offset, size)``."""
        self._finish_current()
        located: dict[str, Located] = {}
        for name in self._names:
            with tarfile.open(self.folder / name, "r") as tar:
                for info in tar.getmembers():
                    located[info.name] = Located(name, info.offset_data, info.size)
        return located


class ShardReader:
    """Random access to shard members by (shard, offset, size); keeps file handles open."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def read(self, where: Located, expected_sha256: str | None = None) -> bytes:
        if self._pid != os.getpid():
            # A forked DataLoader worker must not share the parent's file offsets: reopen here.
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(where.shard)
        if handle is None:
            handle = open(self.folder / where.shard, "rb")
            self._handles[where.shard] = handle
        handle.seek(where.offset)
        data = handle.read(where.size)
        if len(data) != where.size:
            raise CorruptShard(f"{where.shard}: short read at offset {where.offset} (the shard is truncated)")
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise CorruptShard(
                f"{where.shard}: content at offset {where.offset} does not match its sha256 (corrupt shard)"
            )
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- a stored task: index.csv + shards ---------------------------------------------------------------

INDEX_COLUMNS = ("path", "label", "split", "domain", "sha256", "shard", "offset", "size", "format", "width", "height")


def write_index(path: Path, rows: list[dict]) -> None:
    """index.csv: one row per manifest row, with where its bytes live."""
    import csv

    from components.support.storage import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in INDEX_COLUMNS})
    atomic_write_text(path, buf.getvalue())


# Parsed index files, by resolved path: (inode, size, mtime) of the file parsed, and its rows. A step loads
# every learned task again, and a process running several steps would otherwise parse each index.csv (0.5 s
# per 50k rows) once per step. Index files are replaced atomically, never edited, so a changed file has a
# new inode or size or mtime and is parsed afresh.
_INDEX_CACHE: OrderedDict[str, tuple[tuple[int, int, int], list[dict]]] = OrderedDict()
INDEX_CACHE_ROWS = 2_000_000  # kept rows in all (about 1 kB each), least recently read dropped first
_INDEX_LOCK = threading.Lock()


def read_index(path: Path) -> list[dict]:
    """The rows of an index.csv, parsed once per process while the file is unchanged. The row dicts are
    shared between callers: read them, never change them."""
    path = Path(path).resolve()
    stat = path.stat()
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _INDEX_LOCK:  # steps may load tasks from several threads
        hit = _INDEX_CACHE.get(str(path))
        if hit is not None and hit[0] == signature:
            _INDEX_CACHE.move_to_end(str(path))
            return list(hit[1])
    rows = _parse_index(path)
    with _INDEX_LOCK:
        _INDEX_CACHE[str(path)] = (signature, rows)
        _INDEX_CACHE.move_to_end(str(path))
        while len(_INDEX_CACHE) > 1 and sum(len(r) for _, r in _INDEX_CACHE.values()) > INDEX_CACHE_ROWS:
            _INDEX_CACHE.popitem(last=False)
    return list(rows)


def _parse_index(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["offset"], row["size"] = int(row["offset"]), int(row["size"])
        row["domain"] = row["domain"] or None
    return rows


class StoredTask:
    """A task as stored in the workspace (``data/tasks/<id>/``), readable like a drop.

    Implements the ``DropSource`` protocol, so a stored task can be re-validated exactly as a drop is.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.folder_name = self.folder.name
        self.rows = read_index(self.folder / "index.csv")
        self._by_path = {row["path"]: row for row in self.rows}
        self._reader = ShardReader(self.folder / "shards")

    def read(self, relpath: str, max_bytes: int) -> bytes:
        if relpath in ("task.yaml", "manifest.csv"):
            return (self.folder / relpath).read_bytes()
        row = self._by_path.get(relpath)
        if row is None:
            raise FileNotFoundError(relpath)
        if row["size"] > max_bytes:
            raise OSError(f"{row['size']} bytes, over the limit of {max_bytes}")
        return self._reader.read(Located(row["shard"], row["offset"], row["size"]), expected_sha256=row["sha256"])

    def read_row(self, row: dict) -> bytes:
        """One image's bytes, checked against the index's SHA-256 (hashing costs a fraction of decoding;
        ``benchmarks/shard_read.py`` measures it): a flipped bit stops the step, it is never trained on."""
        try:
            return self._reader.read(Located(row["shard"], row["offset"], row["size"]), expected_sha256=row["sha256"])
        except CorruptShard as exc:
            raise CorruptShard(
                f"task {self.folder.name}: shards/{row['shard']}, row {row['path']!r} "
                f"({row['size']} bytes at offset {row['offset']}) does not match the SHA-256 in "
                f"index.csv: the stored data is damaged ({exc}). Restore it with `dvc pull` or "
                f"`dvc checkout` in the workspace, or re-ingest the task."
            ) from None

    def exists(self, relpath: str) -> bool:
        return relpath in ("task.yaml", "manifest.csv") or relpath in self._by_path

    def list_files(self) -> list[str]:
        return ["manifest.csv", "task.yaml", *sorted(self._by_path)]

    def close(self) -> None:
        self._reader.close()
