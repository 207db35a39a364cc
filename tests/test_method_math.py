"""The methods' mathematics on tiny tensors, against values worked out by hand or from the definitions
in the method pages under docs/methods/, and the shared trainer's schedule and
resumable checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.methods import ctp, cvm, gnsp, sg, wise_ft, zscl
from components.methods.settings import TrainSettings
from components.methods.tuning import herding, kl_batchmean, soft_ce_distill, symmetric_info_nce
from components.training.trainer import lr_factor

# ---- GNSP -------------------------------------------------------------------------------------------------


def test_gram_update_normalises_each_batch_by_its_frobenius_norm():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = gnsp.gram_update(None, a)
    expected = torch.tensor([[1.0, 0.0], [0.0, 4.0]]) / math.sqrt(17)
    assert torch.allclose(g, expected)
    # A batch scaled by 10 counts the same as the original: only directions matter, not activation scale.
    assert torch.allclose(gnsp.gram_update(g, 10 * a), 2 * expected)
    # Token dimensions are rows: [batch, tokens, width] is flattened to [batch*tokens, width].
    assert torch.allclose(gnsp.gram_update(None, a.reshape(1, 2, 2)), expected)


def test_accumulate_renormalises_the_old_sum_only_when_asked():
    old, new = torch.diag(torch.tensor([3.0, 4.0])), torch.diag(torch.tensor([0.0, 2.0]))
    plain = gnsp.accumulate(old, new, renormalise_previous=False)
    assert torch.allclose(plain, old + torch.diag(torch.tensor([0.0, 1.0])))
    renormalised = gnsp.accumulate(old, new, renormalise_previous=True)
    assert torch.allclose(renormalised, old / 5 + torch.diag(torch.tensor([0.0, 1.0])))


def test_protected_rank_uses_plain_singular_value_tails_with_a_strict_threshold():
    s = torch.tensor([5.0, 3.0, 1.0, 1.0])  # tails: 10/10, 5/10, 2/10, 1/10
    assert gnsp.protected_rank(s, 0.15) == 3
    assert gnsp.protected_rank(s, 0.2) == 3  # 0.2 is not < 0.2
    assert gnsp.protected_rank(s, 0.21) == 2
    assert gnsp.protected_rank(torch.zeros(4), 0.15) == 0  # nothing seen: nothing protected
    assert gnsp.protected_rank(torch.tensor([1.0, 0.0]), 0.15) == 1


def test_projected_update_is_orthogonal_to_the_protected_subspace_and_keeps_old_outputs():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3))[0]  # old inputs live in a 3-d subspace of R^8
    old_inputs = torch.randn(50, 3) @ basis.T
    gram = gnsp.gram_update(None, old_inputs)
    proj, k = gnsp.projector(gram, 0.15)
    assert k <= 3
    # The protected directions are exactly the old inputs' span here (the rest has zero mass).
    proj_all, k_all = gnsp.projector(gram, 1e-4)  # the rest is float noise
    assert k_all == 3
    assert torch.allclose(proj_all @ basis, torch.zeros(8, 3), atol=1e-5)
    assert torch.allclose(proj_all @ proj_all, proj_all, atol=1e-5) and torch.allclose(proj_all, proj_all.T, atol=1e-6)

    # nn.Linear stores (out, in): G <- G P. With plain SGD the layer's outputs on old inputs do not move.
    layer = torch.nn.Linear(8, 5, bias=False)
    before = layer(old_inputs).detach()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(5):
        loss = (layer(torch.randn(16, 8)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        layer.weight.grad.copy_(gnsp.project(layer.weight.grad, proj_all, inputs_last=True))
        assert torch.allclose(layer.weight.grad @ basis, torch.zeros(5, 3), atol=1e-5)
        optimizer.step()
    assert not torch.allclose(layer.weight @ torch.randn(8), torch.zeros(5))  # it did learn something
    assert torch.allclose(layer(old_inputs), before, atol=1e-5)

    # visual.proj is stored (in, out): G <- P G, the same protection from the other side.
    weight = torch.randn(8, 5)
    step = gnsp.project(torch.randn(8, 5), proj_all, inputs_last=False)
    assert torch.allclose(old_inputs @ (weight - step), old_inputs @ weight, atol=1e-5)


def test_map_targets_share_mass_among_duplicate_captions():
    targets = gnsp.map_targets(torch.tensor([0, 1, 0]))
    assert torch.allclose(targets, torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]))


def test_cd_is_soft_cross_entropy_times_t_squared():
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = torch.softmax(teacher / 2, dim=1)
    expected = -(p * torch.log(torch.tensor([[0.5, 0.5]]))).sum() * 4
    assert soft_ce_distill(teacher, student, 2.0) == pytest.approx(float(expected))
    # soft CE = KL + the teacher's entropy
    entropy = -(p * p.log()).sum()
    assert soft_ce_distill(teacher, student, 2.0) == pytest.approx(
        float((kl_batchmean(teacher, student, 2.0) + entropy) * 4)
    )


def test_task_grams_hook_the_mlp_inputs_and_the_projection_input_of_a_vit():
    import open_clip

    from components.methods.sg import trunk_features
    from components.model.backbones import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("cliploop-tiny", pretrained=None).eval()
    images = torch.randn(3, 3, 32, 32)
    grams = gnsp.task_grams(model, [(images, None)], torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    names = [n for n, _ in gnsp.protected_layers(model)]
    assert set(grams) == set(names) and len(names) == 2 * 2 + 1
    assert grams["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape == (64, 64)
    assert grams["visual.transformer.resblocks.0.mlp.c_proj.weight"].shape == (256, 256)
    # The projection's input is the pooled, normalised [CLS] state: check against a by-hand forward.
    with torch.no_grad():
        tokens = trunk_features(model.visual, images, 2)
        pooled = model.visual._pool(tokens)[0]
    assert torch.allclose(grams["visual.proj"], gnsp.frobenius_normalised(pooled.T @ pooled), atol=1e-5)


# ---- SG ---------------------------------------------------------------------------------------------------


def test_soft_labels_are_distributions_with_most_mass_on_the_true_class():
    names = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    q = sg.soft_labels(names, kappa=13.0)
    assert torch.allclose(q.sum(dim=0), torch.ones(3))
    assert torch.equal(q.argmax(dim=0), torch.arange(3))
    # Semantically close classes share mass, unrelated ones get almost none.
    assert q[1, 0] > 0.3 and q[2, 0] < 1e-4
    # By the definition: exp(k cos) normalised over the column.
    cos = names @ names.T
    assert q[1, 0] == pytest.approx(float(torch.exp(13 * cos[1, 0]) / torch.exp(13 * cos[:, 0]).sum()), rel=1e-5)


def test_rl_loss_divides_by_batch_times_classes_in_parity_mode():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    kl_sum = float((targets * (targets.log() - logits.log_softmax(dim=1))).sum())
    assert sg.rl_loss(logits, targets, parity=True) == pytest.approx(kl_sum / 6)
    assert sg.rl_loss(logits, targets, parity=False) == pytest.approx(kl_sum / 2)


def test_adjust_teacher_raises_the_most_similar_old_class_and_lowers_the_others():
    teacher = torch.tensor([[1.0, 2.0, 3.0]])
    similarity = torch.tensor([[0.1, 0.6, 0.2]])
    assert torch.allclose(sg.adjust_teacher(teacher, similarity), torch.tensor([[0.4, 2.6, 2.4]]))


def test_kd_loss_is_zero_for_identical_logits_and_t_squared_kl_otherwise():
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    assert sg.kd_loss(a, a, 4.0) == pytest.approx(0.0, abs=1e-7)
    b = torch.zeros(2, 2)
    assert sg.kd_loss(a, b, 4.0) == pytest.approx(float(16 * kl_batchmean(a, b, 4.0)))


def test_sg_teacher_block_on_the_shared_trunk_equals_the_full_model():
    import open_clip

    from components.model.backbones import register_builtin_configs

    register_builtin_configs()
    torch.manual_seed(1)
    model = open_clip.create_model("cliploop-tiny", pretrained=None).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.encode_image(images)
        tokens = sg.trunk_features(model.visual, images, 1)
        split = sg.head_features(model.visual, tokens, [model.visual.transformer.resblocks[1]])
    assert torch.allclose(full, split, atol=1e-5)


# ---- CTP --------------------------------------------------------------------------------------------------


def test_momentum_update_blends_live_and_start_models():
    momentum, live, start = [torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([5.0])]
    ctp.momentum_update(momentum, live, start, m=0.9, alpha=0.5)
    assert momentum[0].item() == pytest.approx(0.9 * 1 + 0.05 * 3 + 0.05 * 5)  # 1.3
    first = [torch.tensor([1.0])]
    ctp.momentum_update(first, live, None, m=0.995, alpha=0.0)
    assert first[0].item() == pytest.approx(0.995 + 0.005 * 3)
    with pytest.raises(ValueError):
        ctp.momentum_update([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], None, 0.9, 0.5)


def test_enqueue_is_a_fifo_ring():
    queue = torch.zeros(2, 4)
    pointer = ctp.enqueue(queue, 0, torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert pointer == 3 and queue[0].tolist() == [1, 2, 3, 0]
    pointer = ctp.enqueue(queue, pointer, torch.tensor([[4.0, 4.0], [5.0, 5.0]]))
    assert pointer == 1 and queue[0].tolist() == [5, 2, 3, 4]
    # A batch larger than the queue: only its last four keys stay, and the next write replaces the oldest.
    pointer = ctp.enqueue(queue, pointer, torch.arange(6.0)[:, None].repeat(1, 2))
    assert sorted(queue[0].tolist()) == [2, 3, 4, 5]
    ctp.enqueue(queue, pointer, torch.tensor([[9.0, 9.0]]))
    assert sorted(queue[0].tolist()) == [3, 4, 5, 9]


def test_topology_loss_on_a_hand_made_case():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    text = image.clone()
    cross, intra = ctp.topology_loss(image, text, image, text, tau=0.07)
    assert cross.item() == pytest.approx(0.0, abs=1e-6) and intra.item() == pytest.approx(0.0, abs=1e-6)

    # The reference model saw the two texts as identical: its image->text rows are uniform.
    ref_text = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), dim=1)
    cross, intra = ctp.topology_loss(image, text, image, ref_text, tau=1.0)
    student = (image @ text.T).log_softmax(dim=1)  # rows [1, 0] and [0, 1]
    kl_i2t = float((0.5 * (math.log(0.5) - student)).sum(dim=1).mean())
    ref_t2i = ref_text @ image.T  # each row: equal similarity to both images -> uniform as well
    kl_t2i = float((ref_t2i.softmax(1) * (ref_t2i.log_softmax(1) - (text @ image.T).log_softmax(1))).sum(1).mean())
    assert cross.item() == pytest.approx(0.5 * (kl_i2t + kl_t2i), rel=1e-5)
    # Intra-modal: with two samples and self pairs masked, each row's only other entry takes all the mass.
    assert intra.item() == pytest.approx(0.0, abs=1e-6)


def test_cmc_positive_is_the_own_momentum_key():
    image = F.normalize(torch.eye(2), dim=1)
    loss_aligned = ctp.cmc_loss(
        image, image, image, image, -torch.ones(2, 4) / 2**0.5, -torch.ones(2, 4) / 2**0.5, 0.07
    )
    swapped = image.flip(0)
    loss_swapped = ctp.cmc_loss(
        image, image, swapped, swapped, -torch.ones(2, 4) / 2**0.5, -torch.ones(2, 4) / 2**0.5, 0.07
    )
    assert loss_aligned < 1e-3 < loss_swapped


# ---- ZSCL, WiSE-FT, replay, CVM --------------------------------------------------------------------------


def test_weight_ensemble_is_a_running_mean_that_keeps_the_start_weights():
    average = [torch.tensor([0.0])]  # start weights
    for merged, value in enumerate([3.0, 6.0], start=1):
        zscl.ensemble_update(average, [torch.tensor([value])], merged)
    assert average[0].item() == pytest.approx((0 + 3 + 6) / 3)


def test_l2_anchor_and_wise_ft_interpolation():
    assert zscl.l2_anchor([torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 0.0])]).item() == pytest.approx(5.0)
    mixed = wise_ft.interpolate(
        {"w": torch.tensor([10.0]), "n": torch.tensor([7])}, {"w": torch.tensor([0.0]), "n": torch.tensor([1])}, 0.8
    )
    assert mixed["w"].item() == pytest.approx(8.0) and mixed["n"].item() == 7


def test_herding_picks_the_sample_closest_to_the_mean_first_and_never_twice():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    picks = herding(features, 3)
    assert picks[0] in (2, 3) and len(set(picks)) == 3
    assert herding(features, 10) and len(herding(features, 10)) == 4
    # By hand: mean (0.533, 0.6). Alone, c = (0.6, 0.8) is nearest (0.21; a 0.76, b 0.67); then the running mean
    # with a, (0.8, 0.4), is nearer (0.33) than with b, (0.3, 0.9) (0.38); b comes last.
    assert herding(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), 3) == [2, 0, 1]
    # Mean (0.4, 0): (1, 0) is nearest (0.6); then the running mean with (-1, 0) is the origin, 0.4 from the mean,
    # nearer than with (0.8, ±0.6), (0.9, ±0.3), 0.58: the far sample is picked second, to pull the mean back.
    assert herding(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]), 2) == [0, 1]
    # The running mean after k picks is the SUM of the k picks over k (rows as plain numbers; mean 6). k=1: 7 is
    # nearest (1). k=2: (7+x)/2 gives 3.5, 5, 7.5, 9.5: 3 (at 5, 1 from 6). k=3: (7+3+x)/3 gives 3.33, 6, 7.33: 8
    # (at 6, exactly the mean). Means taken as (sum+x)*k, or over the last pick only, would pick 0 or 12.
    assert herding(torch.tensor([[0.0], [3.0], [7.0], [8.0], [12.0]]), 3) == [2, 1, 3]


def test_info_nce_and_cvm_concept_logits():
    x = F.normalize(torch.eye(3), dim=1)
    assert symmetric_info_nce(x, x, 100.0).item() < 1e-6
    logits = cvm.concept_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), tau=0.5)
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0]]))
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert cvm.mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


# ---- trainer ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_and_a_warmup_longer_than_the_run():
    s = TrainSettings(lr=1.0, warmup_steps=2, schedule="cosine")
    assert [round(lr_factor(i, 6, s), 6) for i in range(6)] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]
    long = TrainSettings(lr=1.0, warmup_steps=100)
    assert lr_factor(99, 50, long) == pytest.approx(1.0) and lr_factor(9, 50, long) == pytest.approx(0.1)
    assert lr_factor(5, 6, TrainSettings(lr=1.0, schedule="constant")) == 1.0


def test_per_task_settings_override_by_task_id_or_dataset():
    from components.methods.gnsp import GNSPSettings

    s = GNSPSettings(per_task={"aircraft": {"lr": 5e-5, "iterations": 100}, "t-7": {"rho": 0.2}})
    assert s.for_task("mtili-01-aircraft", "aircraft").lr == 5e-5
    assert s.for_task("mtili-01-aircraft", "aircraft").iterations == 100
    assert s.for_task("t-7", "x").rho == 0.2 and s.for_task("t-7", "x").lr == s.lr
    assert s.for_task("other", "cifar100") is s
    with pytest.raises(ValueError):
        GNSPSettings(per_task={"aircraft": {"lr": -1}}).for_task("a", "aircraft")


def test_zscl_l2_gradient_added_after_backward_equals_autograd():
    """ZSCL logs λ·Σ‖θ − θ_start‖² without a graph and adds its gradient 2λ(θ − θ_start) in ``after_backward``:
    the method's own hooks, on a hand-made parameter, against the hand-computed value and autograd."""
    from components.methods.zscl import ZSCL

    method = ZSCL({"l2_weight": 0.7})
    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    start = torch.tensor([[0.0, -1.0], [0.5, 1.0]])
    method.trainable, method.start = [("w", weight)], [start]
    assert method._l2_value().item() == pytest.approx(0.7 * (1 + 1 + 0 + 4))
    weight.grad = torch.full((2, 2), 10.0)  # what the other terms' backward left
    method.after_backward()
    assert torch.allclose(weight.grad, torch.tensor([[11.4, 8.6], [10.0, 12.8]]))  # 10 + 2 · 0.7 · (θ − θ_start)
    reference = torch.nn.Parameter(weight.detach().clone())
    (0.7 * ((reference - start) ** 2).sum()).backward()
    assert torch.allclose(weight.grad - 10.0, reference.grad)
    method.settings = method.settings.model_copy(update={"l2_weight": 0.0})
    method.after_backward()  # weight 0: nothing added
    assert torch.allclose(weight.grad, torch.tensor([[11.4, 8.6], [10.0, 12.8]]))


def test_reservoir_keeps_every_item_with_equal_probability():
    import random

    from components.methods.tuning import reservoir_update

    memory, seen = reservoir_update([], 0, list(range(3)), capacity=5, rng=random.Random(0))
    assert memory == [0, 1, 2] and seen == 3
    counts = [0] * 20
    for trial in range(2000):
        rng = random.Random(trial)
        memory, seen = reservoir_update([], 0, list(range(8)), 4, rng)  # two "tasks" of a stream
        memory, seen = reservoir_update(memory, seen, list(range(8, 20)), 4, rng)
        assert seen == 20 and len(memory) == 4 and len(set(memory)) == 4
        for item in memory:
            counts[item] += 1
    # Each of the 20 items is kept with probability 4/20: 400 of 2000 expected (binomial sd ~18).
    assert all(320 < c < 480 for c in counts), counts
