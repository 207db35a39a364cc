"""A merged pool scoring classes it has no entry for (components/model/merged_pool.py; docs/methods/lvp.md: such a
class is scored zero-shot, by the cosine with its text vector): asked about different untaught classes in turn
with the same dictionary of text vectors, as an evaluation of several label spaces does, each column is its
own class's. Expected scores by hand."""

from __future__ import annotations

import torch

from components.model.merged_pool import merge
from components.model.pools import PoolConfig, TaskPool


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_each_asked_untaught_class_is_scored_by_its_own_text_vector():
    pool = TaskPool(
        task_id="t-a",
        class_keys=["toy/cat", "toy/dog"],
        class_names=["cat", "dog"],
        sums=torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64),
        counts=torch.tensor([2, 3]),
        text=torch.eye(3)[:2],
        config={},
    )
    merged = merge([pool], PoolConfig())  # lvp-i, mean: cat = e1, dog = e2
    fallback = {"toy/emu": torch.tensor([0.0, 0.0, 2.0]), "toy/owl": torch.tensor([1.0, 1.0, 1.0])}
    images = _unit(torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]]))
    for asked in (["toy/cat", "toy/emu"], ["toy/cat", "toy/owl"], ["toy/owl", "toy/emu", "toy/dog"]):
        vectors = torch.stack([{"toy/cat": torch.eye(3)[0], "toy/dog": torch.eye(3)[1], **fallback}[k] for k in asked])
        expected = images @ _unit(vectors).T
        assert torch.allclose(merged.scores(images, asked, fallback_text=fallback), expected, atol=1e-6), asked


def test_an_unknown_metric_is_refused_naming_it():
    import pytest

    from components.model.merged_pool import similarity
    from components.model.pools import PoolError

    with pytest.raises(PoolError, match="^unknown metric 'l2'$"):
        similarity(torch.eye(2), torch.eye(2), "l2")
