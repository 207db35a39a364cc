"""ZSCL (docs/methods/zscl.md): fine-tuning that keeps CLIP's zero-shot ability by distilling the base
model's image-text logits on a reference set, an L2 pull towards the task's starting weights, and a
running weight ensemble every 100 iterations that becomes the saved model.

The ensemble takes the weights *after* the optimizer step of iterations 0, 100, 200, ... (as the official
loop merges after ``optimizer.step()``), starting from the task's start weights, and the final weights
join it once training ends. The official loop runs ``iterations + 1`` steps, the last with a learning
rate of 0 under its cosine schedule, so its last merge is of the same final weights: the same sequence.

The distilled logits use the base model's text features on both sides (only the image tower feels the
distillation). The reference set, the base model as teacher and the joint forward are shared with GNSP
(components.methods.reference).

Data-parallel workers: the task and reference losses are over the global batches (the joint forward gathers
them); the L2 term's gradient is added after the gradients are averaged, from start weights that are the same
on every worker, so every worker's weights, and the ensemble merged from them, stay the same.
"""

from __future__ import annotations

import torch
from pydantic import Field

from components.methods import register_method
from components.methods.reference import ReferenceDistillation, ReferenceSettings
from components.methods.settings import StepInterval
from components.methods.tuning import image_text_distill


def l2_anchor(params: list[torch.Tensor], start: list[torch.Tensor]) -> torch.Tensor:
    """Sum over parameters of the squared distance to the task's starting weights."""
    return sum(((p.float() - s.float()) ** 2).sum() for p, s in zip(params, start))


def ensemble_update(average: list[torch.Tensor], current: list[torch.Tensor], merged: int) -> None:
    """In place: average <- (merged * average + current) / (merged + 1)."""
    for a, c in zip(average, current):
        a.mul_(merged / (merged + 1)).add_(c.detach().to(a.dtype), alpha=1 / (merged + 1))


class ZSCLSettings(ReferenceSettings):
    step_intervals = {
        **ReferenceSettings.step_intervals,
        # equal: merges after step 0 only, so the ensemble is the start, first-step and final weights
        "ensemble_every": StepInterval(True, "the weight ensemble would hold only the start, first and final weights"),
    }
    distill_weight: float = Field(1.0, ge=0)
    l2_weight: float = Field(1.0, ge=0)
    ensemble_every: int | None = Field(
        100, ge=1, description="merge into the weight ensemble every N iterations; null = off"
    )


@register_method("zscl")
class ZSCL(ReferenceDistillation):
    summary = "ZSCL: distil the base CLIP on a reference set, L2 to the start weights, periodic weight ensemble"
    Settings = ZSCLSettings
    data_parallel = True  # global batches through joint_forward; L2 and the ensemble from the same weights

    def setup(self) -> None:
        self.setup_reference()
        self.start = [p.detach().clone() for _, p in self.trainable]
        self.average = [p.detach().clone() for _, p in self.trainable]
        self.merged = 1  # the start weights count once in the ensemble
        self.final_merged = False

    def after_step(self, step: int) -> None:
        every = self.settings.ensemble_every
        self.final_merged = bool(every) and step % every == 0
        if self.final_merged:
            self._merge()

    def _merge(self) -> None:
        with torch.no_grad():
            ensemble_update(self.average, [p for _, p in self.trainable], self.merged)
        self.merged += 1

    def training_step(self, batch):
        step = self.joint_forward(*batch[:2])
        teacher_logits = self.scale * self.teacher.image[step.rows] @ self.teacher.text.T
        student_logits = self.scale * step.reference @ self.teacher.text.T
        return {
            "ce": step.ce,
            "distill": self.settings.distill_weight
            * image_text_distill(teacher_logits, student_logits, self.settings.temperature),
            "l2": self._l2_value(),
        }

    def _l2_value(self) -> torch.Tensor:
        # The distances are computed once per step, without a graph: their squared norms are the logged
        # value, and 2 * weight * (theta - theta_start), the term's gradient, is added in after_backward.
        # The same update as autograd through the sum, without a graph over every parameter.
        with torch.no_grad():
            self._distance = torch._foreach_sub([p for _, p in self.trainable], self.start)
            norms = torch._foreach_norm(self._distance)
            return self.settings.l2_weight * torch.stack(norms).float().pow(2).sum()

    def after_backward(self) -> None:
        if not self.settings.l2_weight:
            return
        pairs = [(p.grad, d) for (_, p), d in zip(self.trainable, self._distance) if p.grad is not None]
        torch._foreach_add_([g for g, _ in pairs], [d for _, d in pairs], alpha=2 * self.settings.l2_weight)

    def training_state(self) -> dict[str, torch.Tensor]:
        state = super().training_state()
        state.update({f"ensemble/{i}": a for i, a in enumerate(self.average)})
        state["ensemble_merged"] = torch.tensor(self.merged)
        state["ensemble_final_merged"] = torch.tensor(int(self.final_merged))
        return state

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_training_state(tensors)
        with torch.no_grad():
            for i, a in enumerate(self.average):
                a.copy_(tensors[f"ensemble/{i}"])
        self.merged = int(tensors["ensemble_merged"])
        self.final_merged = bool(int(tensors.get("ensemble_final_merged", torch.tensor(0))))

    def after_fit(self) -> None:
        if self.settings.ensemble_every:
            if not self.final_merged:
                self._merge()
            with torch.no_grad():
                for (_, p), a in zip(self.trainable, self.average):
                    p.copy_(a)
        del self.start, self.average
        self.release_reference()
