"""DIKI, distribution-aware interference-free knowledge integration (docs/methods/diki.md; Tang et al., ECCV 2024).

CLIP stays frozen. Each task adds a slot of key-value prefix tokens to the self-attention of the first blocks of
both towers (open_clip blocks or a Hugging Face BERT-style text encoder: components/methods/prefix_injection.py);
a prefix is attended separately from the block's own tokens and its result added to the attention's output
(residual injection), so with its values at zero (their start) the model is exactly the frozen CLIP. A task
trains only its own slot, with cross-entropy over its own classes. After it, the frozen image embeddings of its
training images are summarised as a Gaussian (mean and covariance). At prediction the frozen embedding picks the
task whose Gaussian gives it the highest log-likelihood, and that likelihood scales the injected prefix:
weight = sigmoid(log p / d - 1). Far from every learned task the weight goes to zero and the model is CLIP again.

A version stores only what it adds: per task, the slot's prefixes and the Gaussian (``diki.<kind>.<task id>``
in ``state.method_tensors``); the backbone's weights are never written (``state.weights`` stays None).

Data-parallel workers (components/model/replicas.py): the loss is over the global batch (image features and labels
gathered; the class text, the same on every worker, computed on each); the Gaussian is the first worker's,
broadcast; a new slot starts from a generator seeded by the run's seed and the task, the same on every worker.
"""

from __future__ import annotations

import math
import zlib
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from components.methods import register_method
from components.methods.base import Context, MethodError
from components.methods.prefix_injection import block_width, injected, text_blocks
from components.methods.settings import WARMUP, StepInterval, TrainSettings, TuneSettings
from components.methods.tuning import TunedCLIP, normalize, visual_blocks

KINDS = ("image", "text", "mean", "covariance")  # the tensors a task adds, ``diki.<kind>.<task id>``

# ---- mathematics (pure) ----------------------------------------------------------------------------------


def gaussian_fit(features: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of the rows, plus ``ridge`` on the diagonal (fp32 out, computed in fp64)."""
    x = features.double()
    mean = x.mean(dim=0)
    delta = x - mean
    covariance = delta.T @ delta / max(len(x) - 1, 1)  # one image: a zero covariance, not a division by zero
    covariance += ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return mean.float(), covariance.float()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, L Lᵀ) for each row of x, one column per Gaussian: [N, d], [T, d], [T, d, d] -> [N, T] (fp64)."""
    d = x.shape[-1]
    delta = (x.double().unsqueeze(0) - mean.double().unsqueeze(1)).transpose(1, 2)  # [T, d, N]
    solved = torch.linalg.solve_triangular(cholesky, delta, upper=False)  # L⁻¹ (x - μ)
    mahalanobis = solved.pow(2).sum(dim=1)  # [T, N]
    log_det = 2 * torch.diagonal(cholesky, dim1=-2, dim2=-1).log().sum(dim=-1)  # [T]
    return (-0.5 * (d * math.log(2 * math.pi) + log_det.unsqueeze(1) + mahalanobis)).T


def choose_tasks(log_probs: torch.Tensor, width: float, batchwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the task of highest log-likelihood and the calibrated weight sigmoid(log p / width - 1).

    ``batchwise``: every row takes the task most rows chose (ties to the earliest task); the weights stay each
    row's own."""
    best, chosen = log_probs.max(dim=1)
    weight = torch.sigmoid(best / width - 1.0)
    if batchwise:
        counts = torch.bincount(chosen, minlength=log_probs.shape[1])
        chosen = torch.full_like(chosen, int(counts.argmax()))  # argmax: the first of equal counts
    return chosen, weight.float()


def new_slot(depth: int, length: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[depth, 2, length, width]: keys uniform in [-1, 1], values zero (the injection starts as nothing)."""
    slot = torch.zeros(depth, 2, length, width)
    slot[:, 0].uniform_(-1.0, 1.0, generator=generator)
    return slot


# ---- the method -------------------------------------------------------------------------------------------------


class DIKISettings(TrainSettings):
    """The official code's settings (docs/methods/diki.md, "Settings"). DIKI learns each task's own classes with its
    own slot: no replay memory, no pools, no growing label space, so those settings of the fine-tuning family are
    not settings here (unknown keys), only the fixed values the shared base reads."""

    step_intervals: ClassVar[dict[str, StepInterval]] = {"warmup_steps": WARMUP}
    loss_classes: ClassVar[str] = "task"
    memory_per_class: ClassVar[int] = 0
    memory_size: ClassVar[int] = 0
    classifier: ClassVar[str] = "text"
    schedule_problems = TuneSettings.schedule_problems

    optimizer: Literal["adamw", "sgd"] = Field("sgd", description="plain SGD (no momentum), as the official code")
    lr: float = Field(5.0, gt=0)
    momentum: float = Field(0.0, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    min_lr: float = Field(5e-3, ge=0, description="cosine floor: a thousandth of the official lr")
    augment: bool = Field(False, description="the official code trains on CLIP's evaluation transform")
    prompt_depth_image: int = Field(8, ge=1, description="image blocks that take prefixes (from the first)")
    prompt_depth_text: int = Field(8, ge=1, description="text blocks that take prefixes (from the first)")
    prompt_length_image: int = Field(8, ge=1, description="prefix tokens per image block")
    prompt_length_text: int = Field(8, ge=1, description="prefix tokens per text block")
    batchwise_prompt: bool = Field(True, description="an evaluation batch takes the task most of its images chose")
    calibration_width: float | None = Field(
        None, gt=0, description="d in sigmoid(log p / d - 1); null: the embedding width (512 for ViT-B/16)"
    )
    covariance_ridge: float = Field(1e-7, ge=0, description="added to the Gaussian's covariance diagonal")


@register_method("diki")
class DIKI(TunedCLIP):
    summary = "DIKI: frozen CLIP, per-task prefix tokens injected into attention, weighted by a Gaussian task match"
    Settings = DIKISettings
    data_parallel = True  # its one loss over the global batch; the Gaussian broadcast; each slot seeded alike
    trained = frozenset({"head"})
    trained_note = "per task, prefix keys and values in the attention of the first blocks of both towers"

    def __init__(self, settings=None):
        super().__init__(settings)
        self._gaussians: tuple | None = None  # (state, task ids, means, Cholesky factors) of the last scoring

    # ---- training ---------------------------------------------------------------------------------------------

    def select_trainable(self):
        s, model = self.settings, self.model
        self.image_blocks, self.text_blocks = visual_blocks(model), text_blocks(model)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.ctx.seed}:{self.task.task_id}".encode()))
        shapes = {
            "image": (min(s.prompt_depth_image, len(self.image_blocks)), s.prompt_length_image),
            "text": (min(s.prompt_depth_text, len(self.text_blocks)), s.prompt_length_text),
        }
        blocks = {"image": self.image_blocks, "text": self.text_blocks}
        self.slot = {
            tower: torch.nn.Parameter(new_slot(depth, length, block_width(blocks[tower][0]), generator).to(self.device))
            for tower, (depth, length) in shapes.items()
        }
        return [(f"diki.{tower}", p) for tower, p in self.slot.items()]

    def training_step(self, batch):
        images, labels = batch[:2]
        replicas = self.ctx.replicas
        with injected(self.image_blocks, self.slot["image"], None):
            features = replicas.gather(normalize(self.model.encode_image(images).float()))
        with injected(self.text_blocks, self.slot["text"], None):
            text = normalize(self.model.encode_text(self.label_tokens).float())
        logits = self.scale * features @ text.T
        labels = replicas.gather(labels)
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=self.settings.label_smoothing)}

    def end_task(self):
        state, task = self.state, self.task
        self.model.eval()
        for p in self.slot.values():
            p.requires_grad_(False)
        features, _ = self.ctx.image_embeddings(task, "train")  # the frozen CLIP's, as the official Gaussian
        mean, covariance = gaussian_fit(features.to(self.device), self.settings.covariance_ridge)
        replicas = self.ctx.replicas  # one eigen-rounding everywhere: the first worker's statistics
        tensors = {
            "image": self.slot["image"],
            "text": self.slot["text"],
            "mean": replicas.broadcast(mean),
            "covariance": replicas.broadcast(covariance),
        }
        for kind, tensor in tensors.items():
            state.method_tensors[f"diki.{kind}.{task.task_id}"] = tensor.detach().float().cpu().clone()
        state.add_classes(task.task_id, task.dataset, list(zip(task.class_keys, task.class_names)))
        state.tasks.append(task.summary())
        state.method_settings = self.chain_settings.model_dump(mode="json")
        self.forget_key_text()
        self._gaussians = None
        self.settings = self.chain_settings
        return state

    # ---- prediction ---------------------------------------------------------------------------------------------

    def learned(self, state) -> list[str]:
        """The task ids with a slot, in the order they were learned."""
        return [t for t in state.task_ids if f"diki.image.{t}" in state.method_tensors]

    def gaussians(self, state, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Means [T, d] and Cholesky factors [T, d, d] (fp64) of the learned tasks, worked out once per state."""
        ids = tuple(self.learned(state))
        cached = self._gaussians
        if cached is None or cached[0] is not state or cached[1] != ids:
            t = state.method_tensors
            means = torch.stack([t[f"diki.mean.{i}"] for i in ids]).to(device, torch.float64)
            covariances = torch.stack([t[f"diki.covariance.{i}"] for i in ids]).to(device, torch.float64)
            factors, info = torch.linalg.cholesky_ex(covariances)
            if info.any():
                bad = ids[int(info.nonzero()[0])]
                raise MethodError(f"diki: task {bad}'s covariance is not positive definite (raise covariance_ridge)")
            cached = self._gaussians = (state, ids, means, factors)
        return cached[2], cached[3]

    def class_tokens(self, class_keys, class_names, ctx: Context) -> tuple[torch.Tensor, int]:
        """Tokens of every class's prompts, class by class, and the number of templates per class."""
        from components.model.prompts import clean_class_name

        prompts = []
        for key in class_keys:
            templates = ctx.templates_for(key.split("/", 1)[0])
            prompts.append([template(clean_class_name(class_names[key])) for template in templates])
        count = len(prompts[0]) if prompts else 1
        if any(len(p) != count for p in prompts):  # datasets with template sets of other sizes: the first of each
            prompts, count = [p[:1] for p in prompts], 1
        return ctx.backbone.tokenizer([p for row in prompts for p in row]).to(ctx.device), count

    @torch.no_grad()
    def scores(self, state, images, class_keys, class_names, ctx: Context) -> torch.Tensor:
        from components.model.backbones import encode_batch

        ids = self.learned(state)
        if not ids:  # nothing learned: the frozen CLIP
            text = self.key_text(class_keys, class_names, ctx)
            return encode_batch(ctx.backbone, images) @ torch.stack([text[k] for k in class_keys]).T
        backbone, s = ctx.backbone, self.settings
        model, device = backbone.model, ctx.device
        images = images.to(device, dtype=backbone.weights_dtype)
        frozen = encode_batch(backbone, images, on_device=True)
        means, factors = self.gaussians(state, device)
        width = s.calibration_width or frozen.shape[1]
        chosen, weight = choose_tasks(gaussian_log_prob(frozen, means, factors), width, s.batchwise_prompt)
        tokens, per_class = self.class_tokens(class_keys, class_names, ctx)
        out = torch.zeros(len(images), len(class_keys), device=device)
        image_blocks, text_blocks_ = visual_blocks(model), text_blocks(model)
        for slot in chosen.unique().tolist():
            rows = (chosen == slot).nonzero().flatten()
            tid = ids[slot]
            image_prefix = state.method_tensors[f"diki.image.{tid}"].to(device)
            text_prefix = state.method_tensors[f"diki.text.{tid}"].to(device)
            with backbone.autocast():
                with injected(image_blocks, image_prefix, weight[rows]):
                    features = normalize(model.encode_image(images[rows]).float())
                # The text is shared by the rows: its prefix weighs their mean, as the official batch does.
                with injected(text_blocks_, text_prefix, weight[rows].mean().reshape(1)):
                    text = normalize(model.encode_text(tokens).float())
            text = normalize(text.view(len(class_keys), per_class, -1).mean(dim=1))
            out[rows] = features @ text.T
        return out.cpu()
