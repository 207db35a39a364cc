"""One task's pool as a value and as a file (components/model/pools.py; its files in docs/contracts.md,
"The learner-state bundle"): the class means at a count of one, a pool saved into a folder that does not exist
yet, its domain kept through the file, the same pool written to the same bytes whatever order its description
was assembled in, and a pool folder missing a file or of another format refused in one line. Expected values
by hand."""

from __future__ import annotations

import torch

from components.model.pools import TaskPool


def _pool(meta=None, domain=None) -> TaskPool:
    sums = torch.tensor([[0.5, 0.25], [3.0, 6.0]], dtype=torch.float64)
    return TaskPool(
        task_id="t-a",
        class_keys=["toy/cat", "toy/dog"],
        class_names=["cat", "dog"],
        sums=sums,
        counts=torch.tensor([1, 3]),
        text=torch.eye(2),
        config={"variant": "lvp-i", "mode": "mean"},
        meta=meta if meta is not None else {"backbone": "tiny", "metric": "cosine"},
        domain=domain,
    )


def test_a_class_seen_once_has_its_one_embedding_as_mean():
    assert torch.allclose(_pool().image_means(), torch.tensor([[0.5, 0.25], [1.0, 2.0]]))


def test_a_pool_saved_into_a_new_nested_folder_loads_back_whole(tmp_path):
    """Every part a mode or variant adds (bank, centroids, LVP-IT scalars) and the domain come back."""
    folder = tmp_path / "state" / "pools" / "new"
    pool = _pool(domain="sketch")
    extras = {
        "bank": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
        "bank_labels": torch.tensor([0, 1, 1]),
        "centroids": torch.tensor([[0.8, 0.6]]),
        "centroid_labels": torch.tensor([1]),
        "it_ab": torch.tensor([[0.5, 1.0], [0.4, 1.1]]),
    }
    for name, value in extras.items():
        setattr(pool, name, value)
    pool.save(folder)
    loaded = TaskPool.load(folder, "t-a")
    assert loaded.domain == "sketch" and loaded.class_keys == ["toy/cat", "toy/dog"]
    assert torch.equal(loaded.sums, pool.sums) and torch.equal(loaded.counts, pool.counts)
    for name, value in extras.items():
        assert torch.equal(getattr(loaded, name), value), name


def test_the_same_pool_is_the_same_bytes_whatever_order_its_description_was_assembled_in(tmp_path):
    one = {"backbone": "tiny", "task": {"task_id": "t-a", "n_train": 4}, "metric": "cosine"}
    other = {"metric": "cosine", "task": {"n_train": 4, "task_id": "t-a"}, "backbone": "tiny"}
    assert one == other
    first, second = _pool(one).save(tmp_path / "a"), _pool(other).save(tmp_path / "b")
    assert first == second  # {file name: sha256} of both files


def test_a_pool_missing_either_file_or_of_another_format_is_refused_in_one_line(tmp_path):
    import json

    import pytest

    from components.model.pools import PoolError

    for missing in ("t-a.safetensors", "t-a.json"):
        folder = tmp_path / missing
        _pool().save(folder)
        (folder / missing).unlink()
        with pytest.raises(PoolError, match=f"^no pool for task 't-a' in {folder}$"):
            TaskPool.load(folder, "t-a")
    folder = tmp_path / "format"
    _pool().save(folder)
    doc = json.loads((folder / "t-a.json").read_text())
    (folder / "t-a.json").write_text(json.dumps({**doc, "format": 2}))
    with pytest.raises(PoolError, match=r"t-a\.json: pool format 2, expected 1$"):
        TaskPool.load(folder, "t-a")
