"""LVP-CLIP as a method on the tiny model (docs/methods/lvp.md): classes a task taught are scored by their label
vectors, the others zero-shot by their text; and a pool built elsewhere is used only when everything it was built
from matches this run. The pools' own mathematics are in tests/test_pools.py."""

from __future__ import annotations

import pytest
import torch

from components.model.pools import PoolConfig, PoolError


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_lvp_scores_taught_classes_by_their_pool_and_the_others_by_their_text(tiny_backbone, tmp_path):
    from components.methods.base import Context
    from components.methods.lvp import LVP
    from components.model.data import load_task
    from components.model.state import LearnerState
    from tests.drops import make_task

    task = load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=3, test=1))
    model, ctx, method = tiny_backbone.model, Context(tiny_backbone), LVP()
    keys, names = ["toy/cat", "toy/dog", "toy/emu"], {"toy/cat": "cat", "toy/dog": "dog", "toy/emu": "emu"}
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        image = _unit(model.encode_image(x))
        text = _unit(model.encode_text(tiny_backbone.tokenizer([f"a photo of a {n}" for n in names.values()])))
        dataset = task.dataset_for("train", tiny_backbone.preprocess)
        train = _unit(model.encode_image(torch.stack([dataset[i][0] for i in range(len(dataset))])))
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        state = LearnerState(method="lvp", backbone=tiny_backbone.reference)
        assert torch.allclose(method.scores(state, x, keys, names, ctx), image @ text.T, atol=1e-5)  # zero-shot
        method.begin_task(state, task, ctx)
        state = method.end_task()
        means = torch.stack([train[labels == c].mean(0) for c in range(2)])
        expected = torch.cat([image @ _unit(means).T, image @ text[2:].T], dim=1)
        assert torch.allclose(method.scores(state, x, keys, names, ctx), expected, atol=1e-5)
        assert torch.allclose(method.scores(state, x, keys[::-1], names, ctx), expected.flip(1), atol=1e-5)


@pytest.fixture(scope="module")
def built(tiny_backbone, tmp_path_factory):
    from components.methods.base import Context
    from components.methods.lvp import build_pool
    from components.model.data import load_task
    from tests.drops import make_task

    task = load_task(make_task(tmp_path_factory.mktemp("prebuilt"), "t-a", ["cat", "dog"], train=2, test=1))
    pool, _ = build_pool(task, Context(tiny_backbone), PoolConfig(clusters=3))
    return task, pool


CHANGES = {  # what another run may have built a pool with, and how the pool records it
    "config": lambda pool: None,  # the pool as built; the run asks for other settings (below)
    "backbone": lambda pool: pool.meta.update(backbone={**pool.meta["backbone"], "sha256": "0" * 64}),
    "decoder": lambda pool: pool.meta.update(decoder="pillow"),
    "reduce": lambda pool: pool.meta.update(reduce="arrival order"),
    "classes": lambda pool: pool.class_keys.reverse(),
    "task": lambda pool: pool.meta.update(task={**pool.meta["task"], "n_train": 5}),
}


@pytest.mark.parametrize("field", CHANGES)
def test_a_prebuilt_pool_is_used_only_when_everything_it_was_built_from_matches(field, built, tiny_backbone, tmp_path):
    import copy

    from components.methods.base import Context
    from components.methods.lvp import LVP

    task, pool = built
    ctx = Context(tiny_backbone, prebuilt_pools={"t-a": str(tmp_path)})
    pool.save(tmp_path)
    assert LVP(PoolConfig(clusters=3)).prebuilt(task, ctx).class_keys == pool.class_keys
    changed = copy.deepcopy(pool)
    CHANGES[field](changed)
    changed.save(tmp_path)
    settings = PoolConfig(clusters=4) if field == "config" else PoolConfig(clusters=3)
    with pytest.raises(PoolError, match=f"prebuilt pool of t-a in .*: its {field} does not match this run's"):
        LVP(settings).prebuilt(task, ctx)
