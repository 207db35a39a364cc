"""Merging task pools (components/model/merged_pool.py, ``merge``): the merged class table keeps each class's
display name as first declared, in task-id order; and the two refusals, no pools and two pools of one task, in
one line."""

from __future__ import annotations

import pytest
import torch

from components.model.merged_pool import merge
from components.model.pools import PoolConfig, PoolError, TaskPool


def _pool(task_id: str, keys: list[str], names: list[str]) -> TaskPool:
    n = len(keys)
    return TaskPool(
        task_id=task_id,
        class_keys=keys,
        class_names=names,
        sums=torch.ones(n, 2, dtype=torch.float64),
        counts=torch.ones(n, dtype=torch.int64),
        text=torch.ones(n, 2),
        config={},
    )


def test_the_merged_class_table_keeps_the_first_declared_names_in_task_id_order():
    later = _pool("t-b", ["toy/dog", "toy/emu"], ["Dog (again)", "emu"])
    first = _pool("t-a", ["toy/cat", "toy/dog"], ["cat", "dog"])
    merged = merge([later, first], PoolConfig())  # arrival order does not matter: t-a comes first
    assert merged.class_keys == ["toy/cat", "toy/dog", "toy/emu"]
    assert merged.class_names == ["cat", "dog", "emu"]


def test_merging_nothing_or_one_task_twice_is_refused_in_one_line():
    with pytest.raises(PoolError, match="^no pools to merge$"):
        merge([], PoolConfig())
    twice = [_pool("t-a", ["toy/cat"], ["cat"]), _pool("t-a", ["toy/cat"], ["cat"])]
    with pytest.raises(PoolError, match="^two pools have the same task id$"):
        merge(twice, PoolConfig())
