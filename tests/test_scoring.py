"""Scoring against merged pools (components/model/merged_pool.py) gives the numbers LVP-CLIP's definition gives
(docs/methods/lvp.md; tests/pool_reference.py works them out from each task's own embeddings, never from the merged
pool), for every class asked, in any order, with text fallbacks, while working out the class index once and not
per key and batch."""

from __future__ import annotations

import pytest
import torch

from components.model.merged_pool import merge, train_head
from components.model.pools import PoolConfig, PoolError, build_task_pool
from tests import pool_reference

D = 16
META = {"backbone": {"name": "m", "sha256": "x"}, "prompt_templates": "lvp"}


def _tasks(cfg: PoolConfig, n_tasks: int = 3, classes_per_task: int = 5, per_class: int = 6, seed: int = 0):
    """Random task pools with their embeddings and labels; neighbouring tasks share a class, so merged classes
    have entries from several tasks. A class's text is one vector whichever task brings it (one prompt, one
    text tower)."""
    g = torch.Generator().manual_seed(seed)
    n_keys = n_tasks * (classes_per_task - 1) + 1
    text_of = torch.nn.functional.normalize(torch.randn(n_keys, D, generator=g), dim=-1)
    tasks = []
    for t in range(n_tasks):
        first = t * (classes_per_task - 1)
        keys = [f"d/c{first + i}" for i in range(classes_per_task)]
        labels = torch.arange(classes_per_task).repeat_interleave(per_class)
        e = torch.nn.functional.normalize(torch.randn(len(labels), D, generator=g), dim=-1)
        names = [k.split("/")[1] for k in keys]
        pool = build_task_pool(f"t{t}", e, labels, keys, names, text_of[first : first + classes_per_task], cfg, META)
        tasks.append((pool, e, labels))
    return tasks


def _pools(cfg: PoolConfig, **kwargs):
    return [pool for pool, _, _ in _tasks(cfg, **kwargs)]


CONFIGS = [
    PoolConfig(),
    PoolConfig(metric="l1"),
    PoolConfig(mode="bank"),
    PoolConfig(mode="cluster", clusters=3, cluster_iters=2),
    PoolConfig(mode="bank", metric="l1"),
    PoolConfig(variant="lvp-t"),
    PoolConfig(variant="lvp-it", it_epochs=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-{c.mode}-{c.metric}")
def test_scores_match_the_definition(cfg):
    tasks = _tasks(cfg)
    merged = merge([pool for pool, _, _ in reversed(tasks)], cfg)  # any order: merged in task-id order
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(40, D, generator=g), dim=-1)
    keys = [f"d/c{i}" for i in range(13)]
    assert merged.class_keys == keys  # classes in order of first appearance, tasks in task-id order
    # Pool classes, in pool order, shuffled, a subset, and with classes no pool has (text fallback).
    fallback = {f"d/new{i}": torch.randn(D, generator=g) for i in range(4)}
    shuffled = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
    mixed = [shuffled[0], "d/new2", *shuffled[1:5], "d/new0", "d/new3", shuffled[-1]]
    for asked in (keys, shuffled, shuffled[:3], mixed):
        expected = pool_reference.scores(tasks, cfg, e, asked, fallback)
        first = merged.scores(e, asked, fallback_text=fallback)
        assert first.shape == expected.shape
        assert torch.allclose(first, expected, rtol=0, atol=2e-5)
        # The second call runs from the cached plan and matrices: the same bits.
        assert torch.equal(merged.scores(e, asked, fallback_text=fallback), first)
    expected = pool_reference.scores(tasks, cfg, e, keys)
    assert torch.allclose(merged.scores(e), expected, rtol=0, atol=2e-5)
    assert merged.predict(e) == [keys[i] for i in merged.scores(e).argmax(1).tolist()]


def test_lvp_c_head_scores_match_and_fall_back_without_it():
    cfg = PoolConfig(variant="lvp-c", it_epochs=1, c_epochs=3)
    tasks = _tasks(cfg)
    merged = train_head(merge([pool for pool, _, _ in tasks], cfg), cfg)
    g = torch.Generator().manual_seed(2)
    e = torch.nn.functional.normalize(torch.randn(30, D, generator=g), dim=-1)
    keys = list(merged.class_keys)
    logits = e @ merged.head.weight.T + merged.head.bias  # h(e) = W e + b, one column per pool class
    reordered = keys[::-1][:7]
    assert torch.allclose(merged.scores(e), logits, rtol=0, atol=1e-6)
    assert torch.allclose(merged.scores(e, reordered), logits[:, [keys.index(k) for k in reordered]], atol=1e-6)
    # A class no pool has: the head cannot score it, so nearest entries (LVP-IT's) and the text fallback do.
    fallback = {"d/new": torch.randn(D, generator=g)}
    asked = [*reordered, "d/new"]
    got = merged.scores(e, asked, fallback_text=fallback)
    assert torch.allclose(got, pool_reference.scores(tasks, cfg, e, asked, fallback), rtol=0, atol=2e-5)


def test_plans_and_fallbacks_are_cached_and_checked():
    cfg = PoolConfig()
    merged = merge(_pools(cfg), cfg)
    e = torch.nn.functional.normalize(torch.randn(5, D), dim=-1)
    asked = [merged.class_keys[2], "d/x", merged.class_keys[0]]
    plan = merged.plan(asked)
    assert merged.plan(list(asked)) is plan and plan.fallback_keys == ("d/x",)
    assert plan.columns.tolist() == [2, len(merged.class_keys), 0]
    first = {"d/x": torch.nn.functional.normalize(torch.randn(D), dim=0)}
    a = merged.scores(e, asked, fallback_text=first)
    # Another dict (new weights, another evaluation) is read afresh, never served from the cache.
    second = {"d/x": torch.nn.functional.normalize(torch.randn(D), dim=0)}
    b = merged.scores(e, asked, fallback_text=second)
    assert torch.allclose(b[:, 1], e @ second["d/x"], rtol=0, atol=1e-6)
    assert torch.allclose(a[:, 1], e @ first["d/x"], rtol=0, atol=1e-6)
    with pytest.raises(PoolError, match="'d/x' is in no pool and has no text fallback"):
        merged.scores(e, asked)
