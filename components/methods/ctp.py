"""CTP (docs/methods/ctp.md): compatible momentum contrast + topology preservation,
adapted to CLIP's two towers (the ALBEF fusion and MLM terms have no CLIP counterpart and are dropped).

- A momentum model is re-initialised from the task's starting model at every task and updated each
  step from a blend of the live model and that starting model:
  m <- 0.9 m + 0.05 live + 0.05 start (first task: m <- 0.995 m + 0.005 live).
- Compatible momentum contrast: each image is contrasted with its own momentum caption feature plus a
  queue of earlier momentum features (and symmetrically for captions), hard one-hot targets. The queues
  are global state: they persist across tasks in the learner state and are never reset.
- Topology preservation (from the second task): the batch's image-text, image-image and text-text
  similarity distributions of the starting model are distilled (KL, batchmean; self-pairs masked).
- Captions are the class prompts of the samples (the task stream is labelled images, not pairs).
- The temperature is CTP's fixed 0.07, not CLIP's logit scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from components.methods import register_method
from components.methods.tuning import (
    TunedCLIP,
    TuneSettings,
    cached_image_features,
    frozen_copy,
    kl_batchmean,
    symmetric_info_nce,
)

QUEUE_IMAGE, QUEUE_TEXT, QUEUE_PTR = "ctp.queue_image", "ctp.queue_text", "ctp.queue_ptr"
SELF_MASK = -1000.0

# ---- mathematics (pure) ----------------------------------------------------------------------------------


@torch.no_grad()
def momentum_update(
    momentum: list[torch.Tensor], live: list[torch.Tensor], start: list[torch.Tensor] | None, m: float, alpha: float
) -> None:
    """In place: momentum <- m * momentum + (1 - m) * (alpha * start + (1 - alpha) * live).

    Without ``start`` (the first task) it is a plain EMA of the live model. The terms are added in the
    official code's order (scaled momentum, live, start), in place: the result agrees with its out-of-place
    expression to float rounding (a fused multiply-add may round once where it rounds twice), not bit for bit.
    """
    if len(momentum) != len(live) or (start is not None and len(start) != len(live)):
        raise ValueError("momentum, live and start models must have the same parameters in the same order")
    if start is None:
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, live, alpha=1 - m)
        return
    torch._foreach_mul_(momentum, m)
    torch._foreach_add_(momentum, live, alpha=(1 - m) * (1 - alpha))
    torch._foreach_add_(momentum, start, alpha=(1 - m) * alpha)


@torch.no_grad()
def enqueue(queue: torch.Tensor, pointer: int, keys: torch.Tensor) -> int:
    """Write ``keys`` (rows) into the FIFO ``queue`` (columns = entries) at ``pointer``; returns the next one.

    Writes wrap around the end, so any batch size works (the official code writes whole batches and so
    asserts that the queue size is a multiple of the global batch; a task's last, smaller batch is fine here).
    """
    size = queue.shape[1]
    keys = keys[-size:]
    positions = (pointer + torch.arange(len(keys))) % size
    queue[:, positions.to(queue.device)] = keys.T.to(queue.dtype)
    return int((pointer + len(keys)) % size)


def cmc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    momentum_image: torch.Tensor,
    momentum_text: torch.Tensor,
    queue_image: torch.Tensor,
    queue_text: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Compatible momentum contrast: own momentum key (diagonal) against the batch's keys and the queue."""
    target = torch.arange(len(image), device=image.device)
    keys_text = torch.cat([momentum_text.T, queue_text], dim=1)
    keys_image = torch.cat([momentum_image.T, queue_image], dim=1)
    return 0.5 * (F.cross_entropy(image @ keys_text / tau, target) + F.cross_entropy(text @ keys_image / tau, target))


def _self_masked(similarity: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    return similarity.masked_fill(eye, SELF_MASK)  # before dividing by tau, as the official code


def topology_loss(
    image: torch.Tensor, text: torch.Tensor, ref_image: torch.Tensor, ref_text: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-modal, intra-modal) topology preservation: KL from the reference model's similarity
    distributions to the live model's, image->text + text->image, and image-image + text-text with self
    pairs masked; each the mean of its two directions."""
    s_it, r_it = image @ text.T, ref_image @ ref_text.T
    cross = 0.5 * (kl_batchmean(r_it / tau, s_it / tau) + kl_batchmean(r_it.T / tau, s_it.T / tau))
    s_ii, r_ii = _self_masked(image @ image.T), _self_masked(ref_image @ ref_image.T)
    s_tt, r_tt = _self_masked(text @ text.T), _self_masked(ref_text @ ref_text.T)
    intra = 0.5 * (kl_batchmean(r_ii / tau, s_ii / tau) + kl_batchmean(r_tt / tau, s_tt / tau))
    return cross, intra


# ---- typed state ------------------------------------------------------------------------------------------


@dataclass
class Queues:
    """The momentum feature queues (columns = entries) and the shared write position; never reset."""

    image: torch.Tensor  # [embed_dim, queue_size]
    text: torch.Tensor
    pointer: int

    @classmethod
    def fresh(cls, dim: int, size: int, seed: int) -> Queues:
        generator = torch.Generator().manual_seed(seed)  # random unit vectors, as the official initialisation
        return cls(
            F.normalize(torch.randn(dim, size, generator=generator), dim=0),
            F.normalize(torch.randn(dim, size, generator=generator), dim=0),
            0,
        )

    def to_bundle(self, state) -> None:
        state.method_tensors[QUEUE_IMAGE] = self.image.detach().cpu()
        state.method_tensors[QUEUE_TEXT] = self.text.detach().cpu()
        state.method_tensors[QUEUE_PTR] = torch.tensor(self.pointer, dtype=torch.int64)

    @classmethod
    def from_bundle(cls, state) -> Queues | None:
        tensors = state.method_tensors
        if QUEUE_IMAGE not in tensors:
            return None
        return cls(tensors[QUEUE_IMAGE], tensors[QUEUE_TEXT], int(tensors[QUEUE_PTR]))


# ---- the method ---------------------------------------------------------------------------------------------


class CTPSettings(TuneSettings):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    tau: float = Field(0.07, gt=0, description="fixed contrastive temperature")
    queue_size: int = Field(1024, ge=1)
    momentum_first_task: float = Field(0.995, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, le=1)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the task's starting model in the momentum target")
    cmc_weight: float = Field(1.0, ge=0)
    tp_cross_weight: float = Field(1.0, ge=0)
    tp_intra_weight: float = Field(1.0, ge=0)
    cache_reference: bool = Field(
        True,
        description="with augment false, compute the task-start model's image "
        "features once per task instead of every step (exact)",
    )


@register_method("ctp")
class CTP(TunedCLIP):
    summary = "CTP: compatible momentum contrast (momentum model + persistent queues) and topology preservation"
    Settings = CTPSettings
    # Its losses and queue writes are the global batch's (training_step); the momentum model follows the live
    # weights, the same on every worker after every step, and the queues start from the seed (docs/methods/ctp.md).
    data_parallel = True

    def setup(self) -> None:
        s, dim = self.settings, self.ctx.backbone.embed_dim
        queues = Queues.from_bundle(self.state)
        if queues is None or queues.image.shape != (dim, s.queue_size):
            queues = Queues.fresh(dim, s.queue_size, self.ctx.seed)
        self.queues = Queues(queues.image.to(self.device).clone(), queues.text.to(self.device).clone(), queues.pointer)
        self.momentum_model = frozen_copy(self.model)  # reset to the task's starting model
        self.reference = frozen_copy(self.model) if self.task_index > 0 else None
        names = [n for n, _ in self.trainable]
        live = dict(self.model.named_parameters())
        self._live = [live[n] for n in names]
        self._momentum = [dict(self.momentum_model.named_parameters())[n] for n in names]
        self._start = (
            [dict(self.reference.named_parameters())[n] for n in names] if self.reference is not None else None
        )
        self.reference_image = self.reference_text = None
        if self.reference is not None:
            # The task-start model is frozen: its caption features never change during the task, and neither
            # do its image features when images are not augmented, so those are computed once (exactly).
            with torch.no_grad():
                self.reference_text = self.encode_text(self.label_tokens, self.reference)
            if s.cache_reference and not s.augment:
                self.reference_image = cached_image_features(self.reference, self.train_dataset(), self.ctx)

    def training_state(self) -> dict[str, torch.Tensor]:
        state = {f"momentum/{i}": p for i, p in enumerate(self._momentum)}
        state.update(
            {
                "queue_image": self.queues.image,
                "queue_text": self.queues.text,
                "queue_ptr": torch.tensor(self.queues.pointer),
            }
        )
        return state

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self._momentum):
                p.copy_(tensors[f"momentum/{i}"])
            self.queues.image.copy_(tensors["queue_image"])
            self.queues.text.copy_(tensors["queue_text"])
        self.queues.pointer = int(tensors["queue_ptr"])

    def before_step(self, step: int) -> None:
        s = self.settings
        if self.reference is None:
            momentum_update(self._momentum, self._live, None, s.momentum_first_task, 0.0)
        else:
            momentum_update(self._momentum, self._live, self._start, s.momentum, s.alpha)

    def training_step(self, batch):
        # Every term is over the global batch: each worker's features, labels and momentum keys are gathered in
        # rank order (model/replicas.py), so every worker computes one process's loss and enqueues its keys.
        replicas = self.ctx.replicas
        images, labels = batch[:2]
        s = self.settings
        image = replicas.gather(self.encode_image(images))
        labels = replicas.gather(labels)
        text = self.class_text()[labels]
        with torch.no_grad():
            m_image = replicas.gather(self.encode_image(images, self.momentum_model))
            m_text = self.encode_text(self.label_tokens, self.momentum_model)[labels]
        losses = {
            "ita": symmetric_info_nce(image, text, 1 / s.tau),
            "cmc": s.cmc_weight * cmc_loss(image, text, m_image, m_text, self.queues.image, self.queues.text, s.tau),
        }
        if self.reference is not None:
            with torch.no_grad():
                if self.reference_image is not None and len(batch) > 2:
                    r_image = self.reference_image[batch[2]]
                else:
                    r_image = self.encode_image(images, self.reference)
                r_image, r_text = replicas.gather(r_image), self.reference_text[labels]
            cross, intra = topology_loss(image, text, r_image, r_text, s.tau)
            losses["tp_cross"] = s.tp_cross_weight * cross
            losses["tp_intra"] = s.tp_intra_weight * intra
        start = self.queues.pointer  # both queues advance together, after the loss as in the official code
        self.queues.pointer = enqueue(self.queues.image, start, m_image)
        enqueue(self.queues.text, start, m_text)
        return losses

    def export(self, state) -> None:
        self.queues.to_bundle(state)
        del self.momentum_model, self.reference, self._momentum, self._start, self._live, self.reference_image
