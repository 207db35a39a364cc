"""SG-RL + SG-KD (docs/methods/sg.md): class-name semantics from the frozen text encoder
guide both the targets and the distillation. Only the image tower's last block trains.

- SG-RL: a sample of class y is trained towards column y of Q = softmax over classes of
  kappa * cos(name_k, name_j) (bare class names), over every class seen so far.
- SG-KD (from the second task): the previous model's logits on the old classes' prompts, with the old
  class most similar to the sample's class name raised by that similarity and the others lowered by
  it, distilled at temperature 4.
- plus CLIP's contrastive loss between images and their class captions, and a herding exemplar memory
  (20 per class) mixed into later tasks.

Because only the last block differs from the previous model, the teacher is that one block: the frozen
trunk runs once per batch for both, so SG-KD costs one extra block, not a second model.

``parity: true`` keeps the official code's quirks (KL divided by batch x classes, the similarity rounded
to fp16, bare names against templated prompts); ``parity: false`` uses batchmean KL.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from components.methods import register_method
from components.methods.tuning import (
    TunedCLIP,
    TuneSettings,
    kl_batchmean,
    normalize,
    symmetric_info_nce,
    visual_blocks,
)

# ---- mathematics (pure) ----------------------------------------------------------------------------------


def soft_labels(name_embeddings: torch.Tensor, kappa: float) -> torch.Tensor:
    """Q[k, j] = exp(kappa cos(n_k, n_j)) / sum_k' exp(kappa cos(n_k', n_j)): column j is the target of class j."""
    n = normalize(name_embeddings.float())
    return torch.softmax(kappa * n @ n.T, dim=0)


def rl_loss(logits: torch.Tensor, targets: torch.Tensor, parity: bool) -> torch.Tensor:
    """KL(targets || softmax(logits)); parity divides by batch x classes (PyTorch's old 'mean'), else by batch."""
    log_p = logits.float().log_softmax(dim=-1)
    kl = (targets * (targets.clamp_min(1e-30).log() - log_p)).sum()
    return kl / (logits.numel() if parity else len(logits))


def adjust_teacher(teacher_logits: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """Raise each row's most similar old class by its similarity m_i and lower every other class by m_i.

    ``similarity[i, k]`` = cos(bare name of sample i's class, prompt of old class k).
    """
    best, where = similarity.max(dim=1)
    adjusted = teacher_logits - best.unsqueeze(1)
    rows = torch.arange(len(teacher_logits), device=teacher_logits.device)
    adjusted[rows, where] = teacher_logits[rows, where] + best
    return adjusted


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * batch-mean KL(softmax_T(teacher) || softmax_T(student))."""
    return temperature * temperature * kl_batchmean(teacher_logits, student_logits, temperature)


# ---- split forward: a frozen trunk shared by student and teacher ---------------------------------------


def trunk_features(visual, images: torch.Tensor, blocks: int) -> torch.Tensor:
    """Token states after the first ``blocks`` blocks of an open_clip VisionTransformer."""
    x = visual._embeds(images)
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:blocks]:
        x = block(x)
    return x


def head_features(visual, tokens: torch.Tensor, blocks) -> torch.Tensor:
    """The rest of the image tower (given blocks, pooling, ln_post, projection), from trunk states."""
    for block in blocks:
        tokens = block(tokens)
    if not visual.transformer.batch_first:
        tokens = tokens.transpose(0, 1)
    pooled, _ = visual._pool(tokens)
    return pooled @ visual.proj if visual.proj is not None else pooled


# ---- the method ---------------------------------------------------------------------------------------------


class SGSettings(TuneSettings):
    optimizer: Literal["adamw", "sgd"] = Field("sgd")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(2e-4, ge=0)
    grad_clip: float | None = Field(10000.0, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    schedule: Literal["cosine", "constant"] = Field("constant")
    loss_classes: Literal["task", "seen"] = Field("seen")
    memory_per_class: int = Field(20, ge=0)
    kappa: float = Field(13.0, description="softness of the semantic soft labels")
    kd_temperature: float = Field(4.0, gt=0)
    rl_weight: float = Field(0.5, ge=0)
    kd_weight: float = Field(0.5, ge=0)
    parity: bool = Field(True, description="keep the official code's quirks (see the module docstring)")


@register_method("sg")
class SG(TunedCLIP):
    summary = (
        "SG-RL + SG-KD: soft targets and distillation guided by class-name text similarity; last image block trains"
    )
    Settings = SGSettings
    trained = frozenset({"image"})
    trained_note = "its last block only"
    # Its three losses are the global batch's (training_step); the teacher block, the soft labels and the name
    # similarities come from identical weights, the exemplar memory is the first worker's (docs/methods/sg.md).
    data_parallel = True

    def select_trainable(self):
        blocks = visual_blocks(self.model)
        last = len(blocks) - 1
        return [(f"visual.transformer.resblocks.{last}.{n}", p) for n, p in blocks[-1].named_parameters()]

    def setup(self) -> None:
        with torch.no_grad():
            names = [self.class_names[k] for k in self.label_keys]
            self.name_text = self.encode_text(self.tokenize(names))  # bare names, no template
            self.targets = soft_labels(self.name_text, self.settings.kappa)
            self.old_count = len(self.old_keys)  # label_keys start with the old classes when loss_classes is seen
            self.prompt_text = self.class_text()
            if self.old_count and self.label_keys[: self.old_count] == self.old_keys:
                similarity = self.name_text @ self.prompt_text[: self.old_count].T
                self.old_similarity = similarity.half().float() if self.settings.parity else similarity
                self.teacher_block = copy.deepcopy(visual_blocks(self.model)[-1]).eval().requires_grad_(False)
            else:
                self.teacher_block = None
        self.blocks = len(visual_blocks(self.model))

    def training_step(self, batch):
        # Every term is over the global batch: each worker's student and teacher features and labels are gathered
        # in rank order (model/replicas.py), so every worker computes one process's loss.
        replicas = self.ctx.replicas
        images, labels = batch[:2]
        visual = self.model.visual
        with torch.no_grad():
            tokens = trunk_features(visual, images, self.blocks - 1)
        student = replicas.gather(normalize(head_features(visual, tokens, [visual_blocks(self.model)[-1]]).float()))
        labels = replicas.gather(labels)
        text = self.prompt_text
        losses = {
            "con": symmetric_info_nce(student, text[labels], self.scale),
            "rl": self.settings.rl_weight
            * rl_loss(self.scale * student @ text.T, self.targets[:, labels].T, self.settings.parity),
        }
        if self.teacher_block is not None and self.settings.kd_weight > 0:
            with torch.no_grad():
                teacher = replicas.gather(normalize(head_features(visual, tokens, [self.teacher_block]).float()))
                teacher_logits = adjust_teacher(
                    self.scale * teacher @ text[: self.old_count].T, self.old_similarity[labels]
                )
            student_logits = self.scale * student @ text[: self.old_count].T
            losses["kd"] = self.settings.kd_weight * kd_loss(
                teacher_logits, student_logits, self.settings.kd_temperature
            )
        return losses

    def end_task(self):
        self.teacher_block = None
        return super().end_task()
