"""Where Ray Train keeps a data-parallel training's checkpoints (``compute.train_storage``), and taking the latest of
them back for a step that trains again, with any number of workers.

A training's place is named after the step's own checkpoint folder (``checkpoints/<run key>``, one per run key), so
two steps never share one, and a step run again after its process died finds its own: Ray Train resumes a run of
the same name and place from its last checkpoint by itself, and :func:`adopt_latest` copies that checkpoint beside
the step's own, where one process (``compute.train_workers: 1``) resumes from it too. Checkpoints are the trainer's
files (components/training/callbacks.py), the same whatever the number of workers.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.settings.config import Config

FILES = ("checkpoint.json", "checkpoint.safetensors")


@dataclass(frozen=True)
class TrainPlace:
    storage: str  # Ray Train's storage_path (a local folder, or bucket/prefix on ``filesystem``)
    name: str  # the run's folder in it
    filesystem: Any = None  # a pyarrow S3 filesystem for s3://, None for a local folder

    @property
    def run(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def place_of(config: Config, checkpoint_dir: Path | None, task_id: str) -> TrainPlace:
    """The configured storage (s3:// through pyarrow at ``s3.endpoint_url``; a folder), else ``ray-train/`` in the
    step's checkpoint folder; a training with no checkpoint folder gets a name of its own (nothing to resume)."""
    key = Path(checkpoint_dir).name if checkpoint_dir is not None else f"once-{uuid.uuid4().hex[:12]}"
    configured = config.compute.train_storage
    if configured and configured.startswith("s3://"):
        return TrainPlace(configured[len("s3://") :].rstrip("/"), f"{key}-{task_id}", _s3(config))
    if configured:
        return TrainPlace(str(config.path(configured)), f"{key}-{task_id}")
    if checkpoint_dir is None:
        raise ValueError("a training without compute.train_storage needs a checkpoint folder")
    return TrainPlace(str((Path(checkpoint_dir) / "ray-train").resolve()), f"train-{task_id}")


def _s3(config: Config):
    from pyarrow import fs

    s3 = config.s3
    kwargs: dict[str, Any] = {"region": s3.region or "us-east-1"}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        kwargs |= {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return fs.S3FileSystem(**kwargs)


def _filesystem(place: TrainPlace):
    from pyarrow import fs

    return place.filesystem or fs.LocalFileSystem()


def latest(place: TrainPlace) -> tuple[str, int] | None:
    """The run's checkpoint folder that resumes furthest, and its next step; None when it has none."""
    if place.filesystem is None and not Path(place.run).is_dir():
        return None  # the common case, every step of one process: no need to load pyarrow to say so
    from pyarrow import fs

    filesystem = _filesystem(place)
    info = filesystem.get_file_info(place.run)
    if info.type != fs.FileType.Directory:
        return None
    best = None
    for entry in filesystem.get_file_info(fs.FileSelector(place.run)):
        if entry.type != fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        meta = f"{entry.path}/checkpoint.json"
        if filesystem.get_file_info(meta).type != fs.FileType.File:
            continue  # the learned state, or a checkpoint whose upload did not finish
        with filesystem.open_input_stream(meta) as stream:
            step = int(json.loads(stream.read())["next_step"])
        if best is None or step > best[1]:
            best = (entry.path, step)
    return best


def adopt_latest(place: TrainPlace, folder: Path) -> int:
    """Copy the run's furthest checkpoint into ``folder`` (the step's own, for ``task``) when it resumes further than
    what is there; returns the step the folder now resumes from (0: none)."""
    here = folder / "checkpoint.json"
    mine = int(json.loads(here.read_text())["next_step"]) if here.is_file() else 0
    found = latest(place)
    if found is None or found[1] <= mine:
        return mine
    filesystem = _filesystem(place)
    folder.mkdir(parents=True, exist_ok=True)
    for name in reversed(FILES):  # the tensors first: a folder with the JSON is complete
        tmp = folder / f".{name}.adopting"
        with filesystem.open_input_stream(f"{found[0]}/{name}") as stream:
            tmp.write_bytes(stream.read())
        tmp.replace(folder / name)
    return found[1]


def remove(place: TrainPlace) -> None:
    """The run's checkpoints, once the step no longer needs them (its result is in; they hold whole models)."""
    filesystem = _filesystem(place)
    try:
        filesystem.delete_dir(place.run)
    except (FileNotFoundError, OSError):
        pass
