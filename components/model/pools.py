"""LVP-CLIP settings and one task's label-vector pool (docs/methods/lvp.md), built from that task alone.

A :class:`TaskPool` holds, for each class of its task, the sum and count of the task's L2-normalised
training-image embeddings (fp64, so merged means are exact and independent of order), the class's text
embedding (LVP-T), and, by mode and variant, every embedding (``bank``), k-means centroids
(``cluster``) or the two LVP-IT scalars. It is saved as safetensors plus JSON, bit-identical for the same
inputs. Combining pools and scoring against them is components/model/merged_pool.py: what a task contributes and
its file format change for other reasons than how pools are combined and predictions made.

Variants (``PoolConfig.variant``):

- ``lvp-t``: text vectors ``t_c`` only (zero-shot CLIP with the pool's prompts);
- ``lvp-i``: image vectors; mean mode: one ``i_{c,dom} = sum / count`` per class and domain, over every
  task that taught ``c`` in that domain (a domain-incremental task appends entries for its domain; not
  renormalised, cosine makes that harmless);
- ``lvp-it``: ``u = a_c t_c + b_c i_c`` per (class, task), the scalars trained on the task's own
  embeddings with cross-entropy on ``-||e - u||_1`` (single softmax; ``it_double_softmax`` reproduces
  the official code, which feeds a softmax into CrossEntropyLoss);
- ``lvp-c``: a linear head ``W e + b`` trained with Adam on the merged pool's LVP-IT vectors,
  retrained whenever the set of pools changes (cheap; needs no images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.support import storage

FORMAT = 1


class PoolError(RuntimeError):
    pass


class PoolConfig(BaseModel):
    """LVP-CLIP settings (``method.settings`` when ``method.name`` is ``lvp``); defaults from the official code."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["lvp-t", "lvp-i", "lvp-it", "lvp-c"] = Field("lvp-i", description="which label vectors")
    mode: Literal["mean", "bank", "cluster"] = Field(
        "mean", description="one vector per class, every embedding, or k centroids"
    )
    metric: Literal["cosine", "l1"] = Field("cosine", description="similarity used at inference")
    clusters: int = Field(4, gt=0, description="cluster mode: centroids per class and task")
    cluster_iters: int = Field(10, gt=0, description="cluster mode: k-means iterations (L1 assignment)")
    it_text_init: float = Field(0.5, description="LVP-IT: initial text weight a_c")
    it_image_init: float = Field(1.0, description="LVP-IT: initial image weight b_c")
    it_lr: float = Field(1e-4, gt=0, description="LVP-IT: SGD learning rate")
    it_epochs: int = Field(100, ge=0, description="LVP-IT: epochs over the task's embeddings")
    it_batch: int = Field(256, gt=0, description="LVP-IT: batch size (no shuffling, as in the code)")
    it_double_softmax: bool = Field(False, description="LVP-IT: parity with the official code's softmax-then-CE")
    c_lr: float = Field(1e-2, gt=0, description="LVP-C: Adam learning rate")
    c_epochs: int = Field(150, ge=0, description="LVP-C: epochs over the pool vectors")
    seed: int = Field(0, description="seed of k-means initialisation and the LVP-C head")

    @model_validator(mode="after")
    def _compatible(self) -> PoolConfig:
        if self.variant in ("lvp-it", "lvp-c") and self.mode != "mean":
            raise ValueError(
                f"variant {self.variant} learns one vector per class: it needs mode 'mean', not {self.mode!r}"
            )
        return self


# ---- the pure mathematics of building a pool -------------------------------------------------------------


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (fp64) and counts of embeddings. Sequential on CPU, hence deterministic."""
    sums = torch.zeros(n_classes, embeddings.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.long(), embeddings.double())
    counts = torch.bincount(labels.long(), minlength=n_classes).to(torch.int64)
    return sums, counts


def kmeans_l1(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k centroids of points: random initial centroids from the points, L1 assignment, mean update."""
    k = min(k, len(points))
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(points, centroids, p=1).argmin(dim=1)
        for j in range(k):
            members = points[assign == j]
            if len(members):  # an empty cluster keeps its centroid
                centroids[j] = members.mean(dim=0)
    return centroids


def training_mode():
    """Gradients on, even when called from evaluation code running under inference mode (LVP-IT here, LVP-C's
    head in components/model/merged_pool.py)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def train_it_scalars(
    embeddings: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, image: torch.Tensor, cfg: PoolConfig
) -> torch.Tensor:
    """LVP-IT: per-class (a_c, b_c) of ``u_c = a_c t_c + b_c i_c``, trained on one task's embeddings. [C, 2]."""
    with training_mode():
        # Clones: inputs made under inference mode cannot take part in autograd.
        embeddings, labels, text, image = (t.clone() for t in (embeddings.float(), labels, text.float(), image.float()))
        a = torch.full((len(text),), cfg.it_text_init, requires_grad=True)
        b = torch.full((len(text),), cfg.it_image_init, requires_grad=True)
        optimizer = torch.optim.SGD([a, b], lr=cfg.it_lr)
        for _ in range(cfg.it_epochs):
            for start in range(0, len(labels), cfg.it_batch):  # no shuffling, as in the official code
                e = embeddings[start : start + cfg.it_batch]
                y = labels[start : start + cfg.it_batch]
                vectors = a[:, None] * text + b[:, None] * image
                logits = -torch.cdist(e, vectors, p=1)
                if cfg.it_double_softmax:
                    logits = logits.softmax(dim=1)  # the official code's similarity already is a softmax
                loss = torch.nn.functional.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return torch.stack([a.detach(), b.detach()], dim=1)


# ---- one task's pool ---------------------------------------------------------------------------------------


@dataclass
class TaskPool:
    task_id: str
    class_keys: list[str]
    class_names: list[str]
    sums: torch.Tensor  # [C, d] fp64
    counts: torch.Tensor  # [C] int64
    text: torch.Tensor  # [C, d] fp32, normalised
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # backbone, preprocess, prompts, metric, task
    domain: str | None = None  # the task's domain: mean-mode entries are per (class, domain)
    bank: torch.Tensor | None = None  # [N, d] fp32 (bank mode)
    bank_labels: torch.Tensor | None = None  # [N] index into class_keys
    centroids: torch.Tensor | None = None  # [K, d] (cluster mode)
    centroid_labels: torch.Tensor | None = None
    it_ab: torch.Tensor | None = None  # [C, 2] (lvp-it / lvp-c)

    @property
    def dim(self) -> int:
        return int(self.sums.shape[1])

    def image_means(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp(min=1)[:, None]).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"sums": self.sums, "counts": self.counts, "text": self.text}
        for name in ("bank", "bank_labels", "centroids", "centroid_labels", "it_ab"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, folder: Path) -> dict[str, str]:
        """``<task_id>.safetensors`` + ``<task_id>.json`` in ``folder``; returns {file name: sha256}."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensor_path = folder / f"{self.task_id}.safetensors"
        tmp = folder / f".{self.task_id}.safetensors.tmp"
        # No safetensors metadata: its header map has no fixed order, and pools must be bit-reproducible.
        save_file(self.tensors(), str(tmp))
        tmp.replace(tensor_path)
        digest = storage.sha256_file(tensor_path)
        doc = {
            "format": FORMAT,
            "task_id": self.task_id,
            "domain": self.domain,
            "class_keys": self.class_keys,
            "class_names": self.class_names,
            "dim": self.dim,
            "config": self.config,
            "meta": self.meta,
            "tensors_sha256": digest,
        }
        storage.atomic_write_text(
            folder / f"{self.task_id}.json", json.dumps(doc, indent=2, sort_keys=True, default=str)
        )
        return {tensor_path.name: digest, f"{self.task_id}.json": storage.sha256_file(folder / f"{self.task_id}.json")}

    @classmethod
    def load(cls, folder: Path, task_id: str) -> TaskPool:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, tensor_path = folder / f"{task_id}.json", folder / f"{task_id}.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise PoolError(f"no pool for task {task_id!r} in {folder}")
        doc = json.loads(meta_path.read_text())
        if doc.get("format") != FORMAT:
            raise PoolError(f"{meta_path}: pool format {doc.get('format')!r}, expected {FORMAT}")
        if storage.sha256_file(tensor_path) != doc["tensors_sha256"]:
            raise PoolError(
                f"{tensor_path}: content does not match the sha256 in {meta_path.name} (corrupt or altered)"
            )
        t = load_file(str(tensor_path))
        return cls(
            task_id=doc["task_id"],
            class_keys=doc["class_keys"],
            class_names=doc["class_names"],
            sums=t["sums"],
            counts=t["counts"],
            text=t["text"],
            config=doc["config"],
            meta=doc["meta"],
            bank=t.get("bank"),
            bank_labels=t.get("bank_labels"),
            centroids=t.get("centroids"),
            centroid_labels=t.get("centroid_labels"),
            it_ab=t.get("it_ab"),
            domain=doc.get("domain"),
        )


def build_task_pool(
    task_id: str,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    class_keys: list[str],
    class_names: list[str],
    text: torch.Tensor,
    cfg: PoolConfig,
    meta: dict[str, Any] | None = None,
    domain: str | None = None,
) -> TaskPool:
    """A task's pool from its training embeddings ([N, d], normalised) and labels (indices into class_keys)."""
    embeddings = embeddings.float().cpu()
    labels = labels.long().cpu()
    if len(embeddings) != len(labels):
        raise PoolError(f"{task_id}: {len(embeddings)} embeddings but {len(labels)} labels")
    sums, counts = class_sums(embeddings, labels, len(class_keys))
    return pool_from_sums(
        task_id, sums, counts, embeddings, labels, class_keys, class_names, text, cfg, meta, domain=domain
    )


def needs_embeddings(cfg: PoolConfig) -> bool:
    """Whether a pool needs every embedding (bank, cluster, LVP-IT/LVP-C), not only per-class sums and counts."""
    return cfg.mode in ("bank", "cluster") or cfg.variant in ("lvp-it", "lvp-c")


def pool_from_sums(
    task_id: str,
    sums: torch.Tensor,
    counts: torch.Tensor,
    embeddings: torch.Tensor | None,
    labels: torch.Tensor | None,
    class_keys: list[str],
    class_names: list[str],
    text: torch.Tensor,
    cfg: PoolConfig,
    meta: dict[str, Any] | None = None,
    domain: str | None = None,
) -> TaskPool:
    """A task's pool from its per-class fp64 sums and counts (reduced however they were computed) and, when
    the mode :func:`needs_embeddings`, every embedding with its label in manifest order."""
    if needs_embeddings(cfg) and embeddings is None:
        raise PoolError(f"{task_id}: mode {cfg.mode!r} / variant {cfg.variant!r} needs the embeddings")
    if embeddings is not None:
        embeddings, labels = embeddings.float().cpu(), labels.long().cpu()
    pool = TaskPool(
        task_id,
        list(class_keys),
        list(class_names),
        sums,
        counts,
        text.float().cpu().contiguous(),
        cfg.model_dump(mode="json"),
        dict(meta or {}),
        domain,
    )
    if cfg.mode == "bank":
        pool.bank, pool.bank_labels = embeddings.clone(), labels.clone()
    elif cfg.mode == "cluster":
        generator = torch.Generator().manual_seed(cfg.seed)
        centroids, owners = [], []
        for c in range(len(class_keys)):
            members = embeddings[labels == c]
            if len(members):
                found = kmeans_l1(members, cfg.clusters, cfg.cluster_iters, generator)
                centroids.append(found)
                owners.append(torch.full((len(found),), c, dtype=torch.long))
        pool.centroids = torch.cat(centroids) if centroids else torch.zeros(0, embeddings.shape[1])
        pool.centroid_labels = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long)
    if cfg.variant in ("lvp-it", "lvp-c"):
        pool.it_ab = train_it_scalars(embeddings, labels, pool.text, pool.image_means(), cfg)
    return pool
