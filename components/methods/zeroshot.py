"""Zero-shot CLIP (docs/methods/zeroshot.md): the frozen model and class-prompt text embeddings, no training.

Never forgets; its plasticity is bounded by the zero-shot accuracy. The reference every method is
compared with.
"""

from __future__ import annotations

import torch

from components.methods import register_method
from components.methods.base import Context, Method


@register_method("zeroshot")
class ZeroShot(Method):
    summary = "Zero-shot CLIP: frozen model, text embeddings of class prompts; no training (the reference)"
    trains = False

    def begin_task(self, state, task, ctx: Context) -> None:
        self._state, self._task = state, task

    def end_task(self):
        state, task = self._state, self._task
        state.add_classes(task.task_id, task.dataset, list(zip(task.class_keys, task.class_names)))
        state.tasks.append(task.summary())
        return state

    def scores(self, state, images, class_keys, class_names, ctx: Context) -> torch.Tensor:
        from components.model.backbones import encode_batch

        return self.embedding_scores(state, encode_batch(ctx.backbone, images), class_keys, class_names, ctx)

    def embedding_scores(self, state, embeddings, class_keys, class_names, ctx: Context) -> torch.Tensor:
        text = self.key_text(class_keys, class_names, ctx)
        return embeddings @ torch.stack([text[k] for k in class_keys]).T
