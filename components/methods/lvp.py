"""LVP-CLIP (docs/methods/lvp.md): a frozen CLIP whose classes are represented by label vectors built from
training-image embeddings. A task adds the vectors of its own classes and touches nothing else, so
tasks can be learned in any order, or in parallel, with the same result.
"""

from __future__ import annotations

import json
import time

import torch

from components.methods import register_method
from components.methods.base import Context, Method, MethodReport, PoolStats
from components.model.merged_pool import MergedPool, merge, train_head
from components.model.pools import PoolConfig, TaskPool, needs_embeddings, pool_from_sums


def build_pool(task, ctx: Context, cfg: PoolConfig, engine=None) -> tuple[TaskPool, PoolStats]:
    """The task's pool, from its training images alone, and how fast they were encoded: per shard, reduced in
    shard order. ``engine`` encodes the shards: ``ctx.pool_engine`` (``compute.engine``) for a pool of the
    configured base encoder, whose weights Ray's actors load themselves; None: this process, with
    ``ctx.backbone`` as it is (a fine-tuned encoder's pools). With ``ctx.embedding_cache`` the embeddings are read
    from it, or encoded by the engine and stored (components/model/embedding_cache.py)."""
    from components.model.embedding_cache import pool_partials
    from components.model.pool_engine import REDUCE, reduce_partials

    started = time.perf_counter()
    gather = needs_embeddings(cfg)
    partials = pool_partials(ctx, task, "train", engine, gather)  # the embedding cache's, when the context has it
    reduced = reduce_partials(partials, len(task.class_keys), ctx.backbone.embed_dim, gather)
    stats = PoolStats(images=int(reduced.counts.sum()), seconds=time.perf_counter() - started)
    text = ctx.text_embeddings(task.class_names, task.dataset)
    backbone = ctx.backbone
    prompts = ctx.task_prompts.get(task.dataset) if ctx.templates == "task" else None
    meta = {
        "backbone": backbone.reference,
        "preprocess": repr(backbone.preprocess),
        "decoder": ctx.decoder,  # what the images were decoded with (components/model/data.py)
        "reduce": REDUCE,  # sums added up per shard, in shard order (components/model/pool_engine.py)
        "prompt_templates": prompts or ctx.templates,
        "metric": cfg.metric,
        "variant": cfg.variant,
        "task": task.summary(),
    }
    pool = pool_from_sums(
        task.task_id,
        reduced.sums,
        reduced.counts,
        reduced.embeddings,
        reduced.labels,
        task.class_keys,
        task.class_names,
        text,
        cfg,
        meta,
        domain=task.domain,
    )
    return pool, stats


@register_method("lvp")
class LVP(Method):
    summary = "LVP-CLIP: frozen CLIP, per-task label-vector pools of image embeddings (order-invariant, parallel)"
    Settings = PoolConfig
    trains = False
    builds_pools = True
    trained = frozenset({"pools"})

    def __init__(self, settings=None):
        super().__init__(settings)
        self._merged_cache: tuple[tuple[str, ...], MergedPool] | None = None
        self._built: tuple[PoolStats, ...] = ()  # this task's pool build, when it was not prebuilt
        # The label space of the evaluation under way: (state, ctx, its class count, asked keys) -> fallbacks.
        self._label_space: tuple | None = None

    def build_pool(self, task, ctx: Context) -> tuple[TaskPool, PoolStats]:
        return build_pool(task, ctx, self.settings, ctx.pool_engine)  # LVP's pools: the base encoder

    def begin_task(self, state, task, ctx: Context) -> None:
        self._state, self._task = state, task
        self._built = ()
        if task.task_id in ctx.prebuilt_pools:
            self._pool = self.prebuilt(task, ctx)
        else:
            self._pool, stats = self.build_pool(task, ctx)
            self._built = (stats,)

    def prebuilt(self, task, ctx: Context) -> TaskPool:
        """A pool built by the pipeline's build_pool step (maybe on another worker): checked before use."""
        from components.model.pool_engine import REDUCE
        from components.model.pools import PoolError

        pool = TaskPool.load(ctx.prebuilt_pools[task.task_id], task.task_id)
        expected = {
            "config": self.settings.model_dump(mode="json"),
            "backbone": ctx.backbone.reference,
            "decoder": ctx.decoder,
            "reduce": REDUCE,
            "classes": task.class_keys,
            "task": _placeless(task.summary()),
        }
        found = {
            "config": pool.config,
            "backbone": pool.meta.get("backbone"),
            "decoder": pool.meta.get("decoder"),
            "reduce": pool.meta.get("reduce"),
            "classes": pool.class_keys,
            "task": _placeless(pool.meta.get("task") or {}),
        }
        for name in expected:
            if json.dumps(expected[name], sort_keys=True, default=str) != json.dumps(
                found[name], sort_keys=True, default=str
            ):
                raise PoolError(
                    f"prebuilt pool of {task.task_id} in {ctx.prebuilt_pools[task.task_id]}: its {name} "
                    f"does not match this run's (built with other settings or another model)"
                )
        return pool

    def end_task(self):
        state, task = self._state, self._task
        state.pools[task.task_id] = self._pool
        state.add_classes(task.task_id, task.dataset, list(zip(task.class_keys, task.class_names)))
        state.tasks.append(task.summary())
        state.method_settings = self.settings.model_dump(mode="json")
        self._merged_cache = None
        self._label_space = None
        return state

    def report(self) -> MethodReport:
        return MethodReport(pools=self._built)

    def merged(self, state):
        key = tuple(sorted(state.pools))
        if self._merged_cache is None or self._merged_cache[0] != key:
            merged = merge(list(state.pools.values()), self.settings)
            if self.settings.variant == "lvp-c":
                train_head(merged, self.settings)
            self._merged_cache = (key, merged)
        return self._merged_cache[1]

    def scores(self, state, images, class_keys, class_names, ctx: Context) -> torch.Tensor:
        from components.model.backbones import encode_batch

        return self.embedding_scores(state, encode_batch(ctx.backbone, images), class_keys, class_names, ctx)

    def embedding_scores(self, state, embeddings, class_keys, class_names, ctx: Context) -> torch.Tensor:
        fallback, text = self.label_space(state, class_keys, class_names, ctx)
        if not state.pools:
            return embeddings @ text.T
        return self.merged(state).scores(embeddings, class_keys, fallback_text=fallback)

    def label_space(self, state, class_keys, class_names, ctx: Context):
        """Text vectors of the asked classes no task has taught yet (scored zero-shot, as LVP-T), worked out
        once per evaluation, not per batch: the same state, context and keys give the same answer."""
        key = (len(state.classes), bool(state.pools), tuple(class_keys))
        cached = self._label_space
        if cached is None or cached[0] is not state or cached[1] is not ctx or cached[2] != key:
            known = state.class_index()
            fallback = self.key_text([k for k in class_keys if k not in known], class_names, ctx)
            text = None if state.pools else torch.stack([fallback[k] for k in class_keys])
            cached = self._label_space = (state, ctx, key, fallback, text)
        return cached[3], cached[4]


def _placeless(summary: dict) -> dict:
    """A task's summary without its folder: a pool built from a copy of the task elsewhere (another worker's
    cache) is the same pool."""
    return {k: v for k, v in summary.items() if k != "location"}
