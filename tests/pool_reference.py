"""LVP-CLIP's pool entries and scores by their definition (docs/methods/lvp.md), from each task's own training
embeddings and labels, never from a merged pool: what tests/test_pools.py and tests/test_scoring.py hold the
merged pools to. Only what a task pool holds that the definition cannot recompute simply is read from it: the
k-means centroids (checked on their own in tests/test_pools.py) and the trained LVP-IT scalars."""

from __future__ import annotations

import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def entries(tasks, cfg) -> dict[str, list[torch.Tensor]]:
    """Class key -> its label vectors. ``tasks``: (task pool, its embeddings, their labels into its classes)."""
    tasks = sorted(tasks, key=lambda t: t[0].task_id)  # the text of a class: the first task's, in task-id order
    out: dict[str, list[torch.Tensor]] = {}
    if cfg.variant == "lvp-t":
        for pool, _, _ in tasks:
            for c, key in enumerate(pool.class_keys):
                out.setdefault(key, [pool.text[c]])
        return out
    if cfg.variant == "lvp-i" and cfg.mode == "mean":  # one mean per (class, domain) over every task
        members: dict[tuple[str, str | None], list[torch.Tensor]] = {}
        for pool, e, labels in tasks:
            for c, key in enumerate(pool.class_keys):
                if (labels == c).any():
                    members.setdefault((key, pool.domain), []).append(e[labels == c].double())
        for (key, _), rows in members.items():
            out.setdefault(key, []).append(torch.cat(rows).mean(0).float())
        return out
    for pool, e, labels in tasks:
        for c, key in enumerate(pool.class_keys):
            if cfg.variant in ("lvp-it", "lvp-c"):  # u = a t + b i per (class, task), i the task's class mean
                if (labels == c).any():
                    a, b = pool.it_ab[c]
                    out.setdefault(key, []).append(a * pool.text[c] + b * e[labels == c].mean(0))
            elif cfg.mode == "bank":
                out.setdefault(key, []).extend(e[labels == c])
            else:  # cluster
                out.setdefault(key, []).extend(pool.centroids[pool.centroid_labels == c])
    return out


def similarity(e: torch.Tensor, v: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M]: cosine with each vector, or negative L1 distance (the embeddings are already unit length)."""
    if metric == "cosine":
        return e @ unit(v).T
    return -(e[:, None, :] - v[None, :, :]).abs().sum(-1)


def scores(tasks, cfg, e, keys, fallback=None) -> torch.Tensor:
    """[N, len(keys)]: each asked class's best entry; a class no task taught, its fallback text's similarity."""
    table = entries(tasks, cfg)
    columns = []
    for key in keys:
        vectors = table.get(key) or [fallback[key]]
        columns.append(similarity(e, torch.stack(vectors).float(), cfg.metric).max(1).values)
    return torch.stack(columns, dim=1)
