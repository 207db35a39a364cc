"""Image embeddings of a frozen encoder, encoded once per split and kept in the artifact store.

Without it, every step re-encodes every learned task's test split, so a chain of T tasks costs T² encodings
even when the encoder never changes (LVP, zero-shot). With it, a split is encoded once, stored as
``embeddings/<key>/embeddings.safetensors`` beside ``pools/`` and ``runs/`` (``artifacts.root``), and read back
by every later evaluation and pool build: evaluation of a frozen method is a matmul.

The key is a digest of what decides the embeddings, never of where anything lies:

- ``encoder``: SHA-256 of the image tower's tensors as loaded (names, dtypes, shapes, bytes), with the device
  type and the autocast dtype it runs at. Learned weights are another digest, so a fine-tuned encoder can never
  read a frozen one's embeddings (fine-tuned encoders are evaluated as before, without the cache);
- ``preprocess`` (the eval transform's repr) and ``decoder`` (``Context.decoder``): pixels depend on both;
- ``batching``: the batch size, batches never crossing a shard (``pool_engine.part_batches``), so a hit holds
  the same bits a fresh encode would, and a pool built from cached embeddings is byte-identical to one encoded
  on the spot;
- ``content``: SHA-256 over the split's image SHA-256s in manifest order. A stored task's come from its
  ``index.csv`` (part of the task's DVC content, its md5; every read checks the bytes against them); a drop's are
  hashed once per process. Per split rather than the task's DVC md5: the DVC md5 is not known to ``cliploop
  learn`` on drops, and a split's entry stays valid when another split of the task changes;
- ``split``.

An entry is complete when its ``result.json`` exists (``components/support/artifact_store.py``): in a folder store it is
written in a staging folder with its manifest and markers, then renamed into place, so two processes encoding
the same key both end with a whole entry; an entry without its marker, or whose tensors do not match its
manifest, is a miss and is rebuilt. Recent entries are also kept in memory (``memory_bytes``).
Clearing it: delete ``embeddings/`` under the artifact store (``.cliploop/embeddings/`` by default); nothing
else refers to it. ``artifacts.embedding_cache: false`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.support import storage

if TYPE_CHECKING:
    from components.model.backbones import Backbone
    from components.model.data import TaskData
    from components.support.artifact_store import ArtifactStore

FORMAT = 1
KIND = "embeddings"  # the artifact store's folder / prefix of the entries
TENSORS = "embeddings.safetensors"
log = logging.getLogger(__name__)


# ---- the key ------------------------------------------------------------------------------------------------

_ENCODER_DIGESTS: dict[int, tuple[weakref.ref, tuple[int, ...], str]] = {}
_CONTENT_DIGESTS: dict[tuple[int, str], tuple[weakref.ref, str]] = {}
_LOCK = threading.Lock()


def encoder_digest(backbone: Backbone) -> str:
    """SHA-256 of the image tower's tensors as loaded. Hashed once per model object while its tensors are unchanged
    (their version counters, which every in-place update bumps, are compared on each call)."""
    tower = getattr(backbone.model, "visual", backbone.model)
    tensors = tower.state_dict()
    versions = tuple(t._version for t in tensors.values())
    with _LOCK:
        hit = _ENCODER_DIGESTS.get(id(tower))
    if hit is not None and hit[0]() is tower and hit[1] == versions:
        return hit[2]
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    with _LOCK:
        for gone in [k for k, (ref, _, _) in _ENCODER_DIGESTS.items() if ref() is None]:
            del _ENCODER_DIGESTS[gone]
        _ENCODER_DIGESTS[id(tower)] = (weakref.ref(tower), versions, digest.hexdigest())
    return digest.hexdigest()


def content_digest(task: TaskData, split: str) -> str:
    """SHA-256 over the SHA-256 of each image of the split, in manifest order (a drop's hashed once per process)."""
    with _LOCK:
        hit = _CONTENT_DIGESTS.get((id(task), split))
    if hit is not None and hit[0]() is task:
        return hit[1]
    digest = hashlib.sha256()
    for ref, _ in task.split(split):
        if isinstance(ref, dict):  # a stored task's index row: its bytes are checked against it on every read
            digest.update(ref["sha256"].encode())
        else:
            digest.update(storage.sha256_bytes(task.source.read(ref, 1 << 30)).encode())
        digest.update(b"\n")
    with _LOCK:
        for gone in [k for k, (ref, _) in _CONTENT_DIGESTS.items() if ref() is None]:
            del _CONTENT_DIGESTS[gone]
        _CONTENT_DIGESTS[(id(task), split)] = (weakref.ref(task), digest.hexdigest())
    return digest.hexdigest()


def entry_identity(backbone: Backbone, task: TaskData, split: str, batch_size: int, decoder: str) -> dict[str, Any]:
    """What decides a split's embeddings (module docstring); the key is its digest."""
    return {
        "format": FORMAT,
        "encoder": encoder_digest(backbone),
        "device": torch.device(backbone.device).type,
        "autocast": str(backbone.autocast_dtype),
        "preprocess": re.sub(r" at 0x[0-9a-f]+", "", repr(backbone.preprocess)),  # no object addresses
        "decoder": decoder,
        "batching": {"batch_size": batch_size, "within": "part"},
        "content": content_digest(task, split),
        "split": split,
    }


def entry_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


# ---- the store ----------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Entries in an artifact store (None: in memory only, for ``cliploop learn`` outside a workspace)."""

    def __init__(self, store: ArtifactStore | None, memory_bytes: int = 512 << 20):
        self.store = store
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, key: str) -> torch.Tensor | None:
        """A complete entry's embeddings, or None (absent, unfinished, or damaged: the caller rebuilds it)."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.store is None:
            return None
        embeddings = self._read(key)
        if embeddings is not None:
            self._remember(key, embeddings)
        return embeddings

    def save(self, key: str, embeddings: torch.Tensor, identity: dict[str, Any]) -> None:
        embeddings = embeddings.float().contiguous()
        self._remember(key, embeddings)
        if self.store is None:
            return
        result = {"key": key, "identity": identity, "images": len(embeddings), "dim": int(embeddings.shape[1])}
        if self.store.remote:  # a staging folder of this writer's own (threads of one process included)
            folder = self.store.cache / "staging" / KIND / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            _write_tensors(folder, embeddings)
            self.store.publish(folder, KIND, key, result)  # result.json last
            return
        final = Path(self.store.root) / KIND / key
        tmp = final.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            _write_tensors(tmp, embeddings)
            self.store.publish(tmp, KIND, key, result)  # a folder store writes the markers into tmp
            for _ in range(8):  # other writers of the key may move entries meanwhile: retry a few times
                if _intact(final):
                    return  # another writer's whole entry: as good as ours
                if final.exists():  # unfinished or damaged: moved aside (one rename), then removed
                    stale = final.with_name(f".{key}.stale.{uuid.uuid4().hex[:8]}")
                    with contextlib.suppress(OSError):  # moved away by another writer meanwhile
                        os.replace(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                with contextlib.suppress(OSError):  # a folder appeared there first: look again
                    os.replace(tmp, final)
                    return
            raise storage.StorageError(f"cannot put the embedding cache entry {final} in place")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _read(self, key: str) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from components.support.artifact_store import MANIFEST, IncompleteArtifact

        if self.store.result(KIND, key) is None:
            return None
        try:
            folder = self.store.fetch(KIND, key)  # an object store's entry is checked against its manifest here
            expected = json.loads((folder / MANIFEST).read_text())[TENSORS]["sha256"]
            if storage.sha256_file(folder / TENSORS) != expected:
                raise IncompleteArtifact(f"{folder / TENSORS} does not match its manifest")
            return load_file(str(folder / TENSORS))["embeddings"]
        except (IncompleteArtifact, SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("embedding cache entry %s is damaged (%s): encoding the split again", key, exc)
            if self.store.remote:
                shutil.rmtree(self.store.cache / "fetched" / KIND / key, ignore_errors=True)
            return None

    def _remember(self, key: str, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if size > self.memory_bytes:
            return
        with self._lock:
            self._memory[key] = embeddings
            self._memory.move_to_end(key)
            while sum(t.numel() * t.element_size() for t in self._memory.values()) > self.memory_bytes:
                self._memory.popitem(last=False)


def _intact(folder: Path) -> bool:
    """A folder entry with its completion marker whose tensors match its manifest."""
    from components.support.artifact_store import MANIFEST, RESULT

    try:
        if not (folder / RESULT).is_file():
            return False
        expected = json.loads((folder / MANIFEST).read_text())[TENSORS]["sha256"]
        return storage.sha256_file(folder / TENSORS) == expected
    except (OSError, ValueError, KeyError):
        return False


def _write_tensors(folder: Path, embeddings: torch.Tensor) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings}, str(folder / TENSORS))


def for_config(config) -> EmbeddingCache | None:
    """The configured cache: None when ``artifacts.embedding_cache`` is off; in the artifact store when one is set
    or the workspace exists; else in memory only (``cliploop learn`` in a folder that is no workspace writes
    nothing there)."""
    if not config.artifacts.embedding_cache:
        return None
    from components.intake.workspace import is_initialised

    if config.artifacts.root or is_initialised(config):
        from components.intake.workspace import store_of

        return EmbeddingCache(store_of(config))
    return EmbeddingCache(None)


# ---- encoding through the cache -----------------------------------------------------------------------------


def encode_splits(
    backbone: Backbone, requests: list[tuple[TaskData, str]], batch_size: int, workers: int, decoder: str
) -> list[torch.Tensor]:
    """Embeddings of each (task, split), encoded by ``pool_engine.encode_parts`` over one loader for all of them
    (its workers start once, not once per split), batches never crossing a part, so each split gets the bits it
    would get alone."""
    from components.model.data import ConcatImages
    from components.model.pool_engine import Part, encode_parts, split_parts

    datasets, parts, bounds, offset = [], [], [], 0
    for task, split in requests:
        datasets.append(task.dataset_for(split, backbone.preprocess, decoder, backbone.device))
        for part in split_parts(task, split):
            parts.append(Part(len(parts), part.shard, part.start + offset, part.stop + offset))
        bounds.append((offset, offset + len(datasets[-1])))
        offset += len(datasets[-1])
    if not parts:
        return [torch.zeros(0, backbone.embed_dim) for _ in requests]
    n_classes = 1 + max(label for task, split in requests for _, label in task.split(split))
    partials = encode_parts(backbone, ConcatImages(datasets), parts, n_classes, batch_size, workers, gather=True)
    embeddings = torch.cat([p.embeddings for p in partials])
    return [embeddings[start:stop].clone() for start, stop in bounds]


def split_embeddings(ctx, tasks: list[TaskData], split: str, decoder: str | None = None) -> list[torch.Tensor]:
    """Each task's ``split`` embeddings under ``ctx.backbone``: read from ``ctx.embedding_cache`` where it has them;
    the rest encoded together (:func:`encode_splits`) and stored. No cache on the context: all encoded."""
    decoder = decoder or ctx.decoder
    cache = ctx.embedding_cache
    out: list[torch.Tensor | None] = [None] * len(tasks)
    entries: dict[int, tuple[str, dict[str, Any]]] = {}
    if cache is not None:
        for i, task in enumerate(tasks):
            identity = entry_identity(ctx.backbone, task, split, ctx.batch_size, decoder)
            entries[i] = (entry_key(identity), identity)
            out[i] = cache.load(entries[i][0])
    missing = [i for i, found in enumerate(out) if found is None]
    if missing:
        encoded = encode_splits(
            ctx.backbone, [(tasks[i], split) for i in missing], ctx.batch_size, ctx.workers, decoder
        )
        for i, embeddings in zip(missing, encoded):
            out[i] = embeddings
            if cache is not None:
                cache.save(entries[i][0], embeddings, entries[i][1])
    return out


def pool_partials(ctx, task: TaskData, split: str, engine, gather: bool) -> list:
    """A pool's per-part partials (``pool_engine.Partial``) from the cached embeddings of the split, or, on a
    miss, from ``engine`` (every embedding gathered, then stored). From the cache, each part's sums are added up
    exactly as ``encode_parts`` adds them, so the pool is byte-identical to one encoded on the spot."""
    from components.model.pool_engine import LocalEngine, Partial, split_parts
    from components.model.pools import class_sums

    engine = engine or LocalEngine()
    cache = ctx.embedding_cache
    if cache is None:
        return engine.partials(task, split, ctx, gather)
    identity = entry_identity(ctx.backbone, task, split, ctx.batch_size, ctx.decoder)
    key = entry_key(identity)
    embeddings = cache.load(key)
    if embeddings is None:
        partials = sorted(engine.partials(task, split, ctx, True), key=lambda p: p.part)
        found = [p.embeddings for p in partials]
        cache.save(key, torch.cat(found) if found else torch.zeros(0, ctx.backbone.embed_dim), identity)
        return partials if gather else [Partial(p.part, p.sums, p.counts) for p in partials]
    labels = torch.tensor([label for _, label in task.split(split)], dtype=torch.long)
    out = []
    for part in split_parts(task, split):
        rows, row_labels = embeddings[part.start : part.stop], labels[part.start : part.stop]
        sums, counts = class_sums(rows, row_labels, len(task.class_keys))
        out.append(Partial(part.index, sums, counts, *((rows, row_labels) if gather else (None, None))))
    return out
