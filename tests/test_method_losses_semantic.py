"""SG-RL + SG-KD, CVM and CTP: their loss terms on a fixed tiny batch against the formulas of docs/methods/sg.md,
docs/methods/cvm.md and docs/methods/ctp.md computed in the test from the model's own forward passes, on a first
task and on a later one. Settings are set off their defaults where a default would hide a dropped setting."""

from __future__ import annotations

import copy

import pytest
import torch

from components.settings.config_loading import load_config
from tests.conftest import tiny_overrides
from tests.method_harness import (
    Bench,
    ce_ls,
    image_features,
    images,
    info_nce,
    kl_bm,
    learned,
    log_softmax,
    nudge,
    tasks,
    text_features,
    unit,
)


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic")
    return Bench(load_config(overrides=tiny_overrides(tiny_checkpoint), env={}, cwd=root)), tasks(root)


X = images(4, seed=21)


def _prompts(names) -> list[str]:
    return [f"a photo of a {name}" for name in names]


# ---- SG ---------------------------------------------------------------------------------------------------

SG = {"kappa": 5.0, "rl_weight": 0.3, "kd_weight": 0.7, "kd_temperature": 3.0, "memory_per_class": 0}


def _soft_labels(backbone, names, kappa):
    """Q[k, j] = exp(κ cos(n_k, n_j)) / Σ_k' exp(κ cos(n_k', n_j)), n the bare names' text features."""
    n = text_features(backbone, names)
    e = torch.exp(kappa * n @ n.T)
    return e / e.sum(0, keepdim=True)


def test_sg_first_task_trains_the_last_block_towards_columns_of_the_soft_labels(setting):
    bench, data = setting
    task = data["t-abc"]  # three classes: with two, Q is symmetric and its axis cannot be seen
    method, backbone = bench.begin("sg", SG, task), bench.backbone
    block = "visual.transformer.resblocks.1."
    trained = method.trainable_parameters()
    assert all(n.startswith(block) for n, _ in trained)
    assert len(trained) == len(list(backbone.model.visual.transformer.resblocks[1].parameters()))
    nudge([p for _, p in trained], seed=22)
    y = torch.tensor([0, 1, 2, 1])
    losses = method.training_step((X, y))
    assert set(losses) == {"con", "rl"}  # no SG-KD on the first task

    model = backbone.model
    sigma = model.logit_scale.exp()
    v, t = image_features(model, X), text_features(backbone, _prompts(task.class_names))
    assert losses["con"].item() == pytest.approx(info_nce(v, t[y], sigma).item(), rel=1e-5)
    q = _soft_labels(backbone, task.class_names, 5.0)
    assert not torch.allclose(q, q.T, atol=1e-3)
    targets = q[:, y].T  # sample i is trained towards column y_i
    kl = (targets * (targets.log() - log_softmax(sigma * v @ t.T))).sum()
    assert losses["rl"].item() == pytest.approx((0.3 * kl / (4 * 3)).item(), rel=1e-5)  # parity: / (B · K)


@pytest.mark.parametrize("parity", [False, True])
def test_sg_later_task_distils_the_adjusted_old_logits_at_its_temperature(setting, parity):
    """parity (the official code's quirks): the RL sum divided by batch × classes, the name-to-prompt similarity
    rounded to fp16; without: divided by the batch, the similarity as computed."""
    bench, data = setting
    backbone = bench.backbone
    old, new = data["t-a"], data["t-b"]
    method = bench.begin("sg", {**SG, "parity": parity}, new, learned("sg", backbone, old))
    nudge([p for _, p in method.trainable_parameters()], seed=23)
    y = torch.tensor([2, 3, 0, 2])  # the label space: cat, dog (old), emu, owl (new)
    losses = method.training_step((X, y))

    model, base = backbone.model, bench.base.model
    sigma = model.logit_scale.exp()
    names = [*old.class_names, *new.class_names]
    t, n = text_features(backbone, _prompts(names)), text_features(backbone, names)
    v, v_old = image_features(model, X), image_features(base, X)
    q = _soft_labels(backbone, names, 5.0)
    targets = q[:, y].T
    kl = (targets * (targets.log() - log_softmax(sigma * v @ t.T))).sum()
    assert losses["rl"].item() == pytest.approx((0.3 * kl / (16 if parity else 4)).item(), rel=1e-5)
    # SG-KD: r_ik = cos(bare name of y_i, old prompt k); the best old class is raised by m_i, the others lowered.
    r = n[y] @ t[:2].T
    if parity:
        r = r.half().float()
    m, best = r.max(1)
    z_old = sigma * v_old @ t[:2].T - m[:, None]
    z_old[torch.arange(4), best] += 2 * m
    z_new = sigma * v @ t[:2].T
    expected = 0.7 * 9.0 * kl_bm(z_old / 3.0, z_new / 3.0)
    assert losses["kd"].item() == pytest.approx(expected.item(), rel=1e-4)


# ---- CVM --------------------------------------------------------------------------------------------------


def _cvm(setting):
    bench, data = setting
    method = bench.begin("cvm", {"tau": 0.2, "label_smoothing": 0.1}, data["t-a"])
    return method, bench.backbone, data["t-a"]


def test_cvm_maps_images_by_p_onto_fixed_concepts(setting):
    """z(x) = normalize(P g(x)) with P stored (d_LM, d_visual); logits cos(z, c_k) / τ. P is set to a square,
    non-symmetric matrix (a transposed P gives other values) and then to a non-square one."""
    method, backbone, task = _cvm(setting)
    assert torch.equal(method.projection.detach(), torch.eye(64))  # the backbone's text tower: start from CLIP
    concepts = text_features(backbone, _prompts(task.class_names))
    assert torch.allclose(method.targets, concepts, atol=1e-6)
    g = torch.Generator().manual_seed(24)
    y = torch.tensor([1, 0, 0, 1])
    square = torch.randn(64, 64, generator=g)
    with torch.no_grad():
        method.projection.copy_(square)
    raw = backbone.model.encode_image(X).float()
    logits = unit((square @ raw.T).T) @ concepts.T / 0.2
    assert not torch.allclose(logits, unit(raw @ square) @ concepts.T / 0.2, atol=1e-3)
    assert method.training_step((X, y))["ce"].item() == pytest.approx(ce_ls(logits, y, 0.1).item(), rel=1e-5)

    wide = torch.randn(48, 64, generator=g)  # a 48-d language model
    method.projection = torch.nn.Parameter(wide)
    method.targets = unit(torch.randn(2, 48, generator=g))
    logits = unit((wide @ raw.T).T) @ method.targets.T / 0.2
    assert method.training_step((X, y))["ce"].item() == pytest.approx(ce_ls(logits, y, 0.1).item(), rel=1e-5)


def test_cvm_scores_with_the_stored_projection_and_concepts(setting):
    from components.methods.base import Context

    method, backbone, task = _cvm(setting)
    backbone.model.eval()
    state = learned("cvm", backbone, task)
    g = torch.Generator().manual_seed(25)
    ctx = Context(backbone)
    keys, names = task.class_keys, dict(zip(task.class_keys, task.class_names))
    raw = unit(backbone.model.encode_image(X).float())
    for d in (64, 48):  # square (a transposed P gives other values) and non-square
        projection, concepts = torch.randn(d, 64, generator=g), torch.randn(2, d, generator=g)
        state.method_tensors.update({"cvm.projection": projection, "cvm.concepts": concepts})
        state.method_meta["cvm.concept_keys"] = keys
        expected = unit((projection @ raw.T).T) @ unit(concepts).T
        with torch.no_grad():
            got = method.scores(state, X, keys, names, ctx)
        assert torch.allclose(got, expected, atol=1e-5), d
        assert torch.allclose(method.scores(state, X, keys[::-1], names, ctx), expected.flip(1), atol=1e-5)
        if d == 64:  # a class no task taught: its concept from the same prompt, for zero-shot scoring
            emu = text_features(backbone, ["a photo of a emu"])
            got = method.scores(state, X, [*keys, "toy/emu"], {**names, "toy/emu": "emu"}, ctx)
            assert torch.allclose(got[:, 2], (unit((projection @ raw.T).T) @ emu.T)[:, 0], atol=1e-5)


# ---- CTP --------------------------------------------------------------------------------------------------


def _blend(bench, method, weights: dict[str, float]):
    """A copy of the base model whose trained parameters are Σ weight · (that model's parameter)."""
    twin = copy.deepcopy(bench.base.model)
    models = {"start": dict(bench.base.model.named_parameters()), "live": dict(method.trainable_parameters())}
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in models["live"]:
                p.copy_(sum(w * models[m][name] for m, w in weights.items()))
    return twin


def _ctp_expected(bench, method, momentum, y, prompts, queue_image, queue_text, tau):
    model, backbone = bench.backbone.model, bench.backbone
    i, t = image_features(model, X), text_features(backbone, prompts)[y]
    mi, mt = image_features(momentum, X), text_features(backbone, prompts, momentum)[y]
    diag = torch.arange(len(y))
    keys_text, keys_image = torch.cat([mt.T, queue_text], 1), torch.cat([mi.T, queue_image], 1)
    cmc = 0.5 * (ce_ls(i @ keys_text / tau, diag, 0.0) + ce_ls(t @ keys_image / tau, diag, 0.0))
    return i, t, mi, mt, info_nce(i, t, 1 / tau), cmc


def test_ctp_first_task_momentum_contrast_against_a_fresh_queue(setting):
    bench, data = setting
    settings = {"tau": 0.1, "queue_size": 6, "momentum_first_task": 0.9, "cmc_weight": 0.5}
    method = bench.begin("ctp", settings, data["t-a"])
    g = torch.Generator().manual_seed(0)  # the context's seed: queues of random unit columns, image then text
    fresh_image, fresh_text = unit(torch.randn(64, 6, generator=g).T).T, unit(torch.randn(64, 6, generator=g).T).T
    assert torch.allclose(method.queues.image, fresh_image) and torch.allclose(method.queues.text, fresh_text)
    nudge([p for _, p in method.trainable_parameters()], seed=26)
    method.before_step(0)  # θ_m ← 0.9 θ_m + 0.1 θ (θ_m starts as the task's start model)
    momentum = _blend(bench, method, {"start": 0.9, "live": 0.1})
    y = torch.tensor([0, 1, 1, 0])
    losses = method.training_step((X, y))
    assert set(losses) == {"ita", "cmc"}
    _, _, mi, mt, ita, cmc = _ctp_expected(
        bench, method, momentum, y, _prompts(data["t-a"].class_names), fresh_image, fresh_text, 0.1
    )
    assert losses["ita"].item() == pytest.approx(ita.item(), rel=1e-5)
    assert losses["cmc"].item() == pytest.approx(0.5 * cmc.item(), rel=1e-4)
    # The batch's momentum features then enter the queues at the pointer.
    assert method.queues.pointer == 4
    assert torch.allclose(method.queues.image[:, :4], mi.T, atol=1e-5)
    assert torch.allclose(method.queues.text[:, :4], mt.T, atol=1e-5)
    assert torch.equal(method.queues.image[:, 4:], fresh_image[:, 4:])


def test_ctp_later_task_keeps_the_queue_and_preserves_the_start_models_topology(setting):
    bench, data = setting
    old, new = data["t-a"], data["t-b"]
    state = learned("ctp", bench.backbone, old)
    g = torch.Generator().manual_seed(27)
    queue_image, queue_text = unit(torch.randn(6, 64, generator=g)).T, unit(torch.randn(6, 64, generator=g)).T
    state.method_tensors.update(
        {"ctp.queue_image": queue_image, "ctp.queue_text": queue_text, "ctp.queue_ptr": torch.tensor(5)}
    )
    settings = {
        "tau": 0.1,
        "queue_size": 6,
        "momentum": 0.8,
        "alpha": 0.3,
        "tp_cross_weight": 0.6,
        "tp_intra_weight": 0.4,
        "cache_reference": False,
    }
    method = bench.begin("ctp", settings, new, state)
    nudge([p for _, p in method.trainable_parameters()], seed=28)
    method.before_step(0)  # θ_m ← 0.8 θ_m + 0.2 (0.3 θ_start + 0.7 θ), θ_m = θ_start at first
    momentum = _blend(bench, method, {"start": 0.8 + 0.2 * 0.3, "live": 0.2 * 0.7})
    y = torch.tensor([0, 1, 1, 0])  # this task's label space: emu, owl
    losses = method.training_step((X, y))
    prompts = _prompts(new.class_names)
    i, t, mi, mt, ita, cmc = _ctp_expected(bench, method, momentum, y, prompts, queue_image, queue_text, 0.1)
    assert losses["ita"].item() == pytest.approx(ita.item(), rel=1e-5)
    assert losses["cmc"].item() == pytest.approx(cmc.item(), rel=1e-4)

    base = bench.base.model
    ri, rt = image_features(base, X), text_features(bench.backbone, prompts, base)[y]
    s, r = i @ t.T / 0.1, ri @ rt.T / 0.1
    cross = 0.5 * (kl_bm(r, s) + kl_bm(r.T, s.T))
    assert losses["tp_cross"].item() == pytest.approx(0.6 * cross.item(), rel=1e-4)

    def masked(a):  # each sample's own pair set to -1000 before dividing by τ
        return (a @ a.T - torch.eye(len(a)) * (a * a).sum(1) - 1000 * torch.eye(len(a))) / 0.1

    intra = 0.5 * (kl_bm(masked(ri), masked(i)) + kl_bm(masked(rt), masked(t)))
    assert losses["tp_intra"].item() == pytest.approx(0.4 * intra.item(), rel=1e-4)
    # The queue went on from the stored pointer, wrapping: columns 5, 0, 1, 2.
    assert method.queues.pointer == 3
    assert torch.allclose(method.queues.image[:, [5, 0, 1, 2]], mi.T, atol=1e-5)
    assert torch.allclose(method.queues.text[:, [5, 0, 1, 2]], mt.T, atol=1e-5)
    assert torch.equal(method.queues.image[:, 3:5], queue_image[:, 3:5])
