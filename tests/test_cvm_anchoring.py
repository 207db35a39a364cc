"""CVM's concept anchoring (docs/methods/cvm.md, "Our design"): the pull of each mapped image to its concept and the
drift of its cosines to the old concepts, against hand computations on small tensors and on the tiny model's own
forward passes; balanced and mixed replay; and the first design (anchoring weights and memory at 0) giving exactly
the loss it gave before the anchoring existed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.methods import cvm
from components.settings.config_loading import load_config
from tests.conftest import tiny_overrides
from tests.method_harness import Bench, ce_ls, images, learned, nudge, tasks, text_features, unit

# ---- the terms, by hand ------------------------------------------------------------------------------------


def test_concept_pull_is_the_mean_cosine_distance_to_each_rows_own_concept():
    mapped = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]])  # lengths 5, 2, 1: only directions count
    own = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    # cosines 3/5, 1, -1: distances 0.4, 0, 2
    assert cvm.concept_pull(mapped, own).item() == pytest.approx((0.4 + 0.0 + 2.0) / 3)


def test_concept_drift_is_the_mean_squared_change_of_the_cosines_to_the_concepts():
    concepts = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # not unit: normalised first
    mapped = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    start = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    r = 2**-0.5
    # row 1: cosines now (1, 0, r), at the start (0, 1, r); row 2 has not moved (a longer vector, same direction)
    expected = ((1 - 0) ** 2 + (0 - 1) ** 2 + (r - r) ** 2 + 0 + 0 + 0) / 6
    assert cvm.concept_drift(mapped, start, concepts).item() == pytest.approx(expected)
    assert cvm.concept_drift(start, start, concepts).item() == 0.0


# ---- in the method ----------------------------------------------------------------------------------------

ABSTRACT = {"pull_weight": 0.0, "drift_weight": 0.0, "memory_per_class": 0}  # the first design
X = images(4, seed=31)
Y = torch.tensor([1, 0, 0, 1])


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("cvm-anchoring")
    return Bench(load_config(overrides=tiny_overrides(tiny_checkpoint), env={}, cwd=root)), tasks(root)


def _mapped(method) -> torch.Tensor:
    """unit(P g(x)) by hand: the image tower's raw output, then the map (d_LM, d_visual)."""
    raw = method.model.encode_image(X).float()
    return unit((method.projection.detach() @ raw.T).T)


def test_the_pull_term_is_its_weight_times_the_mean_cosine_distance_to_the_label_concepts(setting):
    bench, data = setting
    method = bench.begin("cvm", {"tau": 0.2, "pull_weight": 0.3, "drift_weight": 0.5}, data["t-a"])
    with torch.no_grad():  # a non-symmetric map: a transposed P gives other values
        method.projection.copy_(torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    concepts = text_features(bench.backbone, ["a photo of a cat", "a photo of a dog"])
    losses = method.training_step((X, Y))
    assert set(losses) == {"ce", "pull"}  # no old concepts on the first task: no drift term
    z = _mapped(method)
    expected = 0.3 * (1 - (z * concepts[Y]).sum(1)).mean()
    assert losses["pull"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(ce_ls(z @ concepts.T / 0.2, Y, 0.0).item(), rel=1e-5)


def test_the_drift_term_compares_cosines_to_the_old_concepts_with_the_tasks_start(setting):
    """Second task: the old concepts are the first task's (cat, dog); the start is the image tower and map the
    task began with, so the term is 0 before any step and (cos - cos₀)² averaged after the weights moved."""
    bench, data = setting
    state = learned("cvm", bench.backbone, data["t-a"])
    method = bench.begin("cvm", {"pull_weight": 0.0, "drift_weight": 0.7}, data["t-b"], state)
    old = text_features(bench.backbone, ["a photo of a cat", "a photo of a dog"])
    assert method.training_step((X, Y))["drift"].item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        z0 = _mapped(method)
    nudge([p for _, p in method.trainable_parameters()], seed=4, size=0.2)
    losses = method.training_step((X, Y))
    assert set(losses) == {"ce", "drift"}  # pull_weight 0: left out
    with torch.no_grad():
        z1 = _mapped(method)
    expected = 0.7 * ((z1 @ old.T - z0 @ old.T) ** 2).mean()
    assert expected.item() > 1e-4  # the nudge moved the images relative to the concepts
    assert losses["drift"].item() == pytest.approx(expected.item(), rel=1e-4)
    losses["drift"].backward()  # the start is frozen: the gradient reaches the trained tower and map only
    assert method.projection.grad is not None and method.projection.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in method.start[0].parameters())


def _abstract_step(method, batch) -> dict:
    """CVM's training step before concept anchoring existed (one process), written out as it was."""
    images, labels = batch[:2]
    mapped = method.model.encode_image(images).float() @ method.projection.T
    logits = cvm.concept_logits(mapped, method.targets, method.settings.tau)
    return {"ce": F.cross_entropy(logits, labels, label_smoothing=method.settings.label_smoothing)}


def test_the_first_design_gives_exactly_its_old_loss_on_both_tasks_and_keeps_no_memory(setting):
    bench, data = setting
    settings = {**ABSTRACT, "tau": 0.2, "label_smoothing": 0.1}
    first = bench.begin("cvm", settings, data["t-a"])
    second = bench.begin("cvm", settings, data["t-b"], learned("cvm", bench.backbone, data["t-a"]))
    for method in (first, second):
        nudge([p for _, p in method.trainable_parameters()], seed=5)
        got, old = method.training_step((X, Y)), _abstract_step(method, (X, Y))
        assert set(got) == {"ce"}
        assert torch.equal(got["ce"], old["ce"])
        assert method.start is None  # no frozen copy is made
    state = first.end_task()
    assert "memory" not in state.method_meta


def test_by_default_cvm_keeps_a_herding_memory_of_every_class(setting):
    """Replay is the paper's sampling strategy: the first task's classes are in the memory the next task mixes in."""
    bench, data = setting
    state = bench.begin("cvm", {"memory_per_class": 3}, data["t-a"]).end_task()
    assert [m["class_key"] for m in state.method_meta["memory"]] == ["toy/cat"] * 3 + ["toy/dog"] * 3
    assert cvm.CVMSettings().memory_per_class > 0 and cvm.CVMSettings().pull_weight > 0


def test_balanced_replay_repeats_the_memory_to_the_tasks_size_and_mixed_keeps_each_row_once(setting):
    """replay: balanced draws as many old samples as new ones on average (the memory repeated, round(8 / 4) = 2
    times here); mixed puts each stored sample once among the task's."""
    from components.methods import get_method
    from components.methods.base import Context

    bench, data = setting
    first = bench.begin("cvm", {"memory_per_class": 2}, data["t-a"])
    state = first.end_task()
    memory = [(m["task_id"], m["row"]) for m in state.method_meta["memory"]]
    assert len(memory) == 4
    ctx = Context(bench.backbone, batch_size=16, locate_task={"t-a": data["t-a"]}.__getitem__)
    for replay, times in (("balanced", 2), ("mixed", 1)):
        method = get_method("cvm")({"memory_per_class": 2, "replay": replay})
        method.begin_task(state, data["t-b"], ctx)
        parts = method.train_dataset().dataset.datasets
        assert len(parts[0]) == 8  # the task's own images, once
        assert sorted(("t-a", r) for p in parts[1:] for r in p.rows) == sorted(memory * times)
        labels = [method.label_keys[p.mapping[p.dataset[r][1]]] for p in parts[1:] for r in p.rows]
        assert sorted(labels) == sorted([m["class_key"] for m in state.method_meta["memory"]] * times)
