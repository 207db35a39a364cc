"""LVP-CLIP pools (docs/methods/lvp.md) on hand-made embeddings: the mathematics, order invariance, persistence,
merges of two tasks in every mode against the definition (tests/pool_reference.py), LVP-IT's and LVP-C's training
written out from the page, and the checks on a pool built elsewhere."""

from __future__ import annotations

import itertools

import pytest
import torch

from components.model.merged_pool import MergedPool, merge, per_class_max, similarity, train_head
from components.model.pools import (
    PoolConfig,
    PoolError,
    TaskPool,
    build_task_pool,
    class_sums,
    kmeans_l1,
    pool_from_sums,
    train_it_scalars,
)
from tests import pool_reference

D = 8
META = {"backbone": {"name": "m", "sha256": "x"}, "prompt_templates": "lvp"}


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def _random_task(task_id, keys, n_per_class, seed, cfg=None, domain=None):
    cfg = cfg or PoolConfig()
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(keys), D, generator=g), dim=-1)
    labels = torch.arange(len(keys)).repeat_interleave(n_per_class)
    e = torch.nn.functional.normalize(centres[labels] + 0.3 * torch.randn(len(labels), D, generator=g), dim=-1)
    text = torch.nn.functional.normalize(centres + 0.5 * torch.randn(len(keys), D, generator=g), dim=-1)
    pool = build_task_pool(task_id, e, labels, keys, [k.split("/")[1] for k in keys], text, cfg, META, domain=domain)
    return pool, e, labels


def test_class_sums_and_means_are_exact():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sums, counts = class_sums(e, torch.tensor([0, 0, 1]), 3)
    assert sums.dtype == torch.float64 and sums.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert counts.tolist() == [2, 1, 0]


def test_similarity_and_per_class_max():
    e = _unit([1.0, 0.0])
    v = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cos = similarity(e, v, "cosine")
    assert torch.allclose(cos, torch.tensor([[1.0, 0.0, 2**-0.5]]))  # vectors need not be normalised
    assert torch.allclose(similarity(e, v, "l1"), torch.tensor([[-1.0, -2.0, -1.0]]))
    best = per_class_max(cos, torch.tensor([0, 1, 1]), 3)
    assert best[0, 0] == 1.0 and best[0, 1] == pytest.approx(2**-0.5) and best[0, 2] == float("-inf")


def test_mean_pool_of_domain_tasks_is_bit_identical_in_any_order():
    """Three tasks share classes (domain-incremental): every merge order gives the same bits."""
    keys = ["d/cat", "d/dog", "d/emu"]
    pools = [_random_task(f"t{i}", keys if i else keys[:2], 5 + i, seed=i)[0] for i in range(3)]
    merged = [merge(list(order), PoolConfig()) for order in itertools.permutations(pools)]
    for m in merged[1:]:
        assert m.class_keys == merged[0].class_keys
        assert torch.equal(m.vectors, merged[0].vectors) and torch.equal(m.entry_class, merged[0].entry_class)
    # The mean is over every image of the class, whichever task brought it.
    total = sum(p.sums[0] for p in pools) / sum(int(p.counts[0]) for p in pools)
    assert torch.equal(merged[0].vectors[0], total.float())


def test_a_new_domain_adds_entries_for_known_classes():
    """Domain-incremental: mean-mode entries are per (class, domain); the same domain twice is one mean."""
    keys = ["d/cat", "d/dog"]
    paper, _, _ = _random_task("a", keys, 4, seed=1, domain="paper")
    more_paper, _, _ = _random_task("b", keys, 3, seed=2, domain="paper")
    chalk, _, _ = _random_task("c", keys, 5, seed=3, domain="chalk")
    merged = merge([chalk, paper, more_paper], PoolConfig())
    assert merged.entry_class.tolist() == [0, 1, 0, 1]  # (cat, paper), (dog, paper), (cat, chalk), (dog, chalk)
    assert torch.equal(merged.vectors[0], ((paper.sums[0] + more_paper.sums[0]) / 7).float())
    assert torch.equal(merged.vectors[2], (chalk.sums[0] / 5).float())
    for order in itertools.permutations([paper, more_paper, chalk]):
        assert torch.equal(merge(list(order), PoolConfig()).vectors, merged.vectors)


def test_lvp_t_is_zero_shot_text_and_lvp_i_uses_images():
    pool, e, labels = _random_task("t", ["d/a", "d/b"], 6, seed=3)
    text_only = merge([pool], PoolConfig(variant="lvp-t"))
    assert torch.allclose(text_only.scores(e), e @ pool.text.T, atol=1e-6)
    images = merge([pool], PoolConfig())
    assert torch.allclose(images.vectors, pool.image_means())
    accuracy = (images.scores(e).argmax(1) == labels).float().mean()
    assert accuracy > 0.9


def _two_tasks(cfg):
    """t-a teaches a, b, c; t-b teaches x and a again, so merged, t-b's labels 0 and 1 are the pool's 3 and 0."""
    return [
        _random_task("t-a", ["d/a", "d/b", "d/c"], 7, seed=4, cfg=cfg),
        _random_task("t-b", ["d/x", "d/a"], 6, seed=14, cfg=cfg),
    ]


def _same_rows(got, want, atol=1e-6):
    """The same rows, in any order."""
    distance = torch.cdist(got.double(), want.double())
    return got.shape == want.shape and distance.min(0).values.max() < atol and distance.min(1).values.max() < atol


TWO_TASK_CONFIGS = [
    PoolConfig(),
    PoolConfig(metric="l1"),
    PoolConfig(mode="bank"),
    PoolConfig(mode="bank", metric="l1"),
    PoolConfig(mode="cluster", clusters=3),
    PoolConfig(variant="lvp-t"),
    PoolConfig(variant="lvp-it", it_epochs=2, it_lr=0.05),
]


@pytest.mark.parametrize("cfg", TWO_TASK_CONFIGS, ids=lambda c: f"{c.variant}-{c.mode}-{c.metric}")
def test_two_tasks_merge_into_the_entries_the_definition_gives(cfg):
    tasks = _two_tasks(cfg)
    merged = merge([pool for pool, _, _ in reversed(tasks)], cfg)
    assert merged.class_keys == ["d/a", "d/b", "d/c", "d/x"] and merged.task_ids == ["t-a", "t-b"]
    table = pool_reference.entries(tasks, cfg)
    for c, key in enumerate(merged.class_keys):
        assert _same_rows(merged.vectors[merged.entry_class == c], torch.stack(table[key]).float()), key
    e = torch.cat([e for _, e, _ in tasks])
    expected = pool_reference.scores(tasks, cfg, e, merged.class_keys)
    assert torch.allclose(merged.scores(e), expected, rtol=0, atol=2e-5)


def test_bank_and_cluster_entries_keep_their_class_across_tasks():
    """Every training point of either task is its own nearest bank entry, so the bank recognises all of them
    (with owners left task-local, t-b's points are read as t-a's classes: accuracy 0.5); every centroid
    likewise is recognised as the class it was built from."""
    tasks = _two_tasks(PoolConfig(mode="bank"))
    merged = merge([pool for pool, _, _ in tasks], PoolConfig(mode="bank"))
    assert len(merged.vectors) == 21 + 12
    for pool, e, labels in tasks:
        assert merged.predict(e) == [pool.class_keys[i] for i in labels]

    cfg = PoolConfig(mode="cluster", clusters=3)
    tasks = _two_tasks(cfg)
    merged = merge([pool for pool, _, _ in tasks], cfg)
    assert merged.entry_class.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]
    for pool, _, _ in tasks:
        assert merged.predict(pool.centroids) == [pool.class_keys[i] for i in pool.centroid_labels]

    pool, _, _ = _random_task("t", ["d/a", "d/b"], 7, seed=5, cfg=cfg)
    assert pool.centroids.shape == (6, D) and pool.centroid_labels.tolist() == [0, 0, 0, 1, 1, 1]
    again, _, _ = _random_task("t", ["d/a", "d/b"], 7, seed=5, cfg=cfg)
    assert torch.equal(again.centroids, pool.centroids)  # seeded initialisation


def test_kmeans_l1_finds_separated_groups():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    centroids = kmeans_l1(points, 2, 10, torch.Generator().manual_seed(0))
    assert sorted(c[0].item() for c in centroids) == pytest.approx([0.05, 10.05])


def test_kmeans_assigns_by_l1_distance_and_keeps_an_empty_clusters_centroid():
    """From (1, 1) and (1.8, 0) as initial centroids, the origin is nearer (1.8, 0) in L1 (1.8 < 2) but (1, 1) in
    L2 (1.41 < 1.8): one L1 iteration gives centroids (1, 1) and (0.9, 0)."""
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.8, 0.0]])
    seed = next(
        s for s in range(100) if torch.randperm(3, generator=torch.Generator().manual_seed(s))[:2].tolist() == [1, 2]
    )
    centroids = kmeans_l1(points, 2, 1, torch.Generator().manual_seed(seed))  # initial: points 1 and 2, in order
    assert torch.allclose(centroids, torch.tensor([[1.0, 1.0], [0.9, 0.0]]))
    # k above the number of points: one centroid per point. A cluster no point joins keeps its centroid.
    assert len(kmeans_l1(points[:2], 5, 3, torch.Generator().manual_seed(0))) == 2
    # Two equal initial centroids: every point ties and joins the first; the second, empty, stays where it was.
    twin = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 1.0]])
    seed = next(
        s for s in range(100) if torch.randperm(3, generator=torch.Generator().manual_seed(s))[:2].tolist() == [0, 1]
    )
    centroids = kmeans_l1(twin, 2, 1, torch.Generator().manual_seed(seed))
    assert torch.allclose(centroids, torch.tensor([[7 / 3, 1.0], [1.0, 1.0]]))


def test_lvp_it_scalars_start_at_the_code_defaults_and_learn():
    pool, e, labels = _random_task("t", ["d/a", "d/b", "d/c"], 10, seed=6)
    untrained = train_it_scalars(e, labels, pool.text, pool.image_means(), PoolConfig(it_epochs=0))
    assert untrained.tolist() == [[0.5, 1.0]] * 3
    cfg = PoolConfig(it_epochs=50, it_lr=0.05)

    def loss(ab):
        u = ab[:, :1] * pool.text + ab[:, 1:] * pool.image_means()
        return torch.nn.functional.cross_entropy(-torch.cdist(e, u, p=1), labels)

    trained = train_it_scalars(e, labels, pool.text, pool.image_means(), cfg)
    assert loss(trained) < loss(untrained)
    # The official code's double softmax squashes the gradient: the scalars move much less.
    double = train_it_scalars(
        e, labels, pool.text, pool.image_means(), cfg.model_copy(update={"it_double_softmax": True})
    )
    assert (double - untrained).abs().sum() < (trained - untrained).abs().sum()


@pytest.mark.parametrize("double", [False, True])
def test_lvp_it_scalars_are_sgd_on_l1_logits_against_the_class_means(double):
    """Written out from docs/methods/lvp.md: u_c = a_c t_c + b_c i_c with i_c the class MEAN of the task's
    embeddings, CE on −‖e − u_c‖₁ (after a softmax too, with it_double_softmax), plain SGD, unshuffled batches."""
    cfg = PoolConfig(variant="lvp-it", it_epochs=3, it_lr=0.05, it_batch=7, it_double_softmax=double)
    pool, e, labels = _random_task("t", ["d/a", "d/b", "d/c"], 5, seed=6, cfg=cfg)
    means = torch.stack([e[labels == c].mean(0) for c in range(3)])
    a = torch.full((3,), 0.5, requires_grad=True)
    b = torch.full((3,), 1.0, requires_grad=True)
    for _ in range(3):
        for start in range(0, len(e), 7):  # 15 points: batches of 7, 7 and 1, in order
            x, y = e[start : start + 7], labels[start : start + 7]
            u = a[:, None] * pool.text + b[:, None] * means
            logits = -(x[:, None, :] - u[None, :, :]).abs().sum(-1)
            if double:
                logits = torch.softmax(logits, dim=1)
            loss = -(logits - torch.logsumexp(logits, 1, keepdim=True))[torch.arange(len(y)), y].mean()
            grad_a, grad_b = torch.autograd.grad(loss, [a, b])
            with torch.no_grad():
                a -= 0.05 * grad_a
                b -= 0.05 * grad_b
    assert torch.allclose(pool.it_ab, torch.stack([a, b], dim=1).detach(), atol=1e-5)
    assert (pool.it_ab - torch.tensor([[0.5, 1.0]])).abs().max() > 1e-3  # they did move


def test_lvp_c_head_is_adam_on_the_two_tasks_lvp_it_vectors():
    """The head h(e) = W e + b, initialised under the seed, trained with Adam on one LVP-IT vector per (class,
    task), in task-id order, in batches of the number of classes."""
    cfg = PoolConfig(variant="lvp-c", it_epochs=2, c_epochs=4, c_lr=0.03, seed=3)
    tasks = _two_tasks(cfg)
    merged = train_head(merge([pool for pool, _, _ in reversed(tasks)], cfg), cfg)
    vectors, targets = [], []
    for pool, e, labels in tasks:  # t-a: a, b, c; t-b: x, a
        for c, key in enumerate(pool.class_keys):
            a, b = pool.it_ab[c]
            vectors.append(a * pool.text[c] + b * e[labels == c].mean(0))
            targets.append(["d/a", "d/b", "d/c", "d/x"].index(key))
    vectors, targets = torch.stack(vectors), torch.tensor(targets)
    torch.manual_seed(3)
    head = torch.nn.Linear(D, 4)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.03)
    for _ in range(4):
        for start in range(0, 5, 4):
            logits = head(vectors[start : start + 4])
            y = targets[start : start + 4]
            loss = -(logits - torch.logsumexp(logits, 1, keepdim=True))[torch.arange(len(y)), y].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.allclose(merged.head.weight, head.weight, atol=1e-5)
    assert torch.allclose(merged.head.bias, head.bias, atol=1e-5)


def test_lvp_it_entries_and_lvp_c_head():
    cfg = PoolConfig(variant="lvp-it", it_epochs=2)
    pool, e, labels = _random_task("t", ["d/a", "d/b"], 6, seed=7, cfg=cfg)
    merged = merge([pool], cfg)
    expected = pool.it_ab[:, :1] * pool.text + pool.it_ab[:, 1:] * pool.image_means()
    assert torch.allclose(merged.vectors, expected)

    cfg_c = PoolConfig(variant="lvp-c", it_epochs=2)
    pool_c, e, labels = _random_task("t", ["d/a", "d/b"], 6, seed=7, cfg=cfg_c)
    head_pool = train_head(merge([pool_c], cfg_c), cfg_c)
    assert isinstance(head_pool.head, torch.nn.Linear)
    assert torch.equal(head_pool.head(head_pool.vectors).argmax(1), head_pool.entry_class)  # fits its training set
    assert torch.equal(head_pool.scores(e), head_pool.head(e))
    twice = train_head(merge([pool_c], cfg_c), cfg_c)
    assert torch.equal(twice.head.weight, head_pool.head.weight)  # seeded: the same head every time


def test_classes_outside_the_pool_use_the_text_fallback():
    pool, e, _ = _random_task("t", ["d/a"], 4, seed=8)
    merged = merge([pool], PoolConfig())
    other = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(1)), dim=0)
    scores = merged.scores(e, ["d/a", "d/z"], fallback_text={"d/z": other})
    assert torch.allclose(scores[:, 1], e @ other)
    with pytest.raises(PoolError, match="no text fallback"):
        merged.scores(e, ["d/a", "d/unknown"])


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    pool, _, _ = _random_task("t-1", ["d/a", "d/b"], 4, seed=9, cfg=PoolConfig(mode="bank"))
    files = pool.save(tmp_path)
    assert set(files) == {"t-1.safetensors", "t-1.json"}
    loaded = TaskPool.load(tmp_path, "t-1")
    assert torch.equal(loaded.sums, pool.sums) and torch.equal(loaded.bank, pool.bank)
    assert loaded.class_keys == pool.class_keys and loaded.meta == pool.meta
    assert pool.save(tmp_path / "again") == files  # same pool, same bytes
    blob = tmp_path / "t-1.safetensors"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(PoolError, match="does not match"):
        TaskPool.load(tmp_path, "t-1")
    with pytest.raises(PoolError, match="no pool for task 't-2'"):
        TaskPool.load(tmp_path, "t-2")


def test_merge_refuses_pools_from_different_backbones_and_bad_settings():
    a, _, _ = _random_task("a", ["d/a"], 3, seed=1)
    b, _, _ = _random_task("b", ["d/b"], 3, seed=2)
    b.meta = {**b.meta, "backbone": {"name": "other"}}
    with pytest.raises(PoolError, match="different backbone"):
        merge([a, b], PoolConfig())
    b, _, _ = _random_task("b", ["d/b"], 3, seed=2)
    b.meta = {**b.meta, "prompt_templates": "ensemble"}
    with pytest.raises(PoolError, match="different prompt_templates"):
        merge([a, b], PoolConfig())
    with pytest.raises(PoolError, match="the same task id"):
        merge([a, _random_task("a", ["d/c"], 3, seed=3)[0]], PoolConfig())
    wide = build_task_pool(
        "w", torch.eye(2, D + 1), torch.tensor([0, 0]), ["d/w"], ["w"], torch.eye(1, D + 1), PoolConfig(), META
    )
    with pytest.raises(PoolError, match=f"a \\(d={D}\\) and w \\(d={D + 1}\\) differ in dimension"):
        merge([a, wide], PoolConfig())
    with pytest.raises(PoolError, match="no LVP-IT scalars"):
        merge([a], PoolConfig(variant="lvp-it"))
    with pytest.raises(PoolError, match="no centroids"):
        merge([a], PoolConfig(mode="cluster"))
    with pytest.raises(PoolError, match="no pools"):
        merge([], PoolConfig())
    with pytest.raises(PoolError, match="mode 'bank' / variant 'lvp-i' needs the embeddings"):
        pool_from_sums("x", a.sums, a.counts, None, None, a.class_keys, a.class_names, a.text, PoolConfig(mode="bank"))
    with pytest.raises(PoolError, match="3 embeddings but 2 labels"):
        build_task_pool("x", torch.eye(3, D), torch.tensor([0, 0]), ["d/x"], ["x"], torch.eye(1, D), PoolConfig(), META)
    with pytest.raises(PoolError, match="no bank"):
        merge([a], PoolConfig(mode="bank"))
    with pytest.raises(ValueError, match="needs mode 'mean'"):
        PoolConfig(variant="lvp-it", mode="bank")
    with pytest.raises(ValueError):
        PoolConfig(colour="red")
    assert isinstance(merge([a], PoolConfig()), MergedPool)


@pytest.mark.parametrize("variant", ["lvp-i", "lvp-it", "lvp-t"])
def test_a_class_without_training_images_gets_no_image_entry(variant):
    """A class a task declares but has no training image of: no image entry (mean or LVP-IT), only its text
    (LVP-T); its score is then -inf unless another task taught it."""
    cfg = PoolConfig(variant=variant, it_epochs=1)
    e = torch.nn.functional.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(9)), dim=-1)
    text = torch.eye(3, D)
    pool = build_task_pool("t", e, torch.tensor([0, 0, 2, 2]), ["d/a", "d/b", "d/c"], ["a", "b", "c"], text, cfg, META)
    merged = merge([pool], cfg)
    owners = merged.entry_class.tolist()
    assert owners == ([0, 1, 2] if variant == "lvp-t" else [0, 2])
    scores = merged.scores(e)
    assert torch.isfinite(scores[:, 1]).all() == (variant == "lvp-t")
    assert torch.isfinite(scores[:, [0, 2]]).all() and torch.isfinite(merged.vectors).all()
