"""Evaluation after each step: accuracy on every task's test split, and on a held-out zero-shot set.

Label space of a task's test split: every class of the task's dataset the learner knows, plus the
task's own classes (classes not learned yet are scored zero-shot by the method). So class-incremental
accuracy is task-agnostic over all seen classes, and each MTIL dataset is scored in its own label space.

A method whose image encoder is frozen (``Method.encodes_frozen``: LVP, zero-shot) is scored from embeddings:
read from the embedding cache when the context carries one (components/model/embedding_cache.py), so a chain of T tasks
encodes each test image once, not T times. Any other method (a fine-tuned encoder) is scored from images, as it
changes with every task. Either way the splits of one call are read through one loader, whose workers start once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from components.methods.base import Context, Method
from components.model.data import TaskData
from components.support.progress import tracked

if TYPE_CHECKING:
    from components.model.state import LearnerState


def label_space(task: TaskData, state: LearnerState) -> tuple[list[str], dict[str, str]]:
    keys = [c.key for c in state.classes if c.dataset == task.dataset]
    names = {c.key: c.name for c in state.classes}
    for key, name in zip(task.class_keys, task.class_names):
        if key not in names:
            names[key] = name
        if key not in keys:
            keys.append(key)
    return keys, names


class _Tally:
    """Top-1 hits of one task's split, batch by batch, in its label space."""

    def __init__(self, task: TaskData, state: LearnerState):
        self.task = task
        self.keys, self.names = label_space(task, state)
        position = {k: i for i, k in enumerate(self.keys)}
        self.truth_of_label = torch.tensor([position[k] for k in task.class_keys])
        self.correct = self.total = 0

    def add(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += int((scores.argmax(dim=1).cpu() == self.truth_of_label[labels]).sum())
        self.total += len(labels)

    def percent(self, split: str) -> float:
        if self.total == 0:
            raise ValueError(f"task {self.task.task_id} has no {split} images")
        return 100.0 * self.correct / self.total


@torch.inference_mode()
def evaluate(
    method: Method, state: LearnerState, tasks: list[TaskData], ctx: Context, split: str = "test"
) -> dict[str, float]:
    """Top-1 accuracy in percent of each task's ``split``, by task id."""
    if not tasks:
        return {}
    tallies = [_Tally(task, state) for task in tasks]
    if method.encodes_frozen():
        from components.model.embedding_cache import split_embeddings

        for group in _groups(tallies, split):  # a bounded number of embeddings in memory at a time
            for tally, embeddings in zip(group, split_embeddings(ctx, [t.task for t in group], split)):
                labels = torch.tensor([label for _, label in tally.task.split(split)], dtype=torch.long)
                for start in range(0, len(labels), ctx.batch_size):
                    batch = embeddings[start : start + ctx.batch_size]
                    scores = method.embedding_scores(state, batch, tally.keys, tally.names, ctx)
                    tally.add(scores, labels[start : start + len(batch)])
    else:
        owners, loader = _one_loader(tasks, split, ctx)
        total = sum(len(task.split(split)) for task in tasks)
        what = f"evaluate {tasks[0].task_id} ({split})" if len(tasks) == 1 else f"evaluate {len(tasks)} tasks ({split})"
        with tracked(total, what, unit="img") as done:
            for owner, (images, labels) in zip(owners, loader):
                tally = tallies[owner]
                tally.add(method.scores(state, images, tally.keys, tally.names, ctx), labels)
                done.advance(len(labels))
    return {tally.task.task_id: tally.percent(split) for tally in tallies}


def accuracy(method: Method, state: LearnerState, task: TaskData, ctx: Context, split: str = "test") -> float:
    """Top-1 accuracy in percent of one task's split."""
    return evaluate(method, state, [task], ctx, split)[task.task_id]


GROUP_IMAGES = 65536  # embeddings of at most this many images (or one split) held at once: 200 MB at 768 dims


def _groups(tallies: list[_Tally], split: str) -> list[list[_Tally]]:
    """Consecutive tasks whose splits hold together at most GROUP_IMAGES images (a larger split alone)."""
    groups: list[list[_Tally]] = []
    size = 0
    for tally in tallies:
        n = len(tally.task.split(split))
        if not groups or size + n > GROUP_IMAGES:
            groups.append([])
            size = 0
        groups[-1].append(tally)
        size += n
    return groups


def _one_loader(tasks: list[TaskData], split: str, ctx: Context):
    """One DataLoader over the splits of all ``tasks`` (its workers start once), each batch within one task, in the
    batches a loader per task would make; and the index of the task each batch belongs to."""
    from torch.utils.data import DataLoader

    from components.model.data import ConcatImages, finished_batches

    datasets = [task.dataset_for(split, ctx.backbone.preprocess, ctx.decoder, ctx.backbone.device) for task in tasks]
    batches, owners, offset = [], [], 0
    for owner, dataset in enumerate(datasets):
        for start in range(0, len(dataset), ctx.batch_size):
            batches.append(list(range(offset + start, offset + min(start + ctx.batch_size, len(dataset)))))
            owners.append(owner)
        offset += len(dataset)
    joined = ConcatImages(datasets)
    loader = DataLoader(
        joined,
        batch_sampler=batches,
        num_workers=ctx.workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if ctx.workers > 0 else None,
        collate_fn=joined.collate,
    )
    return owners, finished_batches(loader, joined)  # a tensor decoder's batches decoded on the device
