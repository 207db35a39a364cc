"""The fine-tuning baselines' and the reference-distillation methods' loss terms on a fixed tiny batch, against
the formulas of docs/methods/finetune.md, docs/methods/lwf.md, docs/methods/zscl.md, docs/methods/gnsp.md and
docs/methods/wise-ft.md computed in the test from the model's own forward passes: fine-tune, LwF, ZSCL (and its
L2 gradient through ``after_backward``), WiSE-FT's interpolation, and GNSP's losses and gradient projection in
both ``project`` modes. Settings are set off their defaults where a default would hide a dropped setting (a
temperature of 2 hard-coded passes at the default)."""

from __future__ import annotations

import pytest
import torch

from components.settings.config_loading import load_config
from tests.conftest import tiny_overrides
from tests.method_harness import (
    Bench,
    ce_ls,
    image_features,
    images,
    kd,
    learned,
    nudge,
    soft_ce_ls,
    tasks,
    text_features,
)


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    return Bench(load_config(overrides=tiny_overrides(tiny_checkpoint), env={}, cwd=root)), tasks(root)


def _prompts(task) -> list[str]:
    return [f"a photo of a {name}" for name in task.class_names]  # the default templates' first prompt


def _reference(task, backbone, n):
    """The first n training images of the task in manifest order (no reference set: the task stands in), their
    captions and the captions' indices into the sorted distinct captions (docs/methods/README.md)."""
    dataset = task.dataset_for("train", backbone.preprocess)
    rows = [dataset[i] for i in range(n)]
    captions = [f"a photo of a {task.class_names[label]}" for _, label in rows]
    distinct = sorted(set(f"a photo of a {name}" for name in task.class_names))
    return torch.stack([x for x, _ in rows]), captions, distinct


X, Y = images(4, seed=11), torch.tensor([0, 1, 1, 0])


def test_finetune_trains_everything_but_the_logit_scale_on_label_smoothed_ce(setting):
    bench, data = setting
    method, backbone = bench.begin("finetune", {"label_smoothing": 0.3}, data["t-a"]), bench.backbone
    model = backbone.model
    names = [n for n, _ in method.trainable_parameters()]
    assert "logit_scale" not in names and len(names) == len(list(model.parameters())) - 1
    losses = method.training_step((X, Y))
    assert set(losses) == {"ce"}
    sigma = model.logit_scale.exp()
    logits = sigma * image_features(model, X) @ text_features(backbone, _prompts(data["t-a"])).T
    assert losses["ce"].item() == pytest.approx(ce_ls(logits, Y, 0.3).item(), rel=1e-5)
    assert losses["ce"].item() != pytest.approx(ce_ls(logits, Y, 0.0).item(), rel=1e-3)  # the smoothing counts


@pytest.mark.parametrize("loss_classes,replay", [("task", False), ("seen", False), ("task", True)])
def test_finetune_later_task_ce_ranges_over_the_documented_label_space(setting, loss_classes, replay):
    """loss_classes task: the task's own classes; seen, or any replay memory: every class seen, old ones first."""
    bench, data = setting
    state = learned("finetune", bench.backbone, data["t-a"])
    if replay:
        state.method_meta["memory"] = [{"task_id": "t-a", "row": 0, "class_key": "toy/cat"}]
    method = bench.begin("finetune", {"loss_classes": loss_classes, "label_smoothing": 0.0}, data["t-b"], state)
    wide = loss_classes == "seen" or replay
    names = ["cat", "dog", "emu", "owl"] if wide else ["emu", "owl"]
    y = Y + 2 if wide else Y
    backbone = bench.backbone
    logits = (
        backbone.model.logit_scale.exp()
        * image_features(backbone.model, X)
        @ text_features(backbone, [f"a photo of a {n}" for n in names]).T
    )
    assert method.training_step((X, y))["ce"].item() == pytest.approx(ce_ls(logits, y, 0.0).item(), rel=1e-5)


def test_lwf_distils_the_task_start_model_both_ways_at_its_temperature(setting):
    bench, data = setting
    settings = {"temperature": 3.0, "distill_weight": 0.6, "label_smoothing": 0.1}
    method, backbone, start = bench.begin("lwf", settings, data["t-a"]), bench.backbone, bench.base.model
    nudge([p for _, p in method.trainable_parameters()], seed=2)
    losses = method.training_step((X, Y))
    model, prompts = backbone.model, _prompts(data["t-a"])
    sigma = model.logit_scale.exp()
    z = sigma * image_features(model, X) @ text_features(backbone, prompts).T
    z_old = sigma * image_features(start, X) @ text_features(backbone, prompts, start).T
    assert not torch.allclose(z, z_old, atol=1e-3)  # teacher and student differ
    assert losses["ce"].item() == pytest.approx(ce_ls(z, Y, 0.1).item(), rel=1e-5)
    expected = 0.6 * (kd(z_old, z, 3.0) + kd(z_old.T, z.T, 3.0))
    assert losses["lwf"].item() == pytest.approx(expected.item(), rel=1e-5)


def _zscl(setting):
    bench, data = setting
    settings = {
        "temperature": 3.0,
        "distill_weight": 0.7,
        "l2_weight": 0.4,
        "reference_batch_size": 3,
        "label_smoothing": 0.1,
    }
    method, backbone, start = bench.begin("zscl", settings, data["t-a"]), bench.backbone, bench.base.model
    trained = [p for _, p in method.trainable_parameters()]
    nudge(trained, seed=3)
    return method, backbone, start, trained, data["t-a"]


def test_zscl_losses_and_the_l2_gradient_after_backward(setting):
    """Distillation of the base model on the reference batch at the configured temperature, CE, the L2 anchor;
    the L2 term is logged without a graph, so ``after_backward`` must add its gradient 2·λ·(θ − θ_start): the
    gradients then equal autograd's through the whole loss written out."""
    method, backbone, base, trained, task = _zscl(setting)
    losses = method.training_step((X, Y))
    model = backbone.model
    sigma = model.logit_scale.exp()
    r, _, distinct = _reference(task, backbone, 3)
    w0 = text_features(backbone, distinct, base)  # the base model's text on both sides
    z, z_ref = sigma * image_features(model, r) @ w0.T, sigma * image_features(base, r) @ w0.T
    distill = 0.7 * (kd(z_ref, z, 3.0) + kd(z_ref.T, z.T, 3.0))
    assert losses["distill"].item() == pytest.approx(distill.item(), rel=1e-5)
    assert losses["distill"].item() != pytest.approx((0.7 * (kd(z_ref, z, 1.0) + kd(z_ref.T, z.T, 1.0))).item())
    ce = ce_ls(sigma * image_features(model, X) @ text_features(backbone, _prompts(task)).T, Y, 0.1)
    assert losses["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    start = dict(base.named_parameters())
    l2 = sum(((p - start[n]) ** 2).sum() for n, p in method.trainable_parameters())
    assert losses["l2"].item() == pytest.approx(0.4 * l2.item(), rel=5e-4)  # fp32 sums over 3.2 M weights

    for p in trained:
        p.grad = None
    sum(losses.values()).backward()
    method.after_backward()
    got = [p.grad.clone() for p in trained]
    for p in trained:
        p.grad = None
    (ce + distill + 0.4 * l2).backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6) for a, p in zip(got, trained))


def test_wise_ft_interpolates_every_float_weight_with_the_task_start(setting):
    bench, data = setting
    method, backbone, start = bench.begin("wise-ft", {"alpha": 0.3}, data["t-a"]), bench.backbone, bench.base.model
    nudge([p for _, p in method.trainable_parameters()], seed=4)
    tuned = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method.after_fit()
    before = start.state_dict()
    for name, value in backbone.model.state_dict().items():
        assert torch.allclose(value, 0.3 * tuned[name] + 0.7 * before[name], atol=1e-6, equal_nan=True), name
    assert not torch.allclose(tuned["visual.proj"], before["visual.proj"])


# ---- GNSP ---------------------------------------------------------------------------------------------------

SPECTRUM = torch.tensor([5.0, 3.0, 1.0])  # tails 9/9, 4/9, 1/9: rho 0.5 protects the first (0.15 would two)


def _gnsp_state(backbone, data):
    """A state after t-a whose Gram sum of every projected matrix is Q diag(5, 3, 1) Qᵀ (Q orthonormal, chosen
    here): with rho 0.5 GNSP must protect exactly Q's first column q₁, so its projector is I − q₁q₁ᵀ."""
    state = learned("gnsp", backbone, data["t-a"])
    protected = {}
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        for layer, width in (("c_fc", 64), ("c_proj", 256)):
            protected[f"visual.transformer.resblocks.{i}.mlp.{layer}.weight"] = (width, True)
    protected["visual.proj"] = (64, False)
    kept = {}
    for name, (width, inputs_last) in protected.items():
        q = torch.linalg.qr(torch.randn(width, 3, generator=g))[0]
        state.method_tensors[f"gnsp.gram.{name}"] = q @ torch.diag(SPECTRUM) @ q.T
        kept[name] = (q[:, :1], inputs_last)
    return state, kept


def _gnsp(setting, project):
    bench, data = setting
    state, kept = _gnsp_state(bench.backbone, data)
    settings = {
        "project": project,
        "rho": 0.5,
        "temperature": 3.0,
        "cd_weight": 0.6,
        "map_weight": 0.4,
        "label_smoothing": 0.1,
        "reference_batch_size": 5,
    }
    method = bench.begin("gnsp", settings, data["t-b"], state)
    return method, bench.backbone, bench.base.model, kept, data["t-b"]


def test_gnsp_later_task_trains_the_projected_matrices_on_ce_cd_and_map(setting):
    method, backbone, base, kept, task = _gnsp(setting, "gradient")
    assert sorted(n for n, _ in method.trainable_parameters()) == sorted(kept)
    nudge([p for _, p in method.trainable_parameters()], seed=6)
    losses = method.training_step((X, Y))
    model = backbone.model
    sigma = model.logit_scale.exp()
    r, captions, distinct = _reference(task, backbone, 5)
    labels = torch.tensor([distinct.index(c) for c in captions])
    z = sigma * image_features(model, r) @ text_features(backbone, captions).T  # the student's both towers
    z_ref = sigma * image_features(base, r) @ text_features(backbone, captions, base).T
    assert losses["cd"].item() == pytest.approx((0.6 * (kd(z_ref, z, 3.0) + kd(z_ref.T, z.T, 3.0))).item(), rel=1e-5)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)  # a caption's duplicates share its mass
    expected_map = 0.4 * (soft_ce_ls(z, targets, 0.1) + soft_ce_ls(z.T, targets.T, 0.1))
    assert losses["map"].item() == pytest.approx(expected_map.item(), rel=1e-5)
    ce = ce_ls(sigma * image_features(model, X) @ text_features(backbone, _prompts(task)).T, Y, 0.1)
    assert losses["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_gnsp_default_projection_writes_the_projected_gradient_back(setting):
    """project: gradient (the default): after backward, G ← G(I − q₁q₁ᵀ) for (out, in) weights, (I − q₁q₁ᵀ)G for
    visual.proj, in the gradients the optimizer then reads."""
    method, backbone, _, kept, _ = _gnsp(setting, "gradient")
    params = dict(method.trainable_parameters())
    sum(method.training_step((X, Y)).values()).backward()
    raw = {n: params[n].grad.clone() for n in kept}
    method.after_backward()
    for name, (q, inputs_last) in kept.items():
        proj = torch.eye(len(q)) - q @ q.T
        expected = raw[name] @ proj if inputs_last else proj @ raw[name]
        leak = raw[name] @ q if inputs_last else q.T @ raw[name]
        assert leak.abs().max() > 1e-4, name  # the raw gradient did reach the protected directions
        assert torch.allclose(params[name].grad, expected, atol=1e-6), name
        kept_part = params[name].grad @ q if inputs_last else q.T @ params[name].grad
        assert kept_part.abs().max() < 1e-5, name


def test_gnsp_update_projection_projects_the_whole_step_and_leaves_the_gradient(setting):
    method, backbone, _, kept, _ = _gnsp(setting, "update")
    params = dict(method.trainable_parameters())
    sum(method.training_step((X, Y)).values()).backward()
    raw = {n: params[n].grad.clone() for n in kept}
    method.after_backward()
    before = {n: params[n].detach().clone() for n in kept}
    with torch.no_grad():
        for name in kept:
            assert torch.equal(params[name].grad, raw[name]), name  # the gradient itself is left alone
            params[name].sub_(0.5 * raw[name])  # a plain step, as an optimizer would take it
    method.after_step(0)
    for name, (q, inputs_last) in kept.items():
        proj = torch.eye(len(q)) - q @ q.T
        step = -0.5 * raw[name]
        expected = before[name] + (step @ proj if inputs_last else proj @ step)
        assert torch.allclose(params[name].detach(), expected, atol=1e-6), name


def test_gnsp_first_task_projects_nothing(setting):
    bench, data = setting
    method, backbone = bench.begin("gnsp", {"reference_batch_size": 2}, data["t-a"]), bench.backbone
    params = method.trainable_parameters()
    assert len(params) == len(list(backbone.model.parameters())) - 1  # both towers, no logit scale
    sum(method.training_step((X, Y)).values()).backward()
    raw = [p.grad.clone() for _, p in params]
    method.after_backward()
    assert all(torch.equal(a, p.grad) for a, (_, p) in zip(raw, params))
