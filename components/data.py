"""A task's images as torch datasets, read from a stored task (shards) or straight from a drop.

Decoding and preprocessing happen in DataLoader workers; samples keep the manifest's order, so
anything computed from a task (its LVP pool above all) is the same whichever process builds it.

Decoders (named, because pixels depend on them: the name is part of every pool key and recorded in each pool):

- ``pillow``: Pillow decodes every image at full size;
- ``pillow-draft2x`` (``DECODER``, what cliploop uses): the same, except that a JPEG at least twice the model's
  input size on both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's draft mode), never below the
  input size, before the model's own resize. Decoding and preprocessing such an image for a 224-px model took
  about a third of the time on one core (448 to 2048-px JPEGs), and the embeddings stay within cosine 0.995 of
  full decoding (tests/test_decoding.py); every other image gives the same bytes as ``pillow``.
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

DECODERS = ("pillow", "pillow-draft2x")
DECODER = "pillow-draft2x"  # what a dataset decodes with unless told otherwise; part of every pool key


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

    def dataset_for(self, split: str, transform: Callable, decoder: str = DECODER) -> ImageDataset:
        return ImageDataset(self.source, self.split(split), transform, decoder)

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


def decode_rgb(data: bytes, draft_to: tuple[int, int] | None = None):
    """The image as RGB. ``draft_to`` (width, height): a JPEG at least twice that size on both sides is decoded
    at the largest 1/2, 1/4 or 1/8 scale that keeps it at least that size (Pillow's draft mode); any other image
    is decoded exactly as without it (draft is never called on it)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if draft_to and im.format == "JPEG" and im.width >= 2 * draft_to[0] and im.height >= 2 * draft_to[1]:
            im.draft("RGB", draft_to)
        return im.convert("RGB")


def input_size(transform: Callable) -> tuple[int, int] | None:
    """(width, height) that a transform's first resize or crop asks for (open_clip's Resize, CenterCrop or
    RandomResizedCrop), or None when it has none."""
    for step in getattr(transform, "transforms", [transform]):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) in (1, 2) and all(isinstance(v, int) for v in size):
            return size[-1], size[0]  # torchvision sizes are (height, width)
    return None


class ImageDataset(Dataset):
    def __init__(self, source: Any, items: list[tuple[Any, int]], transform: Callable, decoder: str = DECODER):
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r} (known: {', '.join(DECODERS)})")
        self.source, self.items, self.transform, self.decoder = source, items, transform, decoder
        # Draft mode needs the size the model resizes to; a transform that does not say decodes in full.
        self.draft_to = input_size(transform) if decoder == "pillow-draft2x" else None

    def __len__(self) -> int:
        return len(self.items)

    def read_bytes(self, index: int) -> bytes:
        ref, _ = self.items[index]
        if isinstance(self.source, StoredTask):
            return self.source.read_row(ref)
        return self.source.read(ref, 1 << 30)

    def __getitem__(self, index: int):
        return self.transform(decode_rgb(self.read_bytes(index), self.draft_to)), self.items[index][1]


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
