"""The image side of pool building, shard by shard: decode → preprocess → encode → per-class fp64 partial sums,
and the reduction of those partials in shard order. Every engine (``compute.engine``) runs the same
:func:`encode_parts` on its parts, and :func:`reduce_partials` adds the partials up in part order, so a pool
is bit-identical whichever engine (this process, or Ray's encoder actors in components/model/ray_pools.py) built it,
for the same decoder and device.

A split is cut into parts: maximal runs of consecutive rows (manifest order) whose bytes live in the same shard
(a drop, which has no shards, is one part). Batches never cross a part, so a part's embeddings do not depend on
what else is encoded with it. Modes that need every embedding (bank, cluster, LVP-IT) gather the parts'
embeddings too, concatenated in part order, which is manifest order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from components.model.pools import class_sums

REDUCE = "per-shard"  # how a pool's sums are added up (in the pool key and each pool's meta): per part, in order
encoded_images = 0  # images this process has encoded in encode_parts (benchmarks/chain_eval.py reads it)


@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of a split (indices into ``task.split(name)``), all stored in ``shard``."""

    index: int
    shard: str | None
    start: int
    stop: int


@dataclass
class Partial:
    """One part's per-class fp64 sums and counts, and its embeddings with their labels when gathered."""

    part: int
    sums: torch.Tensor  # [C, d] fp64
    counts: torch.Tensor  # [C] int64
    embeddings: torch.Tensor | None = None  # [n, d] fp32
    labels: torch.Tensor | None = None  # [n] int64

    def to_bytes(self) -> bytes:
        """safetensors bytes: how a partial crosses from a Ray actor (never pickled)."""
        from safetensors.torch import save

        tensors = {"sums": self.sums, "counts": self.counts}
        if self.embeddings is not None:
            tensors |= {"embeddings": self.embeddings, "labels": self.labels}
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"part": str(self.part)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Partial:
        import json

        from safetensors.torch import load

        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        part = int(header["__metadata__"]["part"])
        return cls(part, tensors["sums"], tensors["counts"], tensors.get("embeddings"), tensors.get("labels"))


def split_parts(task, split: str) -> list[Part]:
    """A split's parts: runs of consecutive rows stored in the same shard (one part for a drop)."""
    items = task.split(split)
    shards = [ref.get("shard") if isinstance(ref, dict) else None for ref, _ in items]
    parts, start = [], 0
    for stop in range(1, len(items) + 1):
        if stop == len(items) or shards[stop] != shards[start]:
            parts.append(Part(len(parts), shards[start], start, stop))
            start = stop
    return parts


def part_batches(parts: list[Part], batch_size: int) -> list[list[int]]:
    """Row indices of each batch, part after part; no batch crosses a part boundary."""
    return [
        list(range(first, min(first + batch_size, part.stop)))
        for part in parts
        for first in range(part.start, part.stop, batch_size)
    ]


def load_batches(dataset, parts: list[Part], batch_size: int, workers: int) -> Iterator[tuple]:
    """Decoded, preprocessed (images, labels) batches of the parts, in order: in this process, or in
    ``workers`` DataLoader processes (one loader for all the parts, so workers start once per split)."""
    from torch.utils.data import DataLoader, default_collate

    from components.model.data import finished_batches

    batches = part_batches(parts, batch_size)
    collate = getattr(dataset, "collate", default_collate)  # a tensor decoder's batch: the encoded images...
    if workers <= 0:
        loaded = (collate([dataset[i] for i in rows]) for rows in batches)
    else:
        loaded = iter(
            DataLoader(
                dataset,
                batch_sampler=batches,
                num_workers=workers,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4,
                collate_fn=collate,
            )
        )
    return finished_batches(loaded, dataset)  # ...decoded on the model's device, ahead of the encoder


def encode_parts(
    backbone, dataset, parts: list[Part], n_classes: int, batch_size: int, workers: int, gather: bool, what="encode"
) -> list[Partial]:
    """decode → preprocess → encode → per-class fp64 sums, one :class:`Partial` per part, in part order: the
    one function every engine calls (``dataset``: the split's ImageDataset, which checks each image's bytes
    against the index SHA-256 as it reads them)."""
    from components.model.backbones import encode_batch
    from components.support.progress import tracked

    global encoded_images
    stream = load_batches(dataset, parts, batch_size, workers)
    out = []
    with tracked(sum(p.stop - p.start for p in parts), what, unit="img") as done:
        for part in parts:
            n_batches = -(-(part.stop - part.start) // batch_size)
            feats, labels = [], []
            for images, batch_labels in itertools.islice(stream, n_batches):
                feats.append(encode_batch(backbone, images, on_device=True))  # no wait for the host per batch
                labels.append(batch_labels.long())
                encoded_images += len(batch_labels)
                done.advance(len(batch_labels))
            # One copy to the host per part. The fp64 sums are made there: CUDA's index_add_ adds with atomics,
            # in an order that varies from run to run, and a pool's bits must not.
            embeddings, labels = torch.cat(feats).cpu(), torch.cat(labels)
            sums, counts = class_sums(embeddings, labels, n_classes)
            out.append(Partial(part.index, sums, counts, *((embeddings, labels) if gather else (None, None))))
    return out


@dataclass
class Reduced:
    sums: torch.Tensor  # [C, d] fp64
    counts: torch.Tensor  # [C] int64
    embeddings: torch.Tensor | None  # [N, d] in manifest order (gathered only)
    labels: torch.Tensor | None


def reduce_partials(partials: list[Partial], n_classes: int, dim: int, gather: bool) -> Reduced:
    """The partials added up in part order (fp64, so the same partials always give the same bits)."""
    partials = sorted(partials, key=lambda p: p.part)
    if [p.part for p in partials] != list(range(len(partials))):
        raise RuntimeError(f"partials of parts {[p.part for p in partials]}: some are missing or repeated")
    sums = torch.zeros(n_classes, dim, dtype=torch.float64)
    counts = torch.zeros(n_classes, dtype=torch.int64)
    for partial in partials:
        sums += partial.sums
        counts += partial.counts
    if not gather:
        return Reduced(sums, counts, None, None)
    if not partials:
        return Reduced(sums, counts, torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
    return Reduced(sums, counts, torch.cat([p.embeddings for p in partials]), torch.cat([p.labels for p in partials]))


class LocalEngine:
    """Every part in this process (decoding in the context's DataLoader workers)."""

    name = "local"

    def partials(self, task, split: str, ctx, gather: bool) -> list[Partial]:
        dataset = task.dataset_for(split, ctx.backbone.preprocess, ctx.decoder, ctx.backbone.device)
        parts = split_parts(task, split)
        n_classes, what = len(task.class_keys), f"pool {task.task_id}"
        return encode_parts(ctx.backbone, dataset, parts, n_classes, ctx.batch_size, ctx.workers, gather, what)
