"""A task's images as torch datasets, read from a stored task (shards) or straight from a drop.

Decoding and preprocessing happen in DataLoader workers; samples keep the manifest's order, so
anything computed from a task (its LVP pool above all) is the same whichever process builds it.

Decoders (named, because pixels depend on them: the name is part of every pool key and recorded in each pool):

- ``pillow``: Pillow decodes every image at full size;
- ``pillow-draft2x`` (``DECODER``, what cliploop uses): the same, except that a JPEG at least twice the model's
  input size on both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's draft mode), never below the
  input size, before the model's own resize. Decoding and preprocessing such an image for a 224-px model took
  about a third of the time on one core (448 to 2048-px JPEGs), and the embeddings stay within cosine 0.995 of
  full decoding (tests/test_decoding.py); every other image gives the same bytes as ``pillow``;
- ``nvjpeg``: JPEGs decoded in batches on the GPU by nvJPEG, then resized, cropped and normalised there with the
  backbone's own eval-transform parameters (components/model/tensor_decode.py); the DataLoader workers only read and
  check the bytes. PNG, WebP, CMYK JPEGs and anything nvJPEG refuses go through ``pillow``, image by image;
- ``torch-jpeg``: the same algorithm on the CPU (libjpeg-turbo through torchvision), which is how CI tests it.

``model.decoder`` chooses one: ``auto`` (the default) is ``nvjpeg`` when the model runs on CUDA and ``DECODER``
on the CPU (:func:`resolve_decoder`). The tensor decoders serve frozen encoders' eval transforms (pools,
evaluation); training transforms (random crops) always decode with Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler, SequentialSampler

from components.intake.shards import StoredTask
from components.intake.tasks import DropSource, normalise_class_name, open_drop, parse_manifest, parse_task_yaml
from components.model.replicas import SINGLE, Replicas

DECODERS = ("pillow", "pillow-draft2x", "torch-jpeg", "nvjpeg")
DECODER = "pillow-draft2x"  # what a dataset decodes with unless told otherwise; part of every pool key
TENSOR_DECODERS = {"torch-jpeg": "cpu", "nvjpeg": "cuda"}  # decoder -> the kind of device it decodes on


def resolve_decoder(setting: str, device: str) -> str:
    """The decoder a ``model.decoder`` setting means for a model on ``device``: ``auto`` is ``nvjpeg`` on
    CUDA and ``DECODER`` elsewhere."""
    on_cuda = str(device).startswith("cuda")
    if setting == "auto":
        return "nvjpeg" if on_cuda else DECODER
    if setting not in DECODERS:
        raise ValueError(f"unknown decoder {setting!r} (known: auto, {', '.join(DECODERS)})")
    if setting == "nvjpeg" and not on_cuda:
        raise ValueError("decoder nvjpeg needs the model on a CUDA device; torch-jpeg runs the same algorithm on CPU")
    return setting


def decoder_key(model_cfg) -> str:
    """The decoder as a config determines it on any machine (in every pool and run key): resolved where
    ``model.device`` names the device; with ``device: auto`` and ``decoder: auto``, the rule itself."""
    if model_cfg.decoder == "auto" and model_cfg.device == "auto":
        return f"auto(cuda:nvjpeg,cpu:{DECODER})"
    return resolve_decoder(model_cfg.decoder, "cuda" if model_cfg.device == "auto" else model_cfg.device)


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

    def dataset_for(
        self, split: str, transform: Callable, decoder: str = DECODER, device: str | None = None
    ) -> ImageDataset:
        return ImageDataset(self.source, self.split(split), transform, decoder, device)

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
    """(image, label) samples. With a Pillow decoder an image is the transform's tensor, made in the worker; with
    a tensor decoder (``TENSOR_DECODERS``) it is the encoded bytes as a uint8 tensor, and :meth:`finish_batch`
    decodes and preprocesses a collated batch on ``device`` (the model's device for ``nvjpeg``)."""

    def __init__(
        self,
        source: Any,
        items: list[tuple[Any, int]],
        transform: Callable,
        decoder: str = DECODER,
        device: str | None = None,
    ):
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r} (known: {', '.join(DECODERS)})")
        self.source, self.items, self.transform, self.decoder = source, items, transform, decoder
        # Draft mode needs the size the model resizes to; a transform that does not say decodes in full.
        self.draft_to = input_size(transform) if decoder == "pillow-draft2x" else None
        self.tensor_spec = None
        if decoder in TENSOR_DECODERS:
            from components.model.tensor_decode import tensor_preprocess

            kind = TENSOR_DECODERS[decoder]
            device = device if device is not None and str(device).startswith(kind) else kind
            if kind == "cuda" and not torch.cuda.is_available():
                raise ValueError("decoder nvjpeg needs a CUDA device; torch-jpeg runs the same algorithm on CPU")
            self.tensor_spec = tensor_preprocess(transform)  # raises on a transform it cannot reproduce
        self.device = device
        self.fallbacks = 0  # images a tensor decoder handed to Pillow (not JPEG, CMYK, or refused)

    def __len__(self) -> int:
        return len(self.items)

    def read_bytes(self, index: int) -> bytes:
        ref, _ = self.items[index]
        if isinstance(self.source, StoredTask):
            return self.source.read_row(ref)
        return self.source.read(ref, 1 << 30)

    def __getitem__(self, index: int):
        if self.tensor_spec is not None:  # decoded a batch at a time by finish_batch
            return torch.frombuffer(bytearray(self.read_bytes(index)), dtype=torch.uint8), self.items[index][1]
        return self.transform(decode_rgb(self.read_bytes(index), self.draft_to)), self.items[index][1]

    def collate(self, samples: list[tuple]) -> tuple:
        """A batch of samples: stacked tensors (Pillow decoders), or the list of encoded images (tensor ones)."""
        from torch.utils.data import default_collate

        if self.tensor_spec is None:
            return default_collate(samples)
        return [image for image, _ in samples], torch.tensor([label for _, label in samples], dtype=torch.long)

    def finish_batch(self, images):
        """A collated batch's images ready for the encoder: as they are (Pillow decoders), or decoded and
        preprocessed on the dataset's device (tensor decoders; non-JPEGs through the Pillow transform)."""
        if self.tensor_spec is None:
            return images
        from components.model.tensor_decode import decode_batch

        return decode_batch(images, self.tensor_spec, self.device, self._fallback)[0]

    def _fallback(self, data: bytes) -> torch.Tensor:
        self.fallbacks += 1  # counted where batches are finished (the caller's process)
        return self.transform(decode_rgb(data))


class ConcatImages(ConcatDataset):
    """Several splits' ImageDatasets as one (one loader for all of them), batched and finished as the first one
    does: they share a transform, a decoder and a device."""

    def __init__(self, datasets: list[ImageDataset]):
        super().__init__(datasets)
        first = datasets[0]
        self.tensor_spec, self.device = first.tensor_spec, first.device
        self.collate, self.finish_batch = first.collate, first.finish_batch


class DecodedLoader:
    """A DataLoader over an ImageDataset whose batches are finished (decoded on the device) as they come."""

    def __init__(self, loader: DataLoader, dataset: ImageDataset):
        self.loader, self.dataset = loader, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return finished_batches(self.loader, self.dataset)


def finished_batches(loaded: Iterable[tuple], dataset: Any, ahead: int = 2) -> Iterator[tuple]:
    """(images, labels) batches with their images finished by the dataset, in order. A tensor decoder's batches
    are decoded in a background thread, up to ``ahead`` batches before the caller asks (on CUDA on a stream of
    their own), so decoding overlaps the caller's encoding; other datasets' batches pass as they come."""
    if getattr(dataset, "tensor_spec", None) is None:
        yield from loaded
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    stream = torch.cuda.Stream(device=dataset.device) if str(dataset.device).startswith("cuda") else None

    def finish(images):
        if stream is None:
            return dataset.finish_batch(images), None
        with torch.cuda.stream(stream):
            out = dataset.finish_batch(images)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    def ready(future, labels):
        out, done = future.result()
        if done is not None:  # the caller's stream waits for the decode, and keeps the memory until it is done
            current = torch.cuda.current_stream(out.device)
            current.wait_event(done)
            out.record_stream(current)
        return out, labels

    pending: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="cliploop-decode") as pool:
        try:
            for images, labels in loaded:
                pending.append((pool.submit(finish, images), labels))
                if len(pending) > ahead:
                    yield ready(*pending.popleft())
            while pending:
                yield ready(*pending.popleft())
        finally:
            for future, _ in pending:
                future.cancel()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    replicas: Replicas = SINGLE,
) -> DataLoader:
    """Batches of ``dataset``; with several data-parallel ``replicas``, this worker's slice of each global batch (the
    global batches in the order one process sees them: the same sampler, generator and seed)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = _Slices(BatchSampler(sampler, batch_size, drop_last), replicas)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=getattr(dataset, "collate", None),
    )
    return DecodedLoader(loader, dataset) if getattr(dataset, "tensor_spec", None) is not None else loader


class _Slices:
    """A batch sampler's batches, each cut to one replica's slice (all of it with one replica)."""

    def __init__(self, batches: BatchSampler, replicas: Replicas):
        self.batches, self.replicas = batches, replicas

    def __iter__(self):
        for batch in self.batches:
            yield self.replicas.take(batch)

    def __len__(self) -> int:
        return len(self.batches)
