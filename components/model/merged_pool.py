"""LVP-CLIP merged pools (docs/methods/lvp.md): any set of task pools combined, and classes scored against them.

:func:`merge` combines task pools (:class:`components.model.pools.TaskPool`) into a :class:`MergedPool` by
concatenation; pools are always combined in task-id order, so the result is bit-identical whatever order the
tasks arrived or were built in. Which entries a merged pool holds follows ``PoolConfig.variant`` and ``mode``
(listed in components/model/pools.py); LVP-C's linear head is trained here, on the merged pool's LVP-IT vectors,
because it is retrained whenever the set of pools changes. Prediction is the label of the nearest pool entry
(cosine by default, or negative L1). Kept apart from building a task's pool, whose inputs and file format change
for other reasons than how pools are combined and scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from components.model.pools import PoolConfig, PoolError, TaskPool, training_mode

# ---- the pure mathematics: scoring, and the LVP-C head -------------------------------------------------


def similarity(embeddings: torch.Tensor, vectors: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M]: cosine with each (not necessarily normalised) vector, or negative L1 distance."""
    return compare(embeddings, prepare(vectors, metric), metric)


def prepare(vectors: torch.Tensor, metric: str) -> torch.Tensor:
    """Vectors as ``compare`` takes them (normalised for cosine): done once per pool, not per batch."""
    if metric == "cosine":
        return torch.nn.functional.normalize(vectors, dim=-1)
    if metric == "l1":
        return vectors
    raise PoolError(f"unknown metric {metric!r}")


def compare(embeddings: torch.Tensor, prepared: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M] similarity to vectors already ``prepare``d."""
    return embeddings @ prepared.T if metric == "cosine" else -torch.cdist(embeddings, prepared, p=1)


def per_class_max(scores: torch.Tensor, entry_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[N, C]: for each class, its best entry's score (1-NN over bank or centroid entries)."""
    out = torch.full((scores.shape[0], n_classes), float("-inf"), dtype=scores.dtype, device=scores.device)
    return out.scatter_reduce(1, entry_class.expand(scores.shape[0], -1), scores, reduce="amax", include_self=True)


def train_linear_head(vectors: torch.Tensor, targets: torch.Tensor, n_classes: int, cfg: PoolConfig) -> torch.nn.Linear:
    """LVP-C: ``W e + b`` trained with Adam on pool vectors, batch = number of classes, in a fixed order."""
    with training_mode():
        vectors, targets = vectors.float().clone(), targets.clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = torch.nn.Linear(vectors.shape[1], n_classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=cfg.c_lr)
        for _ in range(cfg.c_epochs):
            for start in range(0, len(targets), n_classes):
                loss = torch.nn.functional.cross_entropy(
                    head(vectors[start : start + n_classes]), targets[start : start + n_classes]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return head.eval().requires_grad_(False)


# ---- merged pools ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringPlan:
    """Where each asked class's column comes from, worked out once per (merged pool, asked class keys)."""

    columns: torch.Tensor  # [K] long: below C a pool class, C + j the j-th fallback key
    fallback_keys: tuple[str, ...]  # asked keys in no pool, in order of first appearance
    in_order: bool  # the asked keys are exactly the pool's classes, in the pool's order


@dataclass
class MergedPool:
    class_keys: list[str]
    class_names: list[str]
    vectors: torch.Tensor  # [M, d] pool entries
    entry_class: torch.Tensor  # [M] index into class_keys
    text: torch.Tensor  # [C, d]
    cfg: PoolConfig
    task_ids: list[str]
    head: torch.nn.Linear | None = None  # LVP-C
    # Scoring caches: a merged pool is never changed after merge() (train_head only adds the head), so what
    # scoring derives from it is computed once, not per batch.
    _position: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _entries: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _plans: dict[tuple[str, ...], ScoringPlan] = field(default_factory=dict, init=False, repr=False, compare=False)
    _fallback: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def position(self) -> dict[str, int]:
        if self._position is None:
            self._position = {k: i for i, k in enumerate(self.class_keys)}
        return self._position

    def plan(self, class_keys: list[str]) -> ScoringPlan:
        """The column index of ``class_keys``, cached (an evaluation asks the same keys batch after batch)."""
        key = tuple(class_keys)
        plan = self._plans.get(key)
        if plan is None:
            position = self.position
            fallback = tuple(dict.fromkeys(k for k in key if k not in position))
            slot = {k: len(self.class_keys) + j for j, k in enumerate(fallback)}
            columns = torch.tensor([position[k] if k in position else slot[k] for k in key], dtype=torch.long)
            plan = ScoringPlan(columns, fallback, key == tuple(self.class_keys))
            if len(self._plans) >= 16:  # a few label spaces (one per evaluated dataset) are live at a time
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def entries(self, device: torch.device) -> torch.Tensor:
        """The pool vectors as the metric compares them (normalised for cosine), once per device."""
        cached = self._entries.get(str(device))
        if cached is None:
            cached = prepare(self.vectors.to(device), self.cfg.metric)
            self._entries[str(device)] = cached
        return cached

    def fallback_matrix(self, plan: ScoringPlan, fallback_text: dict[str, torch.Tensor] | None, device) -> torch.Tensor:
        """[F, d] text vectors of the plan's fallback keys (normalised for cosine); rebuilt only when asked
        with another dict or other keys (LVP passes the same dict for a whole evaluation)."""
        cached = self._fallback
        if cached is not None and cached[0] is fallback_text and cached[1] == plan.fallback_keys:
            return cached[2]
        for key in plan.fallback_keys:
            if not fallback_text or key not in fallback_text:
                raise PoolError(f"class {key!r} is in no pool and has no text fallback")
        matrix = prepare(
            torch.stack([fallback_text[k].float() for k in plan.fallback_keys]).to(device), self.cfg.metric
        )
        self._fallback = (fallback_text, plan.fallback_keys, matrix)
        return matrix

    def scores(
        self,
        embeddings: torch.Tensor,
        class_keys: list[str] | None = None,
        fallback_text: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[N, len(class_keys)] scores; classes outside the pool use ``fallback_text`` (zero-shot).

        One matmul against the pool entries, a per-class max (scatter), and one gather of the asked columns;
        fallback classes are one more matmul against their stacked text vectors."""
        plan = self.plan(self.class_keys if class_keys is None else class_keys)
        embeddings = embeddings.float()
        if self.head is not None and not plan.fallback_keys:
            logits = self.head(embeddings)
            return logits if plan.in_order else logits.index_select(1, plan.columns.to(logits.device))
        # Without a head, or asked about classes it never learned: nearest pool entry.
        pooled = per_class_max(
            compare(embeddings, self.entries(embeddings.device), self.cfg.metric),
            self.entry_class.to(embeddings.device),
            len(self.class_keys),
        )
        if plan.fallback_keys:
            matrix = self.fallback_matrix(plan, fallback_text, embeddings.device)
            pooled = torch.cat([pooled, compare(embeddings, matrix, self.cfg.metric)], dim=1)
        elif plan.in_order:
            return pooled
        return pooled.index_select(1, plan.columns.to(pooled.device))

    def predict(self, embeddings: torch.Tensor) -> list[str]:
        return [self.class_keys[i] for i in self.scores(embeddings).argmax(dim=1).tolist()]


def merge(pools: list[TaskPool], cfg: PoolConfig) -> MergedPool:
    """Concatenate task pools. Combined in task-id order: the same set of pools gives the same bits."""
    if not pools:
        raise PoolError("no pools to merge")
    pools = sorted(pools, key=lambda p: p.task_id)
    if len({p.task_id for p in pools}) != len(pools):
        raise PoolError("two pools have the same task id")
    _check_compatible(pools)
    keys: list[str] = []
    names: list[str] = []
    position: dict[str, int] = {}
    for pool in pools:
        for key, name in zip(pool.class_keys, pool.class_names):
            if key not in position:
                position[key] = len(keys)
                keys.append(key)
                names.append(name)
    dim = pools[0].dim
    # Mean-mode image entries: one per (class, domain), in order of first appearance.
    groups: dict[tuple[str, str | None], int] = {}
    for pool in pools:
        for key in pool.class_keys:
            groups.setdefault((key, pool.domain), len(groups))
    sums = torch.zeros(len(groups), dim, dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.int64)
    text = torch.zeros(len(keys), dim)
    have_text = torch.zeros(len(keys), dtype=torch.bool)
    vectors, owners = [], []
    for pool in pools:
        index = torch.tensor([position[k] for k in pool.class_keys], dtype=torch.long)
        group = torch.tensor([groups[(k, pool.domain)] for k in pool.class_keys], dtype=torch.long)
        sums.index_add_(0, group, pool.sums)
        counts.index_add_(0, group, pool.counts)
        new = ~have_text[index]
        text[index[new]] = pool.text[new]
        have_text[index] = True
        if cfg.variant in ("lvp-it", "lvp-c"):
            if pool.it_ab is None:
                raise PoolError(f"pool {pool.task_id} has no LVP-IT scalars (built as {pool.config.get('variant')})")
            taught = pool.counts > 0
            u = pool.it_ab[:, :1] * pool.text + pool.it_ab[:, 1:] * pool.image_means()
            vectors.append(u[taught])
            owners.append(index[taught])
        elif cfg.variant == "lvp-i" and cfg.mode == "bank":
            if pool.bank is None:
                raise PoolError(f"pool {pool.task_id} has no bank (built in mode {pool.config.get('mode')})")
            vectors.append(pool.bank)
            owners.append(index[pool.bank_labels])
        elif cfg.variant == "lvp-i" and cfg.mode == "cluster":
            if pool.centroids is None:
                raise PoolError(f"pool {pool.task_id} has no centroids (built in mode {pool.config.get('mode')})")
            vectors.append(pool.centroids)
            owners.append(index[pool.centroid_labels])
    if cfg.variant == "lvp-t":
        vectors, owners = [text], [torch.arange(len(keys))]
    elif cfg.variant == "lvp-i" and cfg.mode == "mean":
        taught = counts > 0
        means = (sums / counts.clamp(min=1)[:, None]).float()
        group_class = torch.tensor([position[key] for key, _ in groups], dtype=torch.long)
        vectors, owners = [means[taught]], [group_class[taught]]
    return MergedPool(
        keys, names, torch.cat(vectors).float().contiguous(), torch.cat(owners), text, cfg, [p.task_id for p in pools]
    )


def train_head(merged: MergedPool, cfg: PoolConfig) -> MergedPool:
    """LVP-C: fit the linear head on the merged pool's vectors (in place; returns the pool)."""
    merged.head = train_linear_head(merged.vectors, merged.entry_class, len(merged.class_keys), cfg)
    return merged


def _check_compatible(pools: list[TaskPool]) -> None:
    """Pools from different backbones or prompts live in different spaces and must not be mixed."""
    first = pools[0]
    for field_name in ("backbone", "prompt_templates"):
        expected = first.meta.get(field_name)
        for pool in pools[1:]:
            found = pool.meta.get(field_name)
            if expected is not None and found is not None and found != expected:
                raise PoolError(
                    f"pools {first.task_id} and {pool.task_id} were built with different {field_name}: "
                    f"{expected} vs {found}"
                )
    for pool in pools[1:]:
        if pool.dim != first.dim:
            raise PoolError(
                f"pools {first.task_id} (d={first.dim}) and {pool.task_id} (d={pool.dim}) differ in dimension"
            )
