"""Reference distillation, shared by ZSCL and GNSP: both hold on to the base model's image-text alignment by
distilling it on a reference set of images and captions kept apart from the task stream.

What they share lives here: the settings of the reference set and of the distillation temperature, the
reference set itself, the teacher (the base model's features on it, computed once per task) and the
training forward that runs the task's and the reference's images through the student together. Each
method keeps only its own losses on top. This module registers no method itself.

Data-parallel workers (components/model/replicas.py) split each global reference batch as they split the task
batch: the same rows drawn in the same order on every worker (the cursor moves alike everywhere), each worker
encoding its ``take`` of them; the features are gathered, so the methods' losses are over the global batches. The
teacher's features are computed a block per worker and gathered: the same on every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from components.methods.base import Context, MethodError
from components.methods.finetune import FineTune, FineTuneSettings
from components.methods.tuning import normalize
from components.model.prompts import PromptTemplate


class ReferenceSettings(FineTuneSettings):
    reference_set: str | None = Field(
        None,
        description="task drop or stored task whose images and class captions are "
        "the reference set (official: 1000 ImageNet train images); null = the current "
        "task's images",
    )
    reference_size: int = Field(1000, ge=1)
    reference_batch_size: int = Field(64, ge=1)
    reference_seed: int = Field(42)
    temperature: float = Field(2.0, gt=0, description="temperature of the image-text distillation")
    reference_caption: PromptTemplate | None = Field(
        None,
        description="caption of a reference image, {} its class name; null = the first prompt template of the "
        "reference set's dataset, as the task's class prompts are made (default templates: 'a photo of a {}', "
        "the official caption)",
    )


class ReferenceSet:
    """Images and captions kept apart from the task stream, to hold on to the base model's alignment.

    The official codes use 1000 ImageNet train images ("a photo of a {class}"); here it is any task drop
    or stored task (``reference_set``), ``size`` of its training images drawn with ``seed`` and kept in
    manifest order. Without one, the current task's own training images stand in [ours]. Images are
    preprocessed once, without augmentation, so the base model's outputs on them are computed once per
    task, not every step.
    """

    def __init__(self, task, ctx: Context, size: int, batch_size: int, seed: int, caption: str | None = None):
        from components.model.data import make_loader
        from components.model.prompts import clean_class_name

        dataset = task.dataset_for("train", ctx.backbone.preprocess)
        rows = list(range(len(dataset)))
        if len(rows) > size:
            rows = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:size].tolist())
        subset = torch.utils.data.Subset(dataset, rows)
        images, labels = [], []
        for x, y in make_loader(subset, 256, ctx.workers):
            images.append(x)
            labels.append(y)
        if not images:
            raise MethodError(f"reference set {task.task_id} has no training images")
        self.images = torch.cat(images).to(ctx.backbone.weights_dtype)
        # The reference set's captions are in the learner's own prompt form: a model pretrained on other captions
        # than CLIP's would otherwise be distilled on text it never saw.
        template = caption.format if caption else ctx.templates_for(task.dataset, task.prompts)[0]
        captions = [template(clean_class_name(task.class_names[int(y)])) for y in torch.cat(labels)]
        self.distinct = sorted(set(captions))
        self.caption_index = torch.tensor([self.distinct.index(c) for c in captions])
        self.batch_size, self.cursor = batch_size, 0

    def __len__(self) -> int:
        return len(self.images)

    def next_rows(self) -> torch.Tensor:
        """The next batch of row indices, in order, wrapping around (no shuffling, as in the GNSP code)."""
        n = len(self.images)
        rows = torch.arange(self.cursor, self.cursor + min(self.batch_size, n)) % n
        self.cursor = int(rows[-1] + 1) % n
        return rows


def reference_for(settings: ReferenceSettings, task, ctx: Context) -> ReferenceSet:
    from components.model.data import load_task

    if settings.reference_set:
        location = ctx.resolve(settings.reference_set) if ctx.resolve else settings.reference_set
        source = load_task(location)
    else:
        source = task
    return ReferenceSet(
        source,
        ctx,
        settings.reference_size,
        settings.reference_batch_size,
        settings.reference_seed,
        settings.reference_caption,
    )


@dataclass(frozen=True)
class Teacher:
    """The base model's normalised features on the reference set: every image, and every distinct caption."""

    image: torch.Tensor  # [len(reference), d], on the device
    text: torch.Tensor  # [len(reference.distinct), d]


@dataclass(frozen=True)
class JointForward:
    """One training step's images through the student: the task's and the next reference batch's."""

    rows: torch.Tensor  # the reference rows of this step, the global batch's (on the device)
    captions: torch.Tensor  # their caption indices into ``reference.distinct`` (on the device)
    features: torch.Tensor  # normalised image features of the global task batch
    reference: torch.Tensor  # normalised image features of the global reference batch, in ``rows`` order
    ce: torch.Tensor  # the task loss: label-smoothed cross-entropy against the class prompts


class ReferenceDistillation(FineTune):
    """Fine-tuning with a reference set and the base model as its teacher (ZSCL, GNSP). Subclasses call
    ``setup_reference`` in their ``setup`` and ``joint_forward`` in their ``training_step``."""

    Settings = ReferenceSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.reference: ReferenceSet | None = None  # this task's, from setup_reference until after_fit
        self.teacher: Teacher | None = None

    def setup_reference(self) -> None:
        replicas = self.ctx.replicas
        self.reference = reference_for(self.settings, self.task, self.ctx)
        batch = min(self.reference.batch_size, len(self.reference))
        if batch < replicas.world:  # a worker without a reference image would have nothing to encode
            raise MethodError(
                f"{self.name}: a reference batch of {batch} images cannot be split over {replicas.world} workers "
                f"({len(self.reference)} reference images, reference_batch_size {self.reference.batch_size}); "
                "use fewer workers or a larger reference batch"
            )
        base = self.ctx.base_backbone
        with torch.no_grad(), base.autocast():
            image = torch.cat(
                [
                    normalize(base.model.encode_image(chunk.to(self.device, base.weights_dtype)).float())
                    for chunk in replicas.take(self.reference.images).split(256)  # this worker's block
                ]
            )
            text = normalize(base.model.encode_text(base.tokenizer(self.reference.distinct).to(self.device)).float())
        # Every worker's block in rank order: the whole reference set's features, the same tensor on every worker.
        self.teacher = Teacher(image=replicas.gather(image), text=text)

    def joint_forward(self, images: torch.Tensor, labels: torch.Tensor) -> JointForward:
        """The step's forward over the global batches: ``images`` and ``labels`` are this worker's slice of the
        task batch; the reference batch is drawn whole and this worker encodes its slice of it. The features come
        back gathered from every worker (the gather's backward returns each worker its rows' gradient)."""
        replicas = self.ctx.replicas
        rows = self.reference.next_rows()  # the global reference batch: the same rows on every worker
        mine = replicas.take(rows)
        # Task and reference images in one forward: one larger batch runs faster than two on a GPU.
        both = self.encode_image(torch.cat([images, self.reference.images[mine].to(self.device, images.dtype)]))
        features, reference = replicas.gather(both[: len(images)]), replicas.gather(both[len(images) :])
        ce = F.cross_entropy(
            self.scale * features @ self.class_text().T,
            replicas.gather(labels),
            label_smoothing=self.settings.label_smoothing,
        )
        return JointForward(
            rows=rows.to(self.device),
            captions=self.reference.caption_index[rows].to(self.device),
            features=features,
            reference=reference,
            ce=ce,
        )

    def release_reference(self) -> None:
        """Free the reference set and the teacher's features with the task."""
        self.reference, self.teacher = None, None

    def training_state(self) -> dict[str, torch.Tensor]:
        state = super().training_state()
        if self.reference is not None:  # which reference batch comes next
            state["reference_cursor"] = torch.tensor(self.reference.cursor)
        return state

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_training_state(tensors)
        if self.reference is not None and "reference_cursor" in tensors:
            self.reference.cursor = int(tensors["reference_cursor"])
