"""LwF for CLIP (docs/methods/lwf.md; as in ZSCL's MTIL code): fine-tune both towers on the task while
distilling the model the task started from, on the current task's images: image->text and
text->image logits against the task's class prompts, soft cross-entropy at temperature 2.

Data-parallel workers (components/model/replicas.py) distil the global batch: the student's image features come
gathered from the task loss, the teacher's are gathered alongside (the text->image direction is a softmax over the
batch, so a slice's loss would not be the batch's).
"""

from __future__ import annotations

import torch
from pydantic import Field

from components.methods import register_method
from components.methods.finetune import FineTune, FineTuneSettings
from components.methods.tuning import cached_image_features, frozen_copy, image_text_distill


class LwFSettings(FineTuneSettings):
    temperature: float = Field(2.0, gt=0)
    distill_weight: float = Field(1.0, ge=0)
    cache_teacher: bool = Field(
        True,
        description="with augment false, compute the teacher's image features once per "
        "task instead of every step (exact)",
    )


@register_method("lwf")
class LwF(FineTune):
    summary = "LwF: fine-tuning plus distillation of the previous model's image-text logits on current images"
    Settings = LwFSettings
    data_parallel = True  # both terms over the global batch; the teacher's features gathered, the same on every worker

    def setup(self) -> None:
        self.teacher = frozen_copy(self.model)
        with torch.no_grad():
            self.teacher_text = self.encode_text(self.label_tokens, self.teacher)
        # The teacher is frozen: without augmentation its image features are computed once per task (exact).
        self.teacher_image = None
        if self.settings.cache_teacher and not self.settings.augment:
            # Each worker encodes its own block of the training set and every worker gets the whole, in order.
            replicas, dataset = self.ctx.replicas, self.train_dataset()
            block = torch.utils.data.Subset(dataset, replicas.take(range(len(dataset))))
            self.teacher_image = replicas.gather(cached_image_features(self.teacher, block, self.ctx))

    def training_step(self, batch):
        images, labels = batch[:2]
        ce, features, text = self.task_loss(images, labels)  # features: the global batch's, in rank order
        with torch.no_grad():
            if self.teacher_image is not None and len(batch) > 2:
                teacher_image = self.teacher_image[batch[2]]
            else:
                teacher_image = self.encode_image(images, self.teacher)
            teacher_image = self.ctx.replicas.gather(teacher_image)  # the same rows, in the same order
            teacher_logits = self.scale * teacher_image @ self.teacher_text.T
        student_logits = self.scale * features @ text.T
        return {
            "ce": ce,
            "lwf": self.settings.distill_weight
            * image_text_distill(teacher_logits, student_logits, self.settings.temperature),
        }

    def end_task(self):
        del self.teacher, self.teacher_image
        return super().end_task()
