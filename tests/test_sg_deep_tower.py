"""SG-RL + SG-KD (docs/methods/sg.md) on an image tower of three blocks (the ``cliploop-glyph`` config): with the
tiny model's two blocks, "the last block" and "the second block" are the same one, so a method that trained,
scored or copied the wrong block would pass there. Here only block 2 trains, the student's features are the
whole tower's, the SG-KD teacher is the whole tower at the task's start, and a weight of 0 turns SG-KD off.
Also the split forward (the frozen trunk once, the last block for student and teacher) on the layouts the tiny
model does not use: tokens sequence-first and a tower without an output projection. Expected values from the
page's formulas and from the tower's own forward pass."""

from __future__ import annotations

import pytest
import torch

from components.settings.config_loading import load_config
from tests.method_harness import (
    Bench,
    image_features,
    images,
    info_nce,
    kl_bm,
    learned,
    nudge,
    tasks,
    text_features,
)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    import open_clip

    from components.model.backbones import register_builtin_configs, save_weights

    register_builtin_configs()
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sg-deep")
    path = root / "glyph.safetensors"
    sha = save_weights(open_clip.create_model("cliploop-glyph", pretrained=None), path)
    overrides = [
        "model.name=cliploop-glyph",
        "model.pretrained=null",
        f"model.checkpoint={path}",
        f"model.sha256={sha}",
    ]
    return Bench(load_config(overrides=overrides, env={}, cwd=root)), tasks(root)


X = images(4, seed=31)
SG = {"kappa": 5.0, "rl_weight": 0.3, "kd_weight": 0.7, "kd_temperature": 3.0, "memory_per_class": 0, "parity": False}


def _prompts(names) -> list[str]:
    return [f"a photo of a {name}" for name in names]


def test_only_the_last_of_three_blocks_trains_and_the_student_is_the_whole_tower(setting):
    bench, data = setting
    task = data["t-abc"]
    method = bench.begin("sg", SG, task)
    model = bench.backbone.model
    blocks = model.visual.transformer.resblocks
    assert len(blocks) == 3
    trained = method.trainable_parameters()
    assert all(n.startswith("visual.transformer.resblocks.2.") for n, _ in trained)
    assert {id(p) for _, p in trained} == {id(p) for p in blocks[2].parameters()}  # the named block's own tensors
    nudge([p for _, p in trained], seed=32)
    y = torch.tensor([0, 1, 2, 1])
    losses = method.training_step((X, y))
    sigma = model.logit_scale.exp()
    v, t = image_features(model, X), text_features(bench.backbone, _prompts(task.class_names))
    assert losses["con"].item() == pytest.approx(info_nce(v, t[y], sigma).item(), rel=1e-5)


def test_the_sg_kd_teacher_is_the_whole_tower_at_the_tasks_start_and_a_zero_weight_turns_it_off(setting):
    bench, data = setting
    backbone = bench.backbone
    old, new = data["t-a"], data["t-b"]
    method = bench.begin("sg", SG, new, learned("sg", backbone, old))
    nudge([p for _, p in method.trainable_parameters()], seed=33)  # the student moves away from the start
    y = torch.tensor([2, 3, 0, 2])  # cat, dog (old), emu, owl (new)
    losses = method.training_step((X, y))
    model, base = backbone.model, bench.base.model  # base: the weights this task started from
    sigma = model.logit_scale.exp()
    names = [*old.class_names, *new.class_names]
    t, n = text_features(backbone, _prompts(names)), text_features(backbone, names)
    r = n[y] @ t[:2].T  # cos(bare name of y_i, old prompt k)
    m, best = r.max(1)
    z_old = sigma * image_features(base, X) @ t[:2].T - m[:, None]
    z_old[torch.arange(4), best] += 2 * m
    z_new = sigma * image_features(model, X) @ t[:2].T
    assert losses["kd"].item() == pytest.approx((0.7 * 9.0 * kl_bm(z_old / 3.0, z_new / 3.0)).item(), rel=1e-4)

    off = bench.begin("sg", {**SG, "kd_weight": 0.0}, new, learned("sg", backbone, old))
    assert set(off.training_step((X, y))) == {"con", "rl"}  # no SG-KD term, not even a zero one


# ---- the split forward (trunk once, last block twice) on the other layouts open_clip builds ---------------


def _tiny_tower(seed: int):
    import open_clip

    from components.model.backbones import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(seed)
    return open_clip.create_model("cliploop-tiny", pretrained=None).eval().visual


def _split(visual, x):
    from components.methods.sg import head_features, trunk_features

    return head_features(visual, trunk_features(visual, x, 1), [visual.transformer.resblocks[1]])


def test_the_split_forward_equals_the_tower_when_tokens_run_sequence_first():
    """open_clip can build its transformer sequence-first (``batch_first=False``, (tokens, batch, width)); the
    same weights must give the same features through the split forward as through the tower itself."""
    from open_clip.transformer import Transformer

    visual = _tiny_tower(seed=34)
    seq_first = Transformer(width=64, layers=2, heads=2, batch_first=False)
    seq_first.load_state_dict(visual.transformer.state_dict())
    visual.transformer = seq_first.eval()
    x = torch.randn(3, 3, 32, 32)  # three images: attention over the wrong axis would mix them
    with torch.no_grad():
        assert torch.allclose(_split(visual, x), visual(x), atol=1e-5)


def test_the_split_forward_of_a_tower_without_a_projection_is_the_pooled_state():
    visual = _tiny_tower(seed=35)
    visual.proj = None  # open_clip's towers without an output projection
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = visual(x)
        assert full.shape == (2, 64) and torch.allclose(_split(visual, x), full, atol=1e-5)
