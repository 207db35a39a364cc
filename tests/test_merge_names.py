"""Merging task pools (components/model/merged_pool.py, ``merge``; docs/methods/lvp.md): the merged class table
keeps each class's display name and text vector as first declared, in task-id order; a class taught by a
single image still gets its entry (lvp-i mean, lvp-it); and the refusals (no pools, two pools of one task, a
pool built without what the variant or mode needs) in one line that says what the pool was built as.
Expected values by hand."""

from __future__ import annotations

import pytest
import torch

from components.model.merged_pool import merge
from components.model.pools import PoolConfig, PoolError, TaskPool


def _pool(task_id: str, keys: list[str], names: list[str], text=None, sums=None, counts=None, **extra) -> TaskPool:
    n = len(keys)
    return TaskPool(
        task_id=task_id,
        class_keys=keys,
        class_names=names,
        sums=sums if sums is not None else torch.ones(n, 2, dtype=torch.float64),
        counts=counts if counts is not None else torch.ones(n, dtype=torch.int64),
        text=text if text is not None else torch.ones(n, 2),
        config=extra.pop("config", {}),
        **extra,
    )


def test_the_merged_class_table_keeps_the_first_declared_names_and_text_in_task_id_order():
    later = _pool("t-b", ["toy/dog", "toy/emu"], ["Dog (again)", "emu"], text=torch.tensor([[9.0, 9.0], [0.0, 3.0]]))
    first = _pool("t-a", ["toy/cat", "toy/dog"], ["cat", "dog"], text=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    merged = merge([later, first], PoolConfig())  # arrival order does not matter: t-a comes first
    assert merged.class_keys == ["toy/cat", "toy/dog", "toy/emu"]
    assert merged.class_names == ["cat", "dog", "emu"]
    assert torch.equal(merged.text, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]]))


def test_a_class_taught_by_one_image_has_its_entry():
    sums = torch.tensor([[0.6, 0.8], [3.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([1, 3])
    pool = _pool("t-a", ["toy/cat", "toy/dog"], ["cat", "dog"], text=torch.eye(2), sums=sums, counts=counts)
    mean = merge([pool], PoolConfig())  # lvp-i, mean: i_c = sum / count
    assert torch.allclose(mean.vectors, torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    assert torch.equal(mean.entry_class, torch.tensor([0, 1]))
    pool.it_ab = torch.tensor([[0.5, 2.0], [1.0, 1.0]])  # u_c = a_c t_c + b_c i_c
    it = merge([pool], PoolConfig(variant="lvp-it"))
    cat = [0.5 * 1 + 2 * 0.6, 0.5 * 0 + 2 * 0.8]  # t = (1, 0), i = (0.6, 0.8)
    dog = [1 * 0 + 1 * 1.0, 1 * 1 + 1 * 0.0]  # t = (0, 1), i = (1, 0)
    assert torch.allclose(it.vectors, torch.tensor([cat, dog]))
    assert torch.equal(it.entry_class, torch.tensor([0, 1]))


def test_merging_nothing_or_one_task_twice_is_refused_in_one_line():
    with pytest.raises(PoolError, match="^no pools to merge$"):
        merge([], PoolConfig())
    twice = [_pool("t-a", ["toy/cat"], ["cat"]), _pool("t-a", ["toy/cat"], ["cat"])]
    with pytest.raises(PoolError, match="^two pools have the same task id$"):
        merge(twice, PoolConfig())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"variant": "lvp-it"}, r"^pool t-a has no LVP-IT scalars \(built as lvp-i\)$"),
        ({"mode": "bank"}, r"^pool t-a has no bank \(built in mode mean\)$"),
        ({"mode": "cluster"}, r"^pool t-a has no centroids \(built in mode mean\)$"),
    ],
)
def test_a_pool_built_without_what_the_settings_need_is_refused_saying_how_it_was_built(settings, message):
    built_plain = _pool("t-a", ["toy/cat"], ["cat"], config={"variant": "lvp-i", "mode": "mean"})
    with pytest.raises(PoolError, match=message):
        merge([built_plain], PoolConfig(**settings))
