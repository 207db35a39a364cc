"""A task's images as torch datasets, read from a stored task (shards) or straight from a drop.

Decoding and preprocessing happen in DataLoader workers; samples keep the manifest's order, so
anything computed from a task (its LVP pool above all) is the same whichever process builds it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from components.shards import StoredTask
from components.tasks import DropSource, normalise_class_name, open_drop, parse_manifest, parse_task_yaml


def class_key(dataset: str, name: str) -> str:
    """A class's identity across tasks: its dataset and normalised name."""
    return f"{dataset}/{normalise_class_name(name)}"


@dataclass
class TaskData:
    task_id: str
    scenario: str
    dataset: str
    domain: str | None
    class_keys: list[str]
    class_names: list[str]
    source: Any  # StoredTask or a DropSource
    train: list[tuple[Any, int]] = field(default_factory=list)  # (reference to the image, class index)
    test: list[tuple[Any, int]] = field(default_factory=list)
    location: str = ""
    prompts: list[str] | None = None  # the dataset's own prompt templates, from task.yaml

    def split(self, name: str) -> list[tuple[Any, int]]:
        return {"train": self.train, "test": self.test}[name]

    def dataset_for(self, split: str, transform: Callable) -> ImageDataset:
        return ImageDataset(self.source, self.split(split), transform)

    def summary(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "scenario": self.scenario,
            "dataset": self.dataset,
            "domain": self.domain,
            "classes": self.class_keys,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "location": self.location,
        }


def load_task(location: str | Path, source: DropSource | None = None) -> TaskData:
    """Read a stored task folder (``data/tasks/<id>``, with index.csv) or a task drop."""
    location = str(location)
    if source is None:
        if (Path(location) / "index.csv").is_file():
            source = StoredTask(Path(location))
        else:
            source = open_drop(location)
    spec = parse_task_yaml(source.read("task.yaml", 64 << 20))
    keys = [class_key(spec.dataset, c.name) for c in spec.classes]
    by_name = {c.name: i for i, c in enumerate(spec.classes)}
    data = TaskData(
        spec.task_id,
        spec.scenario,
        spec.dataset,
        spec.domain,
        keys,
        spec.class_names,
        source,
        location=location,
        prompts=spec.prompts,
    )
    if isinstance(source, StoredTask):
        rows = [(row, row["label"], row["split"]) for row in source.rows]
    else:
        manifest = parse_manifest(source.read("manifest.csv", 64 << 20))
        rows = [(r.path, r.label, r.split) for r in manifest.rows]
    for ref, label, split in rows:
        if label not in by_name or split not in ("train", "test"):
            raise ValueError(f"{location}: row {ref!r} has label {label!r} / split {split!r}; validate the task first")
        data.split(split).append((ref, by_name[label]))
    return data


def decode_rgb(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ImageDataset(Dataset):
    def __init__(self, source: Any, items: list[tuple[Any, int]], transform: Callable):
        self.source, self.items, self.transform = source, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def read_bytes(self, index: int) -> bytes:
        ref, _ = self.items[index]
        if isinstance(self.source, StoredTask):
            return self.source.read_row(ref)
        return self.source.read(ref, 1 << 30)

    def __getitem__(self, index: int):
        return self.transform(decode_rgb(self.read_bytes(index))), self.items[index][1]


def make_loader(
    dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
    )
