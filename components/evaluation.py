"""Evaluation after each step: accuracy on every task's test split, and on a held-out zero-shot set.

Label space of a task's test split: every class of the task's dataset the learner knows, plus the
task's own classes (classes not learned yet are scored zero-shot by the method). So class-incremental
accuracy is task-agnostic over all seen classes, and each MTIL dataset is scored in its own label space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from components.data import TaskData, make_loader
from components.methods.base import Context, Method

if TYPE_CHECKING:
    from components.state import LearnerState


def label_space(task: TaskData, state: LearnerState) -> tuple[list[str], dict[str, str]]:
    keys = [c.key for c in state.classes if c.dataset == task.dataset]
    names = {c.key: c.name for c in state.classes}
    for key, name in zip(task.class_keys, task.class_names):
        if key not in names:
            names[key] = name
        if key not in keys:
            keys.append(key)
    return keys, names


@torch.inference_mode()
def accuracy(method: Method, state: LearnerState, task: TaskData, ctx: Context, split: str = "test") -> float:
    """Top-1 accuracy in percent."""
    keys, names = label_space(task, state)
    position = {k: i for i, k in enumerate(keys)}
    truth_of_label = torch.tensor([position[k] for k in task.class_keys])
    correct = total = 0
    loader = make_loader(task.dataset_for(split, ctx.backbone.preprocess), ctx.batch_size, ctx.workers)
    for images, labels in loader:
        scores = method.scores(state, images, keys, names, ctx)
        correct += int((scores.argmax(dim=1).cpu() == truth_of_label[labels]).sum())
        total += len(labels)
    if total == 0:
        raise ValueError(f"task {task.task_id} has no {split} images")
    return 100.0 * correct / total
