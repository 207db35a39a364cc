"""The reference set ZSCL and GNSP distil on (docs/methods/README.md, "What every fine-tuning method shares";
docs/methods/gnsp.md, "Losses for one step"): another task drop named by ``reference_set`` (through the run's
resolver), ``reference_size`` of its training images drawn with ``reference_seed`` and kept in manifest order,
captioned with ``reference_caption``, and served in batches of ``reference_batch_size`` in order, wrapping
around. Expected rows and batches worked out by hand."""

from __future__ import annotations

import torch

from components.methods.base import Context
from components.methods.reference import ReferenceSet, ReferenceSettings, reference_for
from components.model.data import load_task
from tests.drops import make_task


def _batches(reference: ReferenceSet, k: int) -> list[list[int]]:
    return [reference.next_rows().tolist() for _ in range(k)]


def test_reference_batches_go_through_the_set_in_order_and_wrap_around(tiny_backbone, tmp_path):
    task = load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=3, test=1))  # 6 training images
    ctx = Context(tiny_backbone)
    four = ReferenceSet(task, ctx, size=100, batch_size=4, seed=0)
    assert _batches(four, 4) == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5], [0, 1, 2, 3]]
    # A batch larger than the set holds each image once.
    assert _batches(ReferenceSet(task, ctx, size=100, batch_size=9, seed=0), 2) == [[0, 1, 2, 3, 4, 5]] * 2
    five = ReferenceSet(task, ctx, size=100, batch_size=5, seed=0)
    assert _batches(five, 3) == [[0, 1, 2, 3, 4], [5, 0, 1, 2, 3], [4, 5, 0, 1, 2]]


def test_a_named_reference_set_is_drawn_with_its_seed_kept_in_order_and_captioned_as_asked(tiny_backbone, tmp_path):
    stream = load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=3, test=1))
    elsewhere = make_task(tmp_path, "ref", ["emu", "owl", "yak"], train=4, test=1)  # 12 training images
    ctx = Context(tiny_backbone, resolve=lambda name: str(elsewhere) if name == "demo:ref" else name)
    settings = ReferenceSettings(
        reference_set="demo:ref",
        reference_size=5,
        reference_batch_size=5,
        reference_seed=7,
        reference_caption="art of {}",
    )
    reference = reference_for(settings, stream, ctx)
    rows = sorted(torch.randperm(12, generator=torch.Generator().manual_seed(7))[:5].tolist())
    source = load_task(elsewhere)
    dataset = source.dataset_for("train", tiny_backbone.preprocess)
    assert torch.equal(reference.images, torch.stack([dataset[i][0] for i in rows]))
    captions = [f"art of {source.class_names[dataset[i][1]]}" for i in rows]
    assert reference.distinct == sorted(set(captions))
    assert [reference.distinct[i] for i in reference.caption_index] == captions
    other = reference_for(settings.model_copy(update={"reference_seed": 8}), stream, ctx)
    assert not torch.equal(other.images, reference.images)  # another seed draws other images
    # A plain path, in a context with no resolver (a library caller's): the same set.
    plain = settings.model_copy(update={"reference_set": str(elsewhere)})
    assert torch.equal(reference_for(plain, stream, Context(tiny_backbone)).images, reference.images)


def test_a_reference_set_without_training_images_is_refused_naming_it(tiny_backbone, tmp_path):
    import pytest

    from components.methods.base import MethodError

    empty = load_task(make_task(tmp_path, "t-empty", ["cat", "dog"], train=0, test=1))
    with pytest.raises(MethodError, match="^reference set t-empty has no training images$"):
        ReferenceSet(empty, Context(tiny_backbone), size=10, batch_size=2, seed=0)


def test_reference_captions_use_the_prompts_the_run_knows_for_the_sets_dataset(tiny_backbone, tmp_path):
    """With ``templates: task`` the captions take the first prompt of the reference set's dataset as the run
    knows it (from the first task of that dataset that brings prompts), even when this copy brings none."""
    task = load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=2, test=1))
    assert not task.prompts
    ctx = Context(tiny_backbone, templates="task", task_prompts={"toy": ["art of a {}.", "a {}."]})
    assert ReferenceSet(task, ctx, size=10, batch_size=2, seed=0).distinct == ["art of a cat.", "art of a dog."]
