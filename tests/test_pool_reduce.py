"""The pool reduce (components/model/pool_engine.py): partials come back from Ray's encoder actors in whatever order
they finish, and a pool's bytes must not depend on it. reduce_partials adds them up in part order (docs/contracts.md:
"reduced in shard order, so its bytes do not depend on the engine"), so for any arrival order its sums are the
left-to-right fp64 sum over parts 0, 1, 2, ... computed here with Python floats (IEEE binary64, one rounding per
addition, as the definition says), and its gathered embeddings are the parts' rows in part order. Property-based
(Hypothesis, derandomized so the suite stays reproducible); no Ray is started: the order is the driver's business.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from components.intake.shards import ShardWriter, write_index
from components.model.data import load_task
from components.model.pool_engine import Part, Partial, part_batches, reduce_partials, split_parts
from tests.drops import png_bytes

PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# Magnitudes far apart, so that fp64 addition is not associative on them: a sum in another order has other bits.
VALUES = st.sampled_from([0.0, 1.0, -1.0, 0.5, 3.0, 1e16, -1e16, 2.0**53, 1e-3, -7.25])


@st.composite
def partials_and_arrival(draw):
    """Partials of parts 0..n-1 (sums, counts and gathered rows of their own) and an order they arrive in."""
    n_classes, dim, n_parts = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 6))
    partials = []
    for index in range(n_parts):
        rows = draw(st.integers(1, 4))
        sums = torch.tensor(draw(st.lists(st.lists(VALUES, min_size=dim, max_size=dim), min_size=n_classes,
                                          max_size=n_classes)), dtype=torch.float64)  # fmt: skip
        counts = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=n_classes, max_size=n_classes)))
        embeddings = torch.full((rows, dim), float(index)) + torch.arange(rows, dtype=torch.float32)[:, None] / 10
        labels = torch.tensor(draw(st.lists(st.integers(0, n_classes - 1), min_size=rows, max_size=rows)))
        partials.append(Partial(index, sums, counts, embeddings, labels))
    return n_classes, dim, partials, draw(st.permutations(partials))


def by_definition(partials: list[Partial], n_classes: int, dim: int):
    """Sums and counts as the definition states them, one Python float addition at a time in part order."""
    ordered = sorted(partials, key=lambda p: p.part)
    sums = [[0.0] * dim for _ in range(n_classes)]
    counts = [0] * n_classes
    for partial in ordered:
        for c in range(n_classes):
            counts[c] += int(partial.counts[c])
            for k in range(dim):
                sums[c][k] = sums[c][k] + float(partial.sums[c, k])
    return sums, counts, ordered


def _three_parts_that_cancel():
    """1e16 + 1 rounds back to 1e16 in fp64: in part order (1e16, 1, -1e16) the sum is 0.0, in arrival order
    (1e16, -1e16, 1) it is 1.0."""
    parts = [Partial(i, torch.tensor([[v]], dtype=torch.float64), torch.tensor([1])) for i, v in
             enumerate([1e16, 1.0, -1e16])]  # fmt: skip
    for p in parts:
        p.embeddings, p.labels = torch.tensor([[float(p.part)]]), torch.tensor([0])
    return 1, 1, parts, [parts[0], parts[2], parts[1]]


@PROPERTY
@given(partials_and_arrival())
@example(_three_parts_that_cancel())
def test_any_arrival_order_reduces_to_the_part_order_sum(case):
    n_classes, dim, partials, arrived = case
    sums, counts, ordered = by_definition(partials, n_classes, dim)
    for gather in (False, True):
        reduced = reduce_partials(list(arrived), n_classes, dim, gather)
        assert reduced.sums.dtype == torch.float64 and reduced.counts.dtype == torch.int64
        assert reduced.sums.tolist() == sums  # bit for bit: Python floats compare exactly
        assert reduced.counts.tolist() == counts
        if not gather:
            assert reduced.embeddings is None and reduced.labels is None
            continue
        rows = [row for p in ordered for row in p.embeddings.tolist()]
        assert reduced.embeddings.tolist() == rows  # manifest order: part after part
        assert reduced.labels.tolist() == [label for p in ordered for label in p.labels.tolist()]
        assert reduced.embeddings.shape == (len(rows), dim)


def test_the_planted_example_does_depend_on_order():
    """The example above is a real witness: summed in arrival order it gives other bits than in part order."""
    _, _, partials, arrived = _three_parts_that_cancel()
    in_arrival = 0.0
    for p in arrived:
        in_arrival += float(p.sums[0, 0])
    assert in_arrival == 1.0 and by_definition(partials, 1, 1)[0] == [[0.0]]
    assert reduce_partials(arrived, 1, 1, gather=False).sums.tolist() == [[0.0]]


@PROPERTY
@given(partials_and_arrival())
def test_partials_crossing_as_safetensors_bytes_keep_their_part_and_tensors(case):
    """What a Ray actor hands back (Partial.to_bytes, never pickled) reads back as the same part and tensors, so
    the driver can still order them."""
    n_classes, dim, partials, arrived = case
    for gather in (False, True):
        back = []
        for p in arrived:
            sent = p if gather else Partial(p.part, p.sums, p.counts)
            got = Partial.from_bytes(sent.to_bytes())
            assert got.part == p.part and torch.equal(got.sums, p.sums) and torch.equal(got.counts, p.counts)
            assert got.sums.dtype == torch.float64
            if gather:
                assert torch.equal(got.embeddings, p.embeddings) and torch.equal(got.labels, p.labels)
            else:
                assert got.embeddings is None and got.labels is None
            back.append(got)
        assert reduce_partials(back, n_classes, dim, gather).sums.tolist() == by_definition(partials, n_classes, dim)[0]


@pytest.mark.parametrize("parts", [[0, 2], [1, 2], [0, 0, 1], [0, 1, 1], [1], [0, 1, 3]])
def test_a_missing_or_repeated_part_is_refused(parts):
    partials = [Partial(i, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)) for i in parts]
    with pytest.raises(RuntimeError, match="missing or repeated"):
        reduce_partials(partials, 2, 3, gather=False)


def test_no_partials_reduce_to_zeros_of_the_pool_shape():
    for gather in (False, True):
        reduced = reduce_partials([], 3, 4, gather)
        assert reduced.sums.shape == (3, 4) and reduced.sums.dtype == torch.float64 and not reduced.sums.any()
        assert reduced.counts.tolist() == [0, 0, 0] and reduced.counts.dtype == torch.int64
        if gather:
            assert reduced.embeddings.shape == (0, 4) and reduced.labels.shape == (0,)
            assert reduced.labels.dtype == torch.int64
        else:
            assert reduced.embeddings is None and reduced.labels is None


# ---- the parts a split is cut into -------------------------------------------------------------------------


def test_batches_stay_inside_their_part_in_order():
    parts = [Part(0, "a", 0, 5), Part(1, "b", 5, 7), Part(2, "c", 7, 8)]
    assert part_batches(parts, 2) == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert part_batches(parts, 3) == [[0, 1, 2], [3, 4], [5, 6], [7]]
    assert part_batches(parts, 10) == [[0, 1, 2, 3, 4], [5, 6], [7]]
    assert part_batches([], 4) == []


def test_a_stored_split_is_cut_into_maximal_runs_of_one_shard(tmp_path):
    """By the definition (pool_engine's docstring): maximal runs of consecutive rows of the split, in manifest order,
    whose bytes live in the same shard, numbered from 0. One image per shard (a tiny shard size), and rows that
    repeat an image share its shard: the train rows lie in shards a a b b b c a (a shard met again later starts a
    new part), with test rows (in shards b and c) between them."""
    folder = tmp_path / "t"
    writer = ShardWriter(folder / "shards", 1)  # every new image opens a shard of its own
    images = {name: png_bytes(300 + i) for i, name in enumerate("abc")}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in images.items()}
    for name in "abc":
        writer.add(digests[name], ".png", images[name])
    located = writer.close()
    layout = [("a", "train"), ("a", "train"), ("b", "train"), ("b", "test"), ("b", "train"), ("b", "train"),
              ("c", "train"), ("c", "test"), ("a", "train")]  # fmt: skip
    rows = []
    for i, (name, split) in enumerate(layout):
        where = located[digests[name] + ".png"]
        rows.append({"path": f"i/{i}.png", "label": "cat", "split": split, "sha256": digests[name], "format": "PNG",
                     "shard": where.shard, "offset": where.offset, "size": where.size})  # fmt: skip
    write_index(folder / "index.csv", rows)
    spec = {"task_id": "t", "scenario": "class-incremental", "dataset": "toy", "classes": ["cat"]}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    (folder / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{r['path']},cat,{r['split']}\n" for r in rows)
    )
    shard = {name: located[digests[name] + ".png"].shard for name in "abc"}
    assert len(set(shard.values())) == 3
    task = load_task(str(folder))
    try:
        assert split_parts(task, "train") == [
            Part(0, shard["a"], 0, 2), Part(1, shard["b"], 2, 5), Part(2, shard["c"], 5, 6), Part(3, shard["a"], 6, 7)
        ]  # fmt: skip
        assert split_parts(task, "test") == [Part(0, shard["b"], 0, 1), Part(1, shard["c"], 1, 2)]
    finally:
        task.source.close()


def test_a_drop_is_one_part(drops):
    task = load_task(str(drops[0]))
    assert split_parts(task, "train") == [Part(0, None, 0, len(task.train))]
    assert split_parts(task, "test") == [Part(0, None, 0, len(task.test))]


def test_each_parts_partial_holds_the_sums_and_counts_of_its_own_rows(tmp_path, tiny_backbone):
    """encode_parts, from its definition: one partial per part, in part order; a part's counts are its rows' labels
    counted, its sums their embeddings (each image encoded alone here) added per class in fp64, its gathered rows
    the part's own in manifest order; and every image is counted once (benchmarks read the counter). Batches of 2
    over parts of 3, 1 and 2 rows: a batch that crossed a part would show in the sums."""
    from components.model import pool_engine
    from components.model.backbones import encode_batch
    from components.model.pool_engine import encode_parts

    folder = tmp_path / "t"
    writer = ShardWriter(folder / "shards", 1)
    images = [png_bytes(900 + i) for i in range(3)]
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    for sha, data in zip(digests, images):
        writer.add(sha, ".png", data)
    located = writer.close()
    layout = [(0, "cat"), (0, "dog"), (0, "cat"), (1, "dog"), (2, "dog"), (2, "dog")]  # (image, label) per row
    rows = []
    for i, (image, label) in enumerate(layout):
        where = located[digests[image] + ".png"]
        rows.append({"path": f"i/{i}.png", "label": label, "split": "train", "sha256": digests[image], "format": "PNG",
                     "shard": where.shard, "offset": where.offset, "size": where.size})  # fmt: skip
    write_index(folder / "index.csv", rows)
    spec = {"task_id": "t", "scenario": "class-incremental", "dataset": "toy", "classes": ["cat", "dog"]}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    manifest = "".join(f"{r['path']},{r['label']},train\n" for r in rows)
    (folder / "manifest.csv").write_text("path,label,split\n" + manifest)
    task = load_task(str(folder))
    try:
        dataset = task.dataset_for("train", tiny_backbone.preprocess, "pillow", tiny_backbone.device)
        parts = split_parts(task, "train")
        assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 4), (4, 6)]
        before = pool_engine.encoded_images
        partials = encode_parts(tiny_backbone, dataset, parts, 2, batch_size=2, workers=0, gather=True)
        assert pool_engine.encoded_images - before == 6
        alone = torch.cat([encode_batch(tiny_backbone, dataset[i][0][None]) for i in range(6)])
        plain = encode_parts(tiny_backbone, dataset, parts, 2, batch_size=2, workers=0, gather=False)
    finally:
        task.source.close()
    labels = [0 if label == "cat" else 1 for _, label in layout]
    assert [p.part for p in partials] == [0, 1, 2]
    for part, partial in zip(parts, partials):
        own = range(part.start, part.stop)
        assert partial.labels.tolist() == [labels[i] for i in own]
        assert torch.allclose(partial.embeddings, alone[part.start : part.stop], atol=1e-6)
        assert partial.counts.tolist() == [sum(labels[i] == c for i in own) for c in (0, 1)]
        assert partial.sums.dtype == torch.float64 and partial.counts.dtype == torch.int64
        for c in (0, 1):
            expected = sum((alone[i].double() for i in own if labels[i] == c), torch.zeros(alone.shape[1]).double())
            assert torch.allclose(partial.sums[c], expected, atol=1e-6), (part, c)
    assert all(p.embeddings is None and p.labels is None for p in plain)
    assert all(torch.equal(a.sums, b.sums) for a, b in zip(plain, partials))
