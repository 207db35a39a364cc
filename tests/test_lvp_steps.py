"""LVP's task steps on the tiny model (docs/methods/lvp.md): a task's pool is encoded by the configured compute
engine and reported, or taken prebuilt (from a copy of the task elsewhere too) and then not reported as built;
the task's classes and the settings are recorded in the state; and one LVP scoring several states (a champion
and a challenger) scores each by its own pools; LVP-C scores through its head; a pool records what it was built
from. Expected scores by hand: cosine to each taught class's mean training embedding (lvp-i), the text prompt
for the others."""

from __future__ import annotations

import pytest
import torch

from components.methods.base import Context
from components.methods.lvp import LVP
from components.model.data import load_task
from components.model.pool_engine import LocalEngine
from components.model.pools import PoolConfig
from components.model.state import LearnerState
from tests.drops import make_task


class RecordingEngine(LocalEngine):
    """The real in-process engine, noting which splits it was asked to encode."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    def partials(self, task, split, ctx, gather):
        self.asked.append((task.task_id, split))
        return super().partials(task, split, ctx, gather)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvp-steps")
    return {
        tid: load_task(make_task(root, tid, classes, train=2, test=1))
        for tid, classes in (("t-a", ["cat", "dog"]), ("t-b", ["emu", "owl"]))
    }


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _learn(backbone, tasks, ctx=None, settings=None) -> LearnerState:
    state = LearnerState(method="lvp", backbone=backbone.reference)
    for task in tasks:
        method = LVP(settings)
        method.begin_task(state, task, ctx or Context(backbone))
        state = method.end_task()
    return state


def test_a_tasks_pool_is_encoded_by_the_configured_engine_and_reported(tiny_backbone, toy):
    engine = RecordingEngine()
    method = LVP(PoolConfig(clusters=3))
    state = LearnerState(method="lvp", backbone=tiny_backbone.reference)
    method.begin_task(state, toy["t-a"], Context(tiny_backbone, pool_engine=engine))
    assert engine.asked == [("t-a", "train")]
    built = method.report().pools
    assert len(built) == 1 and built[0].images == 4  # two classes, two training images each
    state = method.end_task()
    entries = [(c.index, c.key, c.name, c.dataset, c.task_id) for c in state.classes]
    assert entries == [(0, "toy/cat", "cat", "toy", "t-a"), (1, "toy/dog", "dog", "toy", "t-a")]
    assert state.method_settings["clusters"] == 3 and state.method_settings["variant"] == "lvp-i"


def test_a_prebuilt_pool_of_a_copy_of_the_task_elsewhere_is_used_and_not_reported_as_built(
    tiny_backbone, toy, tmp_path
):
    from components.methods.lvp import build_pool

    task = toy["t-a"]
    pool, _ = build_pool(task, Context(tiny_backbone), PoolConfig())
    pool.meta["task"] = {**pool.meta["task"], "location": "/another/worker/cache/t-a"}  # the same task elsewhere
    pool.save(tmp_path)
    engine = RecordingEngine()
    method = LVP()
    state = LearnerState(method="lvp", backbone=tiny_backbone.reference)
    ctx = Context(tiny_backbone, prebuilt_pools={"t-a": str(tmp_path)}, pool_engine=engine)
    method.begin_task(state, task, ctx)
    assert engine.asked == [] and method.report().pools == ()
    state = method.end_task()
    assert torch.equal(state.pools["t-a"].sums, pool.sums) and state.pools["t-a"].meta == pool.meta


def test_one_lvp_scores_each_state_by_its_own_pools(tiny_backbone, toy):
    """A champion that learned t-a, another learner that learned only t-b (as many classes, other ones) and a
    challenger that learned both, scored by one LVP in turn: taught classes by their pools, the others by
    their text."""
    backbone, model = tiny_backbone, tiny_backbone.model
    states = {
        "champion": _learn(backbone, [toy["t-a"]]),
        "other": _learn(backbone, [toy["t-b"]]),
        "challenger": _learn(backbone, [toy["t-a"], toy["t-b"]]),
    }
    taught = {"champion": [0, 1], "other": [2, 3], "challenger": [0, 1, 2, 3]}
    keys = ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    names = {k: k.split("/")[1] for k in keys}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(51))
    with torch.no_grad():
        image = _unit(model.encode_image(x))
        means = []
        for task in (toy["t-a"], toy["t-b"]):
            data = task.dataset_for("train", backbone.preprocess)
            train = _unit(model.encode_image(torch.stack([data[i][0] for i in range(len(data))])))
            labels = torch.tensor([data[i][1] for i in range(len(data))])
            means += [train[labels == c].mean(0) for c in range(2)]
        by_pools = image @ _unit(torch.stack(means)).T
        prompts = [f"a photo of a {n}" for n in names.values()]
        by_text = image @ _unit(model.encode_text(backbone.tokenizer(prompts))).T
        method, ctx = LVP(), Context(backbone)
        for _ in range(2):  # and back again
            for name, state in states.items():
                expected = torch.stack([(by_pools if c in taught[name] else by_text)[:, c] for c in range(4)], dim=1)
                assert torch.allclose(method.scores(state, x, keys, names, ctx), expected, atol=1e-5), name


def test_lvp_c_scores_through_the_head_trained_on_its_merged_pool(tiny_backbone, toy):
    """docs/methods/lvp.md: LVP-C predicts with a linear head trained (with the method's settings) on the merged
    pool's LVP-IT vectors, not by the nearest vector; checked against the merged-pool functions themselves."""
    from components.model.backbones import encode_batch
    from components.model.merged_pool import merge, train_head

    cfg = PoolConfig(variant="lvp-c", it_epochs=2, c_epochs=7, c_lr=0.05, seed=3)
    state = _learn(tiny_backbone, [toy["t-a"], toy["t-b"]], settings=cfg)
    keys = ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(52))
    with torch.no_grad():
        got = LVP(cfg).scores(state, x, keys, {k: k.split("/")[1] for k in keys}, Context(tiny_backbone))
        embeddings = encode_batch(tiny_backbone, x)
        nearest = merge(list(state.pools.values()), cfg).scores(embeddings, keys)
    expected = train_head(merge(list(state.pools.values()), cfg), cfg).scores(embeddings, keys)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, nearest, atol=1e-3)


def test_a_pool_records_what_it_was_built_from_and_uses_the_datasets_own_prompts(tiny_backbone, tmp_path):
    """docs/contracts.md, "The learner-state bundle": a pool's file names its preprocess, prompts, metric and
    variant; with ``templates: task`` its text vectors come from its dataset's own prompts; a bank-mode pool
    holds every training embedding in manifest order; the build is timed."""
    import time

    from components.methods.lvp import build_pool

    task = load_task(make_task(tmp_path, "t-s", ["cat", "dog"], train=2, test=1, domain="sketch"))
    prompts = ["a drawing of a {}."]
    ctx = Context(tiny_backbone, templates="task", task_prompts={"toy": prompts})
    cfg = PoolConfig(mode="bank", metric="l1")
    started = time.perf_counter()
    pool, stats = build_pool(task, ctx, cfg)
    assert 0 <= stats.seconds <= time.perf_counter() - started and stats.images == 4
    model = tiny_backbone.model
    with torch.no_grad():
        text = _unit(model.encode_text(tiny_backbone.tokenizer(["a drawing of a cat.", "a drawing of a dog."])))
        data = task.dataset_for("train", tiny_backbone.preprocess)
        train = _unit(model.encode_image(torch.stack([data[i][0] for i in range(len(data))])))
    assert torch.allclose(pool.text, text, atol=1e-5)
    assert torch.allclose(pool.bank, train, atol=1e-5)
    assert torch.equal(pool.bank_labels, torch.tensor([data[i][1] for i in range(len(data))]))
    assert pool.domain == "sketch"
    assert pool.meta["preprocess"] == repr(tiny_backbone.preprocess)
    assert pool.meta["prompt_templates"] == prompts
    assert (pool.meta["metric"], pool.meta["variant"]) == ("l1", "lvp-i")
    # With a named template set, the pool names the set, whatever prompts the datasets bring.
    named = Context(tiny_backbone, task_prompts={"toy": prompts})
    assert build_pool(task, named, PoolConfig())[0].meta["prompt_templates"] == Context.templates
