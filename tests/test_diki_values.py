"""DIKI's mathematics against the official code's formulas (tests/diki_reference.py says them in words), on small
tensors: the attention with its prefix, the tower with prefixes injected (against forward hooks), the Gaussian,
its log-likelihood and the calibrated choice, a new slot, the schedule, and whole scores of a learner state with
weights strictly between 0 and 1. The expected values come from those formulas or from hand computation, never
from the method's code. Tolerances: 1e-6 on fp32 attention of width 8, 1e-5 on a whole fp32 tower, 1e-9 relative
on fp64 log-likelihoods."""

from __future__ import annotations

import math

import pytest
import torch

from components.methods import get_method
from components.methods.diki import (
    DIKI,
    choose_tasks,
    gaussian_fit,
    gaussian_log_prob,
    new_slot,
)
from components.methods.prefix_injection import injected, prefix_attention, text_blocks
from components.methods.tuning import visual_blocks
from components.model.state import LearnerState
from components.training.trainer import lr_factor
from tests.diki_reference import encode, official_attention, official_choice, official_gaussian, reference_scores


def _attention(batch_first: bool) -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    with torch.no_grad():  # a bias of its own, so a mix-up of the packed projections shows
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn.eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_prefix_attention_is_the_official_formula_with_and_without_a_causal_mask(batch_first):
    attn = _attention(batch_first)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g)  # [B, L, D]
    x = x if batch_first else x.transpose(0, 1)
    prefix = torch.randn(2, 4, 8, generator=g)  # keys, values of 4 tokens
    weight = torch.tensor([0.3, 0.8])
    causal = torch.full((3, 3), float("-inf")).triu(1)  # the text tower's mask (open_clip: float -inf above)
    with torch.no_grad():
        for mask in (None, causal):
            found = prefix_attention(attn, x, prefix, weight, mask)
            assert torch.allclose(found, official_attention(attn, x, prefix, weight, mask), atol=1e-6)
        # nn.MultiheadAttention's boolean mask (True: may not attend) reads as the -inf one
        boolean = prefix_attention(attn, x, prefix, weight, causal.isinf())
        assert torch.allclose(boolean, official_attention(attn, x, prefix, weight, causal), atol=1e-6)
        # no weight: the official training forward (weight 1)
        assert torch.allclose(
            prefix_attention(attn, x, prefix, None), official_attention(attn, x, prefix, torch.ones(2)), atol=1e-6
        )


def test_zero_values_leave_the_attention_exactly_the_frozen_models():
    """A new slot's values are zero: attending to it adds nothing, whatever its keys and weight."""
    attn = _attention(batch_first=True)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    prefix = new_slot(1, 4, 8, torch.Generator().manual_seed(3))[0]
    causal = torch.full((3, 3), float("-inf")).triu(1)
    with torch.no_grad():
        own = attn(x, x, x, need_weights=False, attn_mask=causal)[0]
        assert torch.allclose(prefix_attention(attn, x, prefix, torch.tensor([1.0, 0.5]), causal), own, atol=1e-6)


def test_a_new_slot_has_uniform_keys_in_minus_one_one_and_zero_values():
    slot = new_slot(3, 8, 16, torch.Generator().manual_seed(0))
    assert slot.shape == (3, 2, 8, 16)
    assert torch.equal(slot[:, 1], torch.zeros(3, 8, 16))
    keys = slot[:, 0]
    assert keys.min() >= -1 and keys.max() <= 1 and keys.std() > 0.5  # uniform(-1, 1): std 1/√3 ≈ 0.58
    assert torch.equal(new_slot(3, 8, 16, torch.Generator().manual_seed(0)), slot)  # the same on every worker


def _slot(blocks, length, seed):
    slot = new_slot(len(blocks), length, blocks[0].attn.embed_dim, torch.Generator().manual_seed(seed))
    slot[:, 1] = torch.randn(slot[:, 1].shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5
    return slot


def test_both_towers_with_a_slot_injected_are_the_official_forward_and_the_model_is_untouched(tiny_backbone):
    model = tiny_backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = tiny_backbone.tokenizer(["a photo of a cat", "a photo of a dog"])
    vision, text = visual_blocks(model), text_blocks(model)
    image_slot, text_slot = _slot(vision, 3, 5), _slot(text, 2, 7)
    weights = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        with injected(vision, image_slot, weights):
            found = model.encode_image(images).float()
        expected = encode(model, vision, lambda: model.encode_image(images), image_slot, weights)
        assert torch.allclose(found / found.norm(dim=-1, keepdim=True), expected, atol=1e-5)
        assert not torch.allclose(expected, encode(model, vision, lambda: model.encode_image(images), None, None))
        with injected(text, text_slot, torch.tensor([0.4])):
            found = model.encode_text(tokens).float()
        expected = encode(model, text, lambda: model.encode_text(tokens), text_slot, torch.tensor([0.4]))
        assert torch.allclose(found / found.norm(dim=-1, keepdim=True), expected, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(type(b.attn) is torch.nn.MultiheadAttention for b in vision + text)


def test_the_gaussian_of_three_points_by_hand():
    """(1,0), (0,1), (1,1): mean (2/3, 2/3); deviations (1/3,-2/3), (-2/3,1/3), (1/3,1/3); divided by n - 1 = 2:
    variances (1/9 + 4/9 + 1/9) / 2 = 1/3, covariance (-2/9 - 2/9 + 1/9) / 2 = -1/6; plus 1e-7 on the diagonal."""
    mean, covariance = gaussian_fit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), 1e-7)
    assert torch.allclose(mean, torch.tensor([2 / 3, 2 / 3]), atol=1e-7)
    expected = torch.tensor([[1 / 3 + 1e-7, -1 / 6], [-1 / 6, 1 / 3 + 1e-7]])
    assert torch.allclose(covariance, expected, atol=1e-7)
    features = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    ours, official = gaussian_fit(features, 1e-7), official_gaussian(features)
    assert torch.allclose(ours[0].double(), official[0], atol=1e-7)
    assert torch.allclose(ours[1].double(), official[1], atol=1e-7)


def test_the_log_likelihood_is_the_multivariate_normals():
    """One dimension by hand: log N(1; 0, 4) = -(log 2π + log 4 + 1/4) / 2; and three 6-d Gaussians against
    torch's MultivariateNormal.log_prob, the official code's call."""
    one = gaussian_log_prob(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[[2.0]]]).double())
    assert one.item() == pytest.approx(-0.5 * (math.log(2 * math.pi) + math.log(4) + 0.25), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 6, generator=g)
    roots = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    covariances = roots @ roots.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    x = torch.randn(5, 6, generator=g)
    found = gaussian_log_prob(x, means, torch.linalg.cholesky(covariances))
    from torch.distributions import MultivariateNormal

    for t in range(3):
        expected = MultivariateNormal(means[t].double(), covariances[t]).log_prob(x.double())
        assert torch.allclose(found[:, t], expected, rtol=1e-9)


def test_the_calibrated_weight_and_the_batchwise_choice():
    """sigmoid(log p / d - 1): log p = d gives 1/2, 2d gives sigmoid(1) = 0.7311; the batch takes the task most
    rows chose, and on a tie the earlier task (our rule: the official top-k leaves ties unspecified)."""
    log_probs = torch.tensor([[512.0, 100.0], [0.0, 1024.0], [-5e4, 300.0]], dtype=torch.float64)
    chosen, weight = choose_tasks(log_probs, 512, batchwise=False)
    assert chosen.tolist() == [0, 1, 1]
    assert weight.tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1 - 300 / 512))])
    assert choose_tasks(log_probs, 512, batchwise=True)[0].tolist() == [1, 1, 1]
    tie = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert choose_tasks(tie, 512, batchwise=True)[0].tolist() == [0, 0]
    random = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)) * 1000
    for batchwise in (False, True):
        ours, official = choose_tasks(random, 512, batchwise), official_choice(random, 512, batchwise)
        assert torch.equal(ours[0], official[0]) and torch.allclose(ours[1], official[1].float())


def test_the_default_schedule_is_the_official_cosine_from_lr_to_a_thousandth():
    """lr_i = f + (lr - f)(1 + cos(π i / N)) / 2, f = lr / 1000, no warmup (DIKI/utils.py), here N = 7."""
    settings = get_method("diki").Settings(iterations=7)
    for i in range(7):
        official = 5e-3 + 0.5 * (5.0 - 5e-3) * (1 + math.cos(math.pi * i / 7))
        assert settings.lr * lr_factor(i, 7, settings) == pytest.approx(official, rel=1e-12)


def test_the_defaults_are_the_official_ones():
    """configs/MTIL.yaml of the official code; the settings the fine-tuning family has and DIKI has not are
    unknown keys here (no replay memory, no pools)."""
    settings = get_method("diki").Settings().model_dump()
    official = {
        "optimizer": "sgd",
        "lr": 5.0,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "epochs": 10,
        "iterations": None,
        "batch_size": 128,
        "warmup_steps": 0,
        "schedule": "cosine",
        "min_lr": 5e-3,
        "label_smoothing": 0.0,
        "augment": False,
        "prompt_depth_image": 8,
        "prompt_depth_text": 8,
        "prompt_length_image": 8,
        "prompt_length_text": 8,
        "batchwise_prompt": True,
        "calibration_width": None,
        "covariance_ridge": 1e-7,
    }
    assert {k: settings[k] for k in official} == official
    assert not {"memory_per_class", "memory_size", "loss_classes", "classifier"} & set(settings)


def _state(backbone, images):
    """Two learned tasks whose slots have non-zero values and whose Gaussians are fitted on two groups of images."""
    model = backbone.model
    frozen = model.encode_image(images).float()
    frozen = frozen / frozen.norm(dim=-1, keepdim=True)
    state = LearnerState(method="diki", backbone=backbone.reference)
    vision, text = visual_blocks(model), text_blocks(model)
    for i, (task, rows) in enumerate((("t-a", slice(0, 6)), ("t-b", slice(6, 12)))):
        around = frozen[rows].repeat(14, 1)  # 84 points around the group's six: a covariance of full rank
        mean, covariance = official_gaussian(around + 0.05 * torch.randn(around.shape))
        state.method_tensors.update(
            {
                f"diki.image.{task}": _slot(vision, 3, 10 + i),
                f"diki.text.{task}": _slot(text, 2, 20 + i),
                f"diki.mean.{task}": mean.float(),
                f"diki.covariance.{task}": covariance.float(),
            }
        )
        state.tasks.append({"task_id": task})
    return state


@pytest.mark.parametrize("batchwise", [True, False])
def test_whole_scores_of_a_state_are_the_official_forwards(tiny_backbone, batchwise):
    """Eight images, five near task a's Gaussian and three near b's; the calibration width set so that every weight
    lies well inside (0, 1), so both the choice and the scaling of the prefixes show. ``batchwise`` off: each task's
    rows with its prefix, the text weighted by their mean (our reading: the official forward has no such path)."""
    from torch.distributions import MultivariateNormal

    from components.methods.base import Context

    torch.manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        state = _state(tiny_backbone, images)
        batch = torch.cat([images[:5], images[6:9]])
        frozen = tiny_backbone.model.encode_image(batch).float()
        frozen = frozen / frozen.norm(dim=-1, keepdim=True)
        t = state.method_tensors
        top = torch.stack(
            [
                MultivariateNormal(t[f"diki.mean.{k}"].double(), t[f"diki.covariance.{k}"].double()).log_prob(
                    frozen.double()
                )
                for k in ("t-a", "t-b")
            ]
        ).max(dim=0)
        assert top.indices.tolist() == [0] * 5 + [1] * 3
        width = float(top.values.abs().max()) / 2  # log p / width within [-2, 2]: weights in (0.05, 0.73)
        names = ["cat", "dog", "emu"]
        keys = [f"toy/{n}" for n in names]
        method = DIKI({"calibration_width": width, "batchwise_prompt": batchwise})
        ctx = Context(backbone=tiny_backbone)
        found = method.scores(state, batch, keys, dict(zip(keys, names)), ctx)
        expected = reference_scores(state, tiny_backbone, batch, names, "a photo of a {}", width, batchwise)
    weights = torch.sigmoid(top.values / width - 1)
    assert weights.min() > 0.05 and weights.max() < 0.95
    assert torch.allclose(found, expected, atol=1e-5)
