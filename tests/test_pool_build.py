"""Building one task's pool (components/model/pools.py; docs/methods/lvp.md): which settings need every training
embedding rather than per-class sums, and cluster mode's centroids belonging to their own class, or none for
a task without embeddings. Expected values by hand."""

from __future__ import annotations

import pytest
import torch

from components.model.pools import PoolConfig, build_task_pool, needs_embeddings


@pytest.mark.parametrize(
    "settings, needed",
    [
        ({"variant": "lvp-i", "mode": "mean"}, False),  # a class mean is its sum over its count
        ({"variant": "lvp-t", "mode": "mean"}, False),
        ({"variant": "lvp-i", "mode": "bank"}, True),  # every embedding is an entry
        ({"variant": "lvp-i", "mode": "cluster"}, True),  # k-means runs over the embeddings
        ({"variant": "lvp-it", "mode": "mean"}, True),  # its scalars train on the embeddings
        ({"variant": "lvp-c", "mode": "mean"}, True),  # it needs the LVP-IT scalars
    ],
)
def test_only_bank_cluster_lvp_it_and_lvp_c_need_every_embedding(settings, needed):
    assert needs_embeddings(PoolConfig(**settings)) is needed


def test_a_single_centroid_per_class_is_that_class_mean():
    """k-means with k = 1 converges to the mean of the class's own embeddings (one mean update)."""
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    cfg = PoolConfig(mode="cluster", clusters=1)
    pool = build_task_pool("t-a", embeddings, labels, ["toy/cat", "toy/dog"], ["cat", "dog"], torch.eye(2), cfg)
    assert torch.equal(pool.centroid_labels, torch.tensor([0, 1]))
    expected = torch.tensor([[2.8 / 3, 0.6 / 3], [0.3, 0.9]])
    assert torch.allclose(pool.centroids, expected)


def test_a_task_without_embeddings_gives_a_cluster_pool_without_entries():
    """No training image: no centroid at all, with the pool's width, and no owner."""
    cfg = PoolConfig(mode="cluster", clusters=2)
    pool = build_task_pool(
        "t-a", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ["toy/cat"], ["cat"], torch.eye(3)[:1], cfg
    )
    assert pool.centroids.shape == (0, 3) and pool.centroid_labels.shape == (0,)
    assert pool.centroid_labels.dtype == torch.long
