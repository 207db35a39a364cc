"""GNSP (docs/methods/gnsp.md): gradient null-space projection, contrastive distillation (CD)
and modality-alignment preservation (MAP).

After each task, the inputs of the image tower's MLP layers (``c_fc``, ``c_proj`` of every block) and of
``visual.proj`` are summarised as uncentred Gram matrices over the task's training set, each batch
normalised by its Frobenius norm, the task's sum renormalised, and added to the running sum of earlier
tasks. From the second task on, only those matrices train, and each gradient is projected onto the
directions that carry less than rho (0.15) of the sum of singular values: an update there barely moves
the layer's outputs on old tasks' inputs. CD and MAP on a reference set keep the base model's image-text
alignment.

Two documented choices:

- ``project: gradient`` (default, as the official code) projects the gradient and then lets AdamW
  step; AdamW's per-element scaling rotates the step slightly out of the null space.
  ``project: update`` projects the whole optimizer step instead (Adam-NSCL style), so the update stays
  exactly in the null space.
- The first task trains both towers in full (no old task to protect); later tasks only the 2L+1
  image-tower matrices, so the text tower keeps its first-task state.

Data-parallel workers (components/model/replicas.py): the losses are over the global batches (the joint forward
of components.methods.reference); each worker runs the Gram pass over its own share of the task's Gram batches
and the per-batch sums are added over the workers before the task's sum is normalised, so every worker stores one
process's Grams; the projectors are the first worker's, broadcast, and act on the averaged gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from components.methods import register_method
from components.methods.base import MethodError
from components.methods.reference import ReferenceDistillation, ReferenceSettings
from components.methods.tuning import image_text_distill, visual_blocks
from components.model.replicas import SINGLE, Replicas

GRAM_PREFIX = "gnsp.gram."

# ---- mathematics (pure) ----------------------------------------------------------------------------------


def gram_update(running: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """Add one batch's Gram matrix X^T X (rows = input vectors), divided by its Frobenius norm, in fp32."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    gram = x.T @ x
    norm = torch.linalg.matrix_norm(gram)
    if norm > 0:
        gram = gram / norm
    return gram if running is None else running + gram


def frobenius_normalised(matrix: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(matrix)
    return matrix / norm if norm > 0 else matrix


def accumulate(previous: torch.Tensor | None, task_gram: torch.Tensor, renormalise_previous: bool) -> torch.Tensor:
    """Running sum over tasks of Frobenius-normalised task Grams.

    The official code renormalises the old sum before adding only for ``visual.proj``
    (``renormalise_previous``); the MLP layers simply add, so every task has equal mass.
    """
    current = frobenius_normalised(task_gram)
    if previous is None:
        return current
    return (frobenius_normalised(previous) if renormalise_previous else previous) + current


def protected_rank(singular_values: torch.Tensor, rho: float) -> int:
    """Smallest k with sum(S[k:]) / sum(S) < rho (S descending, plain values, strict <).

    The first k directions carry more than 1 - rho of the spectral mass and are protected. An all-zero
    matrix protects nothing (k = 0).
    """
    total = singular_values.sum()
    if total <= 0:
        return 0
    tail = singular_values.flip(0).cumsum(0).flip(0) / total  # tail[k] = sum(S[k:]) / sum(S)
    below = (tail < rho).nonzero()
    return int(below[0]) if len(below) else len(singular_values)


def null_space(gram: torch.Tensor, rho: float) -> tuple[torch.Tensor, int]:
    """Orthonormal basis V0 (columns) of the unprotected directions of a symmetric PSD Gram, and k."""
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)  # eigh is ascending
    k = protected_rank(values, rho)
    return vectors[:, k:].to(gram.dtype), k


def projector(gram: torch.Tensor, rho: float) -> tuple[torch.Tensor, int]:
    """P = V0 V0^T, the orthogonal projector onto the null space; and the protected rank k."""
    basis, k = null_space(gram, rho)
    return basis @ basis.T, k


def project(grad: torch.Tensor, proj: torch.Tensor, inputs_last: bool) -> torch.Tensor:
    """Project a weight's gradient (or update) on the input side.

    ``inputs_last``: the weight is stored (out, in) like nn.Linear, so G <- G P; else (in, out) like
    ``visual.proj``, so G <- P G.
    """
    return grad @ proj.T if inputs_last else proj @ grad


def map_targets(caption_index: torch.Tensor) -> torch.Tensor:
    """MAP soft targets: rows share their mass among the batch's items with the same caption."""
    same = (caption_index.unsqueeze(0) == caption_index.unsqueeze(1)).float()
    return same / same.sum(dim=1, keepdim=True)


def map_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Soft-target CE both ways, with label smoothing on top of the soft targets."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing) + F.cross_entropy(
        logits.T.float(), targets.T, label_smoothing=label_smoothing
    )


# ---- typed state: the running Gram sums, one per projected matrix ------------------------------------------
# Persisted, not the projectors (docs/methods/gnsp.md, "Per-task state"): P is recomputed from them at the
# start of a task.


def gram_sums(state) -> dict[str, torch.Tensor]:
    """Parameter name -> running Gram sum, from a learner state (empty before the first task ends)."""
    return {k[len(GRAM_PREFIX) :]: v for k, v in state.method_tensors.items() if k.startswith(GRAM_PREFIX)}


def store_gram_sums(state, sums: dict[str, torch.Tensor]) -> None:
    for name, gram in sums.items():
        state.method_tensors[GRAM_PREFIX + name] = gram.float().contiguous()


# ---- which matrices ---------------------------------------------------------------------------------------


def protected_layers(model: torch.nn.Module) -> list[tuple[str, bool]]:
    """(parameter name, inputs_last) of the projected matrices: 12x c_fc, 12x c_proj, visual.proj for ViT-B."""
    names = []
    for i, _ in enumerate(visual_blocks(model)):
        prefix = f"visual.transformer.resblocks.{i}.mlp"
        names += [(f"{prefix}.c_fc.weight", True), (f"{prefix}.c_proj.weight", True)]
    if getattr(model.visual, "proj", None) is None:
        raise MethodError("GNSP needs the image tower's output projection (visual.proj)")
    names.append(("visual.proj", False))
    return names


def protected_layers_for_names(state_dict: dict) -> list[tuple[str, bool]]:
    """The same list from a state dict's names (for code that has weights but no model)."""
    blocks = sorted({int(k.split(".")[3]) for k in state_dict if k.startswith("visual.transformer.resblocks.")})
    names = []
    for i in blocks:
        prefix = f"visual.transformer.resblocks.{i}.mlp"
        names += [(f"{prefix}.c_fc.weight", True), (f"{prefix}.c_proj.weight", True)]
    return names + [("visual.proj", False)]


@torch.no_grad()
def task_grams(
    model: torch.nn.Module, batches, device: torch.device, autocast, replicas: Replicas = SINGLE
) -> dict[str, torch.Tensor]:
    """One pass over a task: the per-task Gram sum of every protected layer's inputs (batch-normalised).

    With data-parallel ``replicas``, ``batches`` are this worker's share of the task's batches (whole batches: each
    is normalised by its own norm); the sums are added over the workers before the task's sum is normalised, as one
    process adds them. Empty when no worker saw a batch."""
    visual = model.visual
    layers = protected_layers(model)
    grams: dict[str, torch.Tensor | None] = {name: None for name, _ in layers}
    seen = 0
    hooks = []

    def keep(name):
        def hook(module, args):
            grams[name] = gram_update(grams[name], args[0])

        return hook

    for i, block in enumerate(visual_blocks(model)):
        prefix = f"visual.transformer.resblocks.{i}.mlp"
        hooks.append(block.mlp.c_fc.register_forward_pre_hook(keep(f"{prefix}.c_fc.weight")))
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(keep(f"{prefix}.c_proj.weight")))

    def pooled(module, args, output):
        x = visual._global_pool(output)[0] if output.ndim == 3 else output  # the input of visual.proj
        grams["visual.proj"] = gram_update(grams["visual.proj"], x)

    hooks.append(visual.ln_post.register_forward_hook(pooled))
    try:
        for images, _ in batches:
            with autocast():
                model.encode_image(images.to(device))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not replicas.total(torch.tensor([seen], device=device)).item():
        return {}
    params = dict(model.named_parameters())
    summed = {}
    for name, inputs_last in layers:  # the same order on every worker: each total is one collective
        if grams[name] is None:  # a worker left without a batch adds nothing
            width = params[name].shape[1 if inputs_last else 0]
            grams[name] = torch.zeros(width, width, device=device)
        summed[name] = frobenius_normalised(replicas.total(grams[name]))
    return summed


# ---- the method ---------------------------------------------------------------------------------------------


class GNSPSettings(ReferenceSettings):
    rho: float = Field(0.15, gt=0, lt=1, description="tail fraction of the singular-value sum left unprotected")
    project: Literal["gradient", "update"] = Field(
        "gradient", description="project the gradient before AdamW (official) or the whole step"
    )
    cd_weight: float = Field(1.0, ge=0)
    map_weight: float = Field(0.75, ge=0)
    gram_batch_size: int = Field(16, ge=1)


@register_method("gnsp")
class GNSP(ReferenceDistillation):
    summary = "GNSP: gradients projected onto the null space of old tasks' features + contrastive distillation + MAP"
    Settings = GNSPSettings
    data_parallel = True  # global batches through joint_forward; Grams summed over workers; one projector
    trained_later = frozenset({"image"})
    trained_note = "later tasks: only its MLP matrices and visual.proj, gradients projected"

    def grams(self) -> dict[str, torch.Tensor]:
        return gram_sums(self.state)

    def select_trainable(self):
        grams = self.grams()
        if not grams:
            return super().select_trainable()  # first task: both towers in full
        params = dict(self.model.named_parameters())
        return [(name, params[name]) for name, _ in protected_layers(self.model)]

    def setup(self) -> None:
        grams = self.grams()
        self.projectors: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, inputs_last in protected_layers(self.model) if grams else []:
            if name not in grams:
                raise MethodError(f"GNSP state has no Gram matrix for {name} (made by another model?)")
            proj, k = projector(grams[name].to(self.device), self.settings.rho)
            # The first worker's projector on every worker: the Grams are the same everywhere, and the broadcast
            # keeps one eigensolver's rounding from giving a worker another null space (its weights would drift).
            self.projectors[name] = (self.ctx.replicas.broadcast(proj), inputs_last)
            if k == len(proj):
                self.ctx.say(f"  gnsp: {name} has an empty null space (every direction protected): it will not move")
        self.setup_reference()
        self.ref_tokens = self.tokenize(self.reference.distinct)

    def reference_text(self) -> torch.Tensor:
        return self.text_of(self.ref_tokens, "reference")

    def training_step(self, batch):
        step = self.joint_forward(*batch[:2])
        caps = step.captions
        student = self.scale * step.reference @ self.reference_text()[caps].T
        teacher = self.scale * self.teacher.image[step.rows] @ self.teacher.text[caps].T
        s = self.settings
        return {
            "ce": step.ce,
            "cd": s.cd_weight * image_text_distill(teacher, student, s.temperature),
            "map": s.map_weight * map_loss(student, map_targets(caps), s.label_smoothing),
        }

    def after_backward(self) -> None:
        if not self.projectors:
            return
        params = dict(self.trainable)
        if self.settings.project == "update":
            self._before = {n: params[n].detach().clone() for n in self.projectors}
            return
        for name, (proj, inputs_last) in self.projectors.items():
            grad = params[name].grad
            if grad is not None:
                grad.copy_(project(grad.float(), proj, inputs_last).to(grad.dtype))

    def after_step(self, step: int) -> None:
        if self.settings.project != "update" or not self.projectors:
            return
        params = dict(self.trainable)
        with torch.no_grad():
            for name, (proj, inputs_last) in self.projectors.items():
                before = self._before[name]
                step = project((params[name] - before).float(), proj, inputs_last)
                params[name].copy_(before + step.to(before.dtype))

    def after_fit(self) -> None:
        self.projectors = {}  # up to ~0.5 GB for ViT-B/16: free them with the task
        self.release_reference()

    def export(self, state) -> None:
        """This task's Grams from the final model, added to the running sums in the state.

        Data-parallel workers share the pass: each takes its block of whole Gram batches (the batches one process
        makes), and ``task_grams`` adds the workers' sums."""
        from components.model.data import make_loader

        backbone, replicas, size = self.ctx.backbone, self.ctx.replicas, self.settings.gram_batch_size
        augment = self.settings.augment and backbone.preprocess_train is not None  # the official pass augments
        dataset = self.task.dataset_for("train", backbone.preprocess_train if augment else backbone.preprocess)
        if not replicas.single:
            mine = replicas.take(range(-(-len(dataset) // size)))  # this worker's batch numbers
            dataset = torch.utils.data.Subset(dataset, range(mine.start * size, min(mine.stop * size, len(dataset))))
        loader = make_loader(dataset, size, self.ctx.workers)
        current = task_grams(
            self.model, loader, self.device, lambda: torch.autocast(self.device.type, enabled=False), replicas
        )
        previous = self.grams()
        sums = {
            name: accumulate(previous.get(name), gram.cpu(), renormalise_previous=name == "visual.proj")
            for name, gram in current.items()
        }
        store_gram_sums(state, sums)
