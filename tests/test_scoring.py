"""Scoring against merged pools (components/model/merged_pool.py) gives the same numbers as scoring every asked class
on its own, the straightforward way, while working out the class index once and not per key and batch."""

from __future__ import annotations

import pytest
import torch

from components.model.merged_pool import MergedPool, merge, per_class_max, similarity, train_head
from components.model.pools import PoolConfig, PoolError, build_task_pool

D = 16
META = {"backbone": {"name": "m", "sha256": "x"}, "prompt_templates": "lvp"}


def _pools(cfg: PoolConfig, n_tasks: int = 3, classes_per_task: int = 5, per_class: int = 6, seed: int = 0):
    """Random task pools; neighbouring tasks share a class, so merged classes have entries from several tasks."""
    g = torch.Generator().manual_seed(seed)
    pools = []
    for t in range(n_tasks):
        keys = [f"d/c{t * (classes_per_task - 1) + i}" for i in range(classes_per_task)]
        labels = torch.arange(classes_per_task).repeat_interleave(per_class)
        e = torch.nn.functional.normalize(torch.randn(len(labels), D, generator=g), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(classes_per_task, D, generator=g), dim=-1)
        names = [k.split("/")[1] for k in keys]
        pools.append(build_task_pool(f"t{t}", e, labels, keys, names, text, cfg, META))
    return pools


def reference_scores(pool: MergedPool, embeddings, keys, fallback_text=None) -> torch.Tensor:
    """Every asked class scored on its own: the pool's best entry, or its fallback text, one column at a time."""
    position = {k: i for i, k in enumerate(pool.class_keys)}
    embeddings = embeddings.float()
    if pool.head is not None and all(k in position for k in keys):
        return pool.head(embeddings)[:, [position[k] for k in keys]]
    best = per_class_max(similarity(embeddings, pool.vectors, pool.cfg.metric), pool.entry_class, len(pool.class_keys))
    columns = []
    for key in keys:
        if key in position:
            columns.append(best[:, position[key]])
        elif fallback_text and key in fallback_text:
            columns.append(similarity(embeddings, fallback_text[key][None].float(), pool.cfg.metric)[:, 0])
        else:
            raise PoolError(f"class {key!r} is in no pool and has no text fallback")
    return torch.stack(columns, dim=1)


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
def test_scores_match_the_per_class_reference(cfg):
    merged = merge(_pools(cfg), cfg)
    g = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(40, D, generator=g), dim=-1)
    keys = list(merged.class_keys)
    # Pool classes, in pool order, shuffled, a subset, and with classes no pool has (text fallback).
    fallback = {f"d/new{i}": torch.randn(D, generator=g) for i in range(4)}
    shuffled = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
    mixed = [shuffled[0], "d/new2", *shuffled[1:5], "d/new0", "d/new3", shuffled[-1]]
    for asked in (keys, shuffled, shuffled[:3], mixed):
        for _ in range(2):  # the second call runs from the cached plan and matrices
            got = merged.scores(e, asked, fallback_text=fallback)
            expected = reference_scores(merged, e, asked, fallback)
            learned = [i for i, k in enumerate(asked) if k in merged.position]
            assert got.shape == expected.shape
            assert torch.equal(got[:, learned], expected[:, learned])  # bit-identical
            texts = [i for i, k in enumerate(asked) if k not in merged.position]
            if cfg.metric == "l1" or not texts:
                assert torch.equal(got[:, texts], expected[:, texts])
            else:
                # Cosine fallbacks are one matmul, not one matrix-vector product per class: the same up to
                # the float rounding of the summation order.
                assert torch.allclose(got[:, texts], expected[:, texts], rtol=0, atol=1e-6)
                stacked = torch.stack([fallback[asked[i]] for i in texts])
                assert torch.equal(got[:, texts], similarity(e, stacked, "cosine"))
    assert torch.equal(merged.scores(e), reference_scores(merged, e, keys))
    assert merged.predict(e) == [keys[i] for i in reference_scores(merged, e, keys).argmax(1).tolist()]


def test_lvp_c_head_scores_match_and_fall_back_without_it():
    cfg = PoolConfig(variant="lvp-c", it_epochs=1, c_epochs=3)
    merged = train_head(merge(_pools(cfg), cfg), cfg)
    g = torch.Generator().manual_seed(2)
    e = torch.nn.functional.normalize(torch.randn(30, D, generator=g), dim=-1)
    keys = list(merged.class_keys)
    reordered = keys[::-1][:7]
    assert torch.equal(merged.scores(e), reference_scores(merged, e, keys))
    assert torch.equal(merged.scores(e, reordered), reference_scores(merged, e, reordered))
    # A class no pool has: the head cannot score it, so nearest entries and the text fallback do.
    fallback = {"d/new": torch.randn(D, generator=g)}
    asked = [*reordered, "d/new"]
    got = merged.scores(e, asked, fallback_text=fallback)
    assert torch.equal(got[:, :-1], reference_scores(merged, e, asked, fallback)[:, :-1])
    assert not torch.equal(got[:, :-1], merged.scores(e, reordered))  # not the head's logits


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
