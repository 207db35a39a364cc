"""The task drop format: ``task.yaml`` + ``manifest.csv`` + images, in a folder or under an ``s3://`` prefix.

```
<task_id>/
  task.yaml       task_id, scenario (class-incremental | domain-incremental), dataset, domain?, classes
  manifest.csv    path,label,split[,domain]   (paths relative to the task root; split train | test)
  <images>        JPEG / PNG / WebP
```
A drop is read through a :class:`DropSource`, so validation and ingestion never care where it lives.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components.intake.class_names import SAME_NAME, confusable_key, name_problem, shown
from components.settings.config_loading import yaml_problem
from components.support import storage

TASK_ID_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
TASK_ID_RE = re.compile(rf"^{TASK_ID_PATTERN}$")
REQUIRED_COLUMNS = ("path", "label", "split")
OPTIONAL_COLUMNS = ("domain",)
SPLITS = ("train", "test")
SCENARIOS = ("class-incremental", "domain-incremental")
MAX_TEXT_BYTES = 64 * 1024 * 1024  # task.yaml / manifest.csv larger than this are refused unread


class DropError(ValueError):
    """The drop cannot be read as a task at all (missing or malformed task.yaml / manifest.csv)."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("class name is empty")
        problem = name_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class TaskSpec(BaseModel):
    """The parsed ``task.yaml``."""

    model_config = ConfigDict(extra="forbid")
    task_id: str
    scenario: Literal["class-incremental", "domain-incremental"]
    dataset: str = Field(min_length=1, max_length=200)
    domain: str | None = None
    classes: list[ClassSpec] = Field(min_length=1)
    # Optional prompt templates for this dataset's class names ("{}" = the class name), e.g. MTIL's
    # per-dataset CLIP templates; used when evaluation.templates is "task".
    prompts: list[str] | None = None

    @field_validator("prompts")
    @classmethod
    def _templates(cls, value):
        if value is not None:
            if not value:
                raise ValueError("prompts is empty; leave it out to use the configured templates")
            for template in value:
                if template.count("{}") != 1:
                    raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once")
        return value

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, value: str) -> str:
        if not TASK_ID_RE.match(value):
            raise ValueError(f"task_id {value!r} must match {TASK_ID_PATTERN}")
        return value

    @field_validator("classes", mode="before")
    @classmethod
    def _plain_names(cls, value):
        # Classes may be written as plain names or as {name, description} mappings.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[ClassSpec]) -> list[ClassSpec]:
        seen: dict[str, str] = {}
        for cls_ in value:
            key = confusable_key(cls_.name)
            if key in seen:
                earlier = seen[key]
                if normalise_class_name(earlier) == normalise_class_name(cls_.name):
                    raise ValueError(f"class {cls_.name!r} is declared twice (as {earlier!r})")
                raise ValueError(f"classes {shown(earlier)} and {shown(cls_.name)} are {SAME_NAME}")
            seen[key] = cls_.name
        return value

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def normalise_class_name(name: str) -> str:
    """Class identity across tasks: case- and whitespace-insensitive, underscores as spaces."""
    return " ".join(name.replace("_", " ").split()).casefold()


@dataclass(frozen=True, slots=True)  # one per row: no __dict__ each, for manifests of a million rows
class ManifestRow:
    line: int  # line number in manifest.csv (the header is line 1)
    path: str
    label: str
    split: str
    domain: str | None


@dataclass(frozen=True)
class Manifest:
    columns: tuple[str, ...]
    rows: tuple[ManifestRow, ...]

    @property
    def missing_columns(self) -> list[str]:
        return [c for c in REQUIRED_COLUMNS if c not in self.columns]

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]


def parse_task_yaml(data: bytes, where: str = "task.yaml") -> TaskSpec:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DropError("task-yaml-readable", f"{where}: not UTF-8 text ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DropError("task-yaml-readable", yaml_problem(where, text, exc)) from None
    if not isinstance(raw, dict):
        raise DropError(
            "task-yaml-schema", f"{where}: the top level must be a mapping (task_id, scenario, dataset, classes)"
        )
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'task.yaml'}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        )
        raise DropError("task-yaml-schema", f"{where}: {problems}") from None


def parse_manifest(data: bytes, where: str = "manifest.csv") -> Manifest:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DropError("manifest-readable", f"{where}: not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DropError(
            "manifest-readable", f"{where}: the file is empty (expected a header path,label,split[,domain])"
        ) from None
    except csv.Error as exc:
        raise DropError("manifest-readable", f"{where}: line 1: {exc}") from None
    columns = tuple(h.strip() for h in header)
    index = {name: i for i, name in enumerate(columns)}
    rows: list[ManifestRow] = []
    # Labels, splits and domains repeat on every row: one string object per distinct value, not one per row.
    shared: dict[str, str] = {}

    def one(value: str | None) -> str | None:
        return shared.setdefault(value, value) if value else value

    try:
        for record in reader:
            line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue  # blank lines carry nothing

            def cell(name: str, record: list[str] = record) -> str | None:
                i = index.get(name)
                if i is None or i >= len(record):
                    return None
                return record[i].strip()

            rows.append(
                ManifestRow(
                    line=line,
                    path=cell("path") or "",
                    label=one(cell("label")) or "",
                    split=one(cell("split")) or "",
                    domain=one(cell("domain")) or None,
                )
            )
    except csv.Error as exc:
        raise DropError("manifest-readable", f"{where}: line {reader.line_num}: {exc}") from None
    return Manifest(columns=columns, rows=tuple(rows))


def path_problem(relpath: str) -> str | None:
    """Why a manifest path is unsafe, or None. Paths must stay inside the task root."""
    if not relpath:
        return "the path is empty"
    if "\x00" in relpath:
        return "the path contains a NUL byte"
    if relpath.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relpath):
        return "the path is absolute"
    if "\\" in relpath:
        return "the path uses backslashes (use '/')"
    parts = PurePosixPath(relpath).parts
    if any(part == ".." for part in parts):
        return "the path contains '..'"
    if relpath in ("task.yaml", "manifest.csv"):
        return "the path names the task's own metadata file"
    return None


# ---- where a drop lives ------------------------------------------------------------------------------


class DropSource(Protocol):
    location: str  # folder path or s3:// URI, for messages and the ledger
    folder_name: str

    def read(self, relpath: str, max_bytes: int) -> bytes: ...
    def exists(self, relpath: str) -> bool: ...
    def list_files(self) -> list[str]: ...


class LocalDrop:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.location = str(self.root)
        self.folder_name = self.root.name

    def read(self, relpath: str, max_bytes: int) -> bytes:
        # Refuses symlinks anywhere on the path: their target could be outside the task root.
        with storage.open_local_no_follow(self.root, relpath) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise OSError(f"{size} bytes, over the limit of {max_bytes}")
            return fh.read(max_bytes + 1)

    def exists(self, relpath: str) -> bool:
        return os.path.lexists(self.root / relpath)

    def list_files(self) -> list[str]:
        out = []
        for dirpath, _, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            out.extend(str((rel / f).as_posix()) for f in filenames)
        return sorted(p[2:] if p.startswith("./") else p for p in out)


class S3Drop:
    def __init__(self, uri: str, settings: storage.S3Settings | None = None, client=None):
        self.uri = storage.S3Uri.parse(uri).as_prefix()
        self.location = str(self.uri)
        self.folder_name = self.uri.key.rstrip("/").rsplit("/", 1)[-1] or self.uri.bucket
        self.client = client or storage.s3_client(settings)
        self._listing: dict[str, int] | None = None

    def _objects(self) -> dict[str, int]:
        if self._listing is None:
            prefix = self.uri.key
            self._listing = {key[len(prefix) :]: size for key, size in storage.list_keys(self.uri, self.client)}
        return self._listing

    def read(self, relpath: str, max_bytes: int) -> bytes:
        size = self._objects().get(relpath)
        if size is None:
            raise FileNotFoundError(f"no object {self.uri.join(relpath)}")
        if size > max_bytes:
            raise OSError(f"{size} bytes, over the limit of {max_bytes}")
        return storage.get_bytes(self.uri.join(relpath), self.client, max_bytes=max_bytes)

    def exists(self, relpath: str) -> bool:
        return relpath in self._objects()

    def list_files(self) -> list[str]:
        return sorted(k for k in self._objects() if k and not k.endswith("/"))


def open_drop(location: str, settings: storage.S3Settings | None = None) -> DropSource:
    if storage.is_s3(location):
        return S3Drop(location, settings)
    root = Path(location)
    if not root.is_dir():
        raise DropError("drop-exists", f"{location}: not a folder (a task drop is a folder or an s3:// prefix)")
    return LocalDrop(root)


def discover(
    drop_zone: str, settings: storage.S3Settings | None = None, warn: Callable[[str], None] | None = None
) -> list[str]:
    """Locations of the task drops in a drop zone: sub-folders (or sub-prefixes) holding a task.yaml.

    Sorted by name, which is the arrival order when task ids carry a date or a sequence number. A symbolic
    link in a local drop zone is not followed (it could lead anywhere on the machine) and is reported
    through ``warn`` (default: a warning on the ``cliploop`` logger), never skipped silently.
    """
    if storage.is_s3(drop_zone):
        client = storage.s3_client(settings)
        zone = storage.S3Uri.parse(drop_zone).as_prefix()
        found = []
        for name in storage.list_prefixes(zone, client):
            task_prefix = zone.join(name).as_prefix()
            keys = {k for k, _ in storage.list_keys(task_prefix, client)}
            if task_prefix.key + "task.yaml" in keys:
                found.append(str(task_prefix))
        return found
    zone_path = Path(drop_zone)
    if not zone_path.is_dir():
        return []
    found = []
    for p in sorted(zone_path.iterdir()):
        if p.is_symlink():
            (warn or logging.getLogger("cliploop").warning)(
                f"{p}: skipped: a symbolic link in the drop zone is not followed (it may lead outside the zone); "
                "move or copy the task folder into the drop zone"
            )
        elif p.is_dir() and (p / "task.yaml").is_file():
            found.append(str(p))
    return found


def read_metadata(source: DropSource) -> tuple[TaskSpec, Manifest, bytes, bytes]:
    """task.yaml and manifest.csv of a drop, parsed (raises DropError) and raw (for the content digest)."""
    for name in ("task.yaml", "manifest.csv"):
        if not source.exists(name):
            raise DropError(
                f"{name.split('.')[0].replace('_', '-')}-present",
                f"{source.location}: {name} is missing (a task drop holds task.yaml, manifest.csv and images)",
            )
    try:
        spec_bytes = source.read("task.yaml", MAX_TEXT_BYTES)
        manifest_bytes = source.read("manifest.csv", MAX_TEXT_BYTES)
    except storage.StorageUnavailable:  # not a broken drop: the store did not answer (retried, exit 4)
        raise
    except (OSError, PermissionError, storage.StorageError) as exc:
        raise DropError("metadata-readable", f"{source.location}: {exc}") from None
    return parse_task_yaml(spec_bytes), parse_manifest(manifest_bytes), spec_bytes, manifest_bytes


def fallback_task_id(source: DropSource) -> str:
    """The id a drop is reported (and quarantined) under when its task.yaml cannot be read: its folder's name
    when that is a valid task id, else one derived from its location."""
    name = source.folder_name.lower()
    return name if TASK_ID_RE.match(name) else "unidentified-" + storage.sha256_bytes(source.location.encode())[:12]
