"""GNSP's edge values and its per-task bookkeeping, against docs/methods/gnsp.md: Gram normalisation of an
all-zero or a small batch, a spectrum whose every direction is protected, the refusals of a model without
``visual.proj`` and of a state without a layer's Gram, the notice for a layer that cannot move, and what
``export`` adds to the state after a task: the Grams of the training transform (or of the plain one), summed per
task and across tasks as the page's steps 3 to 5 say. Expected values by hand from those steps."""

from __future__ import annotations

import re

import pytest
import torch

from components.methods import get_method, gnsp
from components.methods.base import Context, MethodError
from components.model.state import LearnerState
from components.settings.config_loading import load_config
from tests.conftest import tiny_overrides
from tests.method_harness import Bench, learned, tasks

# ---- the pure steps ---------------------------------------------------------------------------------------


def test_an_all_zero_batch_adds_nothing_and_a_small_one_is_still_scaled_to_unit_norm():
    zeros = torch.zeros(3, 2)
    assert torch.equal(gnsp.gram_update(None, zeros), torch.zeros(2, 2))  # 0 / 0 would be NaN
    assert torch.equal(gnsp.frobenius_normalised(torch.zeros(2, 2)), torch.zeros(2, 2))
    small = torch.tensor([[0.5, 0.0]])  # X^T X = [[0.25, 0], [0, 0]], Frobenius norm 0.25 (below 1)
    assert torch.allclose(gnsp.gram_update(None, small), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.allclose(
        gnsp.frobenius_normalised(torch.diag(torch.tensor([0.3, 0.4]))), torch.diag(torch.tensor([0.6, 0.8]))
    )


def test_a_spectrum_whose_smallest_value_carries_rho_protects_every_direction():
    # tails: 2/2, 1/2; none below 0.15, so the smallest k is the empty tail's: k = 2, all of them
    assert gnsp.protected_rank(torch.tensor([1.0, 1.0]), 0.15) == 2
    assert gnsp.protected_rank(torch.ones(64), 0.01) == 64  # the last tail is 1/64 > 0.01


# ---- the method on the tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("gnsp")
    return Bench(load_config(overrides=tiny_overrides(tiny_checkpoint), env={}, cwd=root)), tasks(root)


LAYERS = [f"visual.transformer.resblocks.{i}.mlp.{layer}.weight" for i in range(2) for layer in ("c_fc", "c_proj")]
WIDTH = {"c_fc": 64, "c_proj": 256}


def _begin(bench, settings, task, state, said=None):
    """Bench.begin with a context that records what the method says."""
    model = bench.backbone.model
    model.load_state_dict(bench.start)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    progress = said.append if said is not None else None
    ctx = Context(bench.backbone, batch_size=16, load_base=lambda: bench.base, progress=progress)
    method = get_method("gnsp")(settings)
    method.begin_task(state, task, ctx)
    return method


def _state_with_grams(bench, data, grams: dict[str, torch.Tensor]) -> LearnerState:
    state = learned("gnsp", bench.backbone, data["t-a"])
    for name, gram in grams.items():
        state.method_tensors[gnsp.GRAM_PREFIX + name] = gram
    return state


def _identity_grams(scale: float = 1.0) -> dict[str, torch.Tensor]:
    grams = {name: scale * torch.eye(WIDTH[name.split(".")[-2]]) for name in LAYERS}
    grams["visual.proj"] = scale * torch.eye(64)
    return grams


def test_a_model_without_an_image_projection_is_refused_in_one_line(setting):
    bench, _ = setting
    import open_clip

    model = open_clip.create_model("cliploop-tiny", pretrained=None)
    del model.visual.proj  # no attribute at all, not merely None
    message = "GNSP needs the image tower's output projection (visual.proj)"
    with pytest.raises(MethodError, match=f"^{re.escape(message)}$"):
        gnsp.protected_layers(model)


def test_a_state_missing_one_layers_gram_is_refused_naming_the_layer(setting):
    bench, data = setting
    grams = _identity_grams()
    del grams["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    state = _state_with_grams(bench, data, grams)
    with pytest.raises(MethodError, match=r"no Gram matrix for visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight"):
        _begin(bench, {"reference_batch_size": 2}, data["t-b"], state)


def test_a_layer_whose_every_direction_is_protected_is_named_and_the_others_are_not(setting):
    """Identity Grams with rho 0.01: a 64-wide layer protects all 64 directions (last tail 1/64 >= 0.01), a
    256-wide one only 254 (tails 2/256 < 0.01), so c_fc and visual.proj cannot move and c_proj can."""
    bench, data = setting
    said: list[str] = []
    state = _state_with_grams(bench, data, _identity_grams())
    method = _begin(bench, {"rho": 0.01, "reference_batch_size": 2}, data["t-b"], state, said)
    notices = [m for m in said if "empty null space" in m]
    expected = [n for n in LAYERS if ".c_fc." in n] + ["visual.proj"]
    assert sorted(m.split()[1].rstrip(":") for m in notices) == sorted(expected)
    assert all(method.projectors[n][0].abs().max() < 1e-6 for n in expected)  # P = 0: the gradient is zeroed


def _proj_inputs(model, images: torch.Tensor) -> torch.Tensor:
    """The input of visual.proj by hand: the trunk's token states, pooled and ln_post-normalised."""
    from components.methods.sg import trunk_features

    with torch.no_grad():
        return model.visual._pool(trunk_features(model.visual, images, 2))[0]


def _task_gram_by_hand(model, task, transform, batch: int) -> torch.Tensor:
    """Steps 3 and 4: per batch X^T X / ||X^T X||_F, summed over the task's batches in order, then / ||.||_F."""
    dataset = task.dataset_for("train", transform)
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    total = torch.zeros(64, 64)
    for start in range(0, len(xs), batch):
        x = _proj_inputs(model, xs[start : start + batch])
        g = x.T @ x
        total += g / torch.linalg.matrix_norm(g)
    return total / torch.linalg.matrix_norm(total)


@pytest.mark.parametrize(
    "augment, has_train_transform, uses_train_transform",
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_export_summarises_the_task_through_the_training_transform_only_when_augmenting(
    setting, augment, has_train_transform, uses_train_transform
):
    """Step 1: the pass uses the training transform when ``augment`` is on and the backbone has one, else the
    plain one. A deterministic stand-in for the (random) training transform: the plain one, mirrored."""
    bench, data = setting
    backbone = bench.backbone
    plain, saved = backbone.preprocess, backbone.preprocess_train
    mirrored = lambda image: plain(image).flip(-1)  # noqa: E731
    backbone.preprocess_train = mirrored if has_train_transform else None
    try:
        task = data["t-a"]
        method = _begin(
            bench,
            {"augment": augment, "gram_batch_size": 3},
            task,
            LearnerState(method="gnsp", backbone=backbone.reference),
        )
        out = LearnerState(method="gnsp", backbone=backbone.reference)
        method.export(out)
        expected = _task_gram_by_hand(backbone.model, task, mirrored if uses_train_transform else plain, 3)
        other = _task_gram_by_hand(backbone.model, task, plain if uses_train_transform else mirrored, 3)
        got = gnsp.gram_sums(out)["visual.proj"]
        assert not torch.allclose(expected, other, atol=1e-4)  # the two transforms give different Grams
        assert torch.allclose(got, expected, atol=1e-5)
    finally:
        backbone.preprocess_train = saved


def test_export_adds_the_task_to_the_sums_renormalising_the_old_sum_only_for_visual_proj(setting):
    """Step 5: M_<=t = M_<=t-1 + M_t for the MLP matrices, M_<=t-1 / ||M_<=t-1||_F + M_t for visual.proj. The old
    sums here are 3 I (Frobenius norm 3 * sqrt(width)), so the two rules differ."""
    bench, data = setting
    task = data["t-b"]
    settings = {"augment": False, "gram_batch_size": 4, "rho": 0.5, "reference_batch_size": 2}
    first = LearnerState(method="gnsp", backbone=bench.backbone.reference)
    _begin(bench, settings, task, LearnerState(method="gnsp", backbone=bench.backbone.reference)).export(first)
    this_task = gnsp.gram_sums(first)  # M_t alone: nothing before
    plain = bench.backbone.preprocess
    assert torch.allclose(this_task["visual.proj"], _task_gram_by_hand(bench.backbone.model, task, plain, 4), atol=1e-5)

    old = _identity_grams(scale=3.0)
    state = _state_with_grams(bench, data, old)
    out = LearnerState(method="gnsp", backbone=bench.backbone.reference)
    _begin(bench, settings, task, state).export(out)
    sums = gnsp.gram_sums(out)
    assert set(sums) == set(LAYERS) | {"visual.proj"}
    for name in LAYERS:
        assert torch.allclose(sums[name], old[name] + this_task[name], atol=1e-5), name
    width = 64
    expected_proj = old["visual.proj"] / (3.0 * width**0.5) + this_task["visual.proj"]
    assert torch.allclose(sums["visual.proj"], expected_proj, atol=1e-5)
