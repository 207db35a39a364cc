"""CVM, continual visual mapping (docs/methods/cvm.md; our reference design, no official code exists).

A small visual model (the configured backbone's image tower) and a linear map P are trained so that
normalize(P g(x)) lands on its class's concept: the normalised embedding of the class prompt by a frozen
language model. Concepts are computed once, when a class first appears, and never change, so old classes'
targets cannot drift. The loss is cross-entropy over scaled cosines against every concept seen so far, plus
concept anchoring (each mapped image pulled to its concept, and its similarities to the old concepts kept
where the task's start put them), on the task's images and a small herding memory of earlier ones. With the
anchoring weights and the memory at 0 it is the first design, written from the abstract alone.

The language model defaults to the backbone's own text tower (then P starts as the identity and the
first step starts from zero-shot CLIP); any Hugging Face sentence-embedding model folder can be plugged
in (``language_model: /path`` or ``package:<module>/<folder>``), mean-pooled and normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from components.methods import register_method
from components.methods.base import Context, MethodError
from components.methods.tuning import Indexed, Relabelled, TunedCLIP, TuneSettings, frozen_copy, normalize
from components.model.prompts import PromptTemplate

# ---- mathematics (pure) ----------------------------------------------------------------------------------


def concept_logits(mapped: torch.Tensor, concepts: torch.Tensor, tau: float) -> torch.Tensor:
    """cos(normalize(mapped), concept_k) / tau for every concept row."""
    return normalize(mapped.float()) @ normalize(concepts.float()).T / tau


def concept_pull(mapped: torch.Tensor, own_concepts: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(mapped_i, own_concepts_i): how far each mapped image is from its class's concept."""
    return (1 - (normalize(mapped.float()) * normalize(own_concepts.float())).sum(dim=-1)).mean()


def concept_drift(mapped: torch.Tensor, start: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Mean over rows and concepts of (cos(mapped_i, c_k) - cos(start_i, c_k))²: how far an image moved relative
    to the fixed concepts since the task's start (``start``: the same images mapped by the start model)."""
    return (concept_logits(mapped, concepts, 1.0) - concept_logits(start, concepts, 1.0)).pow(2).mean()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where the attention mask is 1 (sentence-embedding pooling)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


# ---- typed state -----------------------------------------------------------------------------------------


@dataclass
class ConceptTable:
    """The frozen concepts (one normalised row per class key) and the visual-to-concept map P."""

    keys: list[str]
    concepts: torch.Tensor  # [len(keys), d_lm]
    projection: torch.Tensor  # [d_lm, d_visual]

    def to_bundle(self, state) -> None:
        state.method_tensors["cvm.concepts"] = self.concepts.detach().cpu().contiguous()
        state.method_tensors["cvm.projection"] = self.projection.detach().cpu().contiguous()
        state.method_meta["cvm.concept_keys"] = list(self.keys)

    @classmethod
    def from_bundle(cls, state) -> ConceptTable | None:
        if "cvm.projection" not in state.method_tensors:
            return None
        return cls(
            list(state.method_meta.get("cvm.concept_keys", [])),
            state.method_tensors["cvm.concepts"],
            state.method_tensors["cvm.projection"],
        )


class ConceptEncoder:
    """The frozen language model: class prompts -> normalised concept vectors (CPU, fp32)."""

    def __init__(self, spec: str, backbone):
        self.spec, self.backbone = spec, backbone
        if spec == "backbone":
            self.dim = backbone.embed_dim
            return
        from transformers import AutoModel, AutoTokenizer

        from components.model.backbones import quiet_loaders, resolve_package_path

        path = resolve_package_path(spec) if spec.startswith("package:") else spec
        try:
            with quiet_loaders():
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as exc:  # ValueError: a folder without a tokenizer transformers can read
            reason = " ".join(str(exc).split())  # transformers' messages run over several lines
            raise MethodError(f"cvm: cannot load the language model {spec!r}: {reason}") from None
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.spec == "backbone":
            from components.model.backbones import encode_texts

            return encode_texts(self.backbone, texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        return F.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)


# ---- the method ---------------------------------------------------------------------------------------------


class CVMSettings(TuneSettings):
    language_model: str = Field(
        "backbone",
        description="frozen concept space: the backbone's text tower, or a Hugging "
        "Face model folder / package:<module>/<folder>",
    )
    prompt: PromptTemplate | None = Field(
        None,
        description="how a class name is put to the language model, {} the name; null = the first prompt template "
        "of the class's dataset ('a photo of a {}' with the default templates), the form the backbone was trained on",
    )
    tau: float = Field(0.07, gt=0)
    loss_classes: Literal["task", "seen"] = Field("seen")
    pull_weight: float = Field(
        1.0, ge=0, description="concept anchoring: weight of 1 - cos(z(x), c_y), each mapped image to its concept"
    )
    drift_weight: float = Field(
        1.0,
        ge=0,
        description="concept anchoring: weight of the squared change of an image's cosines to the old concepts "
        "since the task's start (from the second task on)",
    )
    memory_per_class: int = Field(
        5, ge=0, description="replay exemplars kept per class (herding), mixed into later tasks; 0: no replay"
    )
    replay: Literal["balanced", "mixed"] = Field(
        "balanced",
        description="how the memory is sampled: balanced = repeated to as many samples as the task's images, so a "
        "batch is half old, half new on average; mixed = each stored sample once among the task's",
    )
    lr: float = Field(1e-4, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)


@register_method("cvm")
class CVM(TunedCLIP):
    summary = "CVM: a small visual model mapped into a frozen language model's concept space (fixed concept table)"
    Settings = CVMSettings
    trained = frozenset({"image", "head"})
    trained_note = "the head maps images into the language model's concept space"
    # Its loss, anchoring included, is the global batch's (training_step); the concept rows and the herding memory
    # are the first worker's, the map starts from the seed (or the state) and steps on averaged gradients
    # (docs/methods/cvm.md).
    data_parallel = True

    def __init__(self, settings=None):
        super().__init__(settings)
        self._encoder: ConceptEncoder | None = None  # the frozen language model, loaded on first use
        self._concept_cache: dict[str, torch.Tensor] = {}  # concepts of classes no task has taught (zero-shot)

    def encoder(self, ctx: Context) -> ConceptEncoder:
        if self._encoder is None:
            self._encoder = ConceptEncoder(self.settings.language_model, ctx.backbone)
        return self._encoder

    def prompt_for(self, key: str, name: str, ctx: Context) -> str:
        """A class's prompt to the language model: the configured one, else its dataset's first template (a
        backbone pretrained on other captions than CLIP's, such as the glyph model, gets its own form)."""
        from components.model.prompts import clean_class_name

        if self.settings.prompt:
            return self.settings.prompt.format(clean_class_name(name))
        return ctx.templates_for(key.split("/", 1)[0])[0](clean_class_name(name))

    def select_trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if n.startswith("visual.")]

    def setup(self) -> None:
        encoder = self.encoder(self.ctx)
        table = ConceptTable.from_bundle(self.state)
        if table is None:
            d_visual = self.ctx.backbone.embed_dim
            if encoder.spec == "backbone":
                projection = torch.eye(d_visual)  # start from zero-shot CLIP
            else:
                projection = torch.empty(encoder.dim, d_visual)
                torch.nn.init.orthogonal_(projection, generator=torch.Generator().manual_seed(self.ctx.seed))
            table = ConceptTable([], torch.zeros(0, encoder.dim), projection)
        new = [k for k in self.label_keys if k not in table.keys]
        if new:  # appended once, never updated: old classes' targets cannot drift
            rows = encoder([self.prompt_for(k, self.class_names[k], self.ctx) for k in new])
            if not self.ctx.replicas.single:  # the first worker's rows on every worker: one table, fixed for good
                rows = self.ctx.replicas.broadcast(rows.to(self.device)).cpu()
            table = ConceptTable(table.keys + new, torch.cat([table.concepts, rows]), table.projection)
        self.table = table
        self.projection = torch.nn.Parameter(table.projection.clone().to(self.device))
        index = {k: i for i, k in enumerate(table.keys)}
        self.targets = table.concepts[[index[k] for k in self.label_keys]].to(self.device)
        # Concept anchoring's second term: the old concepts, and the image tower and map the task starts from.
        self.start = None
        old = [index[k] for k in self.old_keys]
        if self.settings.drift_weight and old:
            self.old_concepts = table.concepts[old].to(self.device)
            self.start = (frozen_copy(self.model), table.projection.clone().to(self.device))

    def train_dataset(self):
        data = super().train_dataset()
        parts = getattr(data.dataset, "datasets", None)  # the task's images, then each old task's memory rows
        if self.settings.replay != "balanced" or not parts:
            return data
        task, memory = parts[0], parts[1:]
        times = max(1, round(len(task) / sum(len(m) for m in memory)))
        repeated = [Relabelled(m.dataset, m.mapping, m.rows * times) for m in memory]
        return Indexed(torch.utils.data.ConcatDataset([task, *repeated]))

    def trainable_parameters(self):
        return self.trainable + [("cvm.projection", self.projection)]

    def training_step(self, batch):
        # Over the global batch: each worker's mapped features, labels and start features are gathered in rank
        # order (model/replicas.py), so every worker computes one process's loss.
        replicas = self.ctx.replicas
        settings = self.settings
        images, labels = batch[:2]
        mapped = replicas.gather(self.model.encode_image(images).float() @ self.projection.T)
        labels = replicas.gather(labels)
        losses = {
            "ce": F.cross_entropy(
                concept_logits(mapped, self.targets, settings.tau), labels, label_smoothing=settings.label_smoothing
            )
        }
        # Terms at weight 0 are left out, so the first design's loss (and its log) is exactly what it was.
        if settings.pull_weight:
            losses["pull"] = settings.pull_weight * concept_pull(mapped, self.targets[labels])
        if self.start is not None:
            model, projection = self.start
            with torch.no_grad():
                start = replicas.gather(model.encode_image(images).float() @ projection.T)
            losses["drift"] = settings.drift_weight * concept_drift(mapped, start, self.old_concepts)
        return losses

    def end_task(self):
        self.start = None  # the frozen start model is the task's only
        return super().end_task()

    def export(self, state) -> None:
        ConceptTable(self.table.keys, self.table.concepts, self.projection.detach().cpu()).to_bundle(state)

    def scores(self, state, images, class_keys, class_names, ctx: Context) -> torch.Tensor:
        from components.model.backbones import encode_batch

        table = ConceptTable.from_bundle(state)
        if table is None:  # nothing learned yet: zero-shot CLIP
            return super().scores(state, images, class_keys, class_names, ctx)
        cache = self._concept_cache
        known = dict(zip(table.keys, table.concepts))
        missing = [k for k in class_keys if k not in known and k not in cache]
        if missing:  # classes no task has taught: their concept, computed the same way, for zero-shot scoring
            prompts = [self.prompt_for(k, class_names[k], ctx) for k in missing]
            for key, row in zip(missing, self.encoder(ctx)(prompts)):
                cache[key] = row
        concepts = torch.stack([known[k] if k in known else cache[k] for k in class_keys])
        mapped = encode_batch(ctx.backbone, images) @ table.projection.T
        return normalize(mapped) @ normalize(concepts).T
