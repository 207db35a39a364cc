"""What the CLIP fine-tuning methods share: which parameters train, class prompts, the label space,
the replay memory, the fine-tuned weights in the learner state, and scoring with the text classifier
(or with label-vector pools rebuilt from the fine-tuned encoder). The reference set and teacher that
ZSCL and GNSP share are in components.methods.reference; their settings, and the schedules refused, in
components.methods.settings.

Also the loss functions several methods use, as pure functions of tensors. This module registers no
method itself.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from components.methods.base import Context, Method, MethodError, MethodReport, PoolStats
from components.methods.settings import TuneSettings, run_problems, task_steps

# ---- losses (pure) ------------------------------------------------------------------------------------


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def soft_ce_distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD_T: per row, cross-entropy of softmax(teacher/T) against log-softmax(student/T), row mean, times T².

    Equals KL(teacher || student) times T² plus the teacher's entropy (constant for the student).
    """
    t = temperature
    target = (teacher_logits.float() / t).softmax(dim=-1)
    return -(target * (student_logits.float() / t).log_softmax(dim=-1)).sum(dim=-1).mean() * t * t


def image_text_distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD_T on an image x text logit matrix in both directions (image->text and text->image), as LwF's,
    ZSCL's and GNSP's contrastive distillation use it (docs/methods/README.md, "Notation")."""
    return soft_ce_distill(teacher_logits, student_logits, temperature) + soft_ce_distill(
        teacher_logits.T, student_logits.T, temperature
    )


def kl_batchmean(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(student/T)) summed over classes, averaged over rows."""
    target = (target_logits.float() / temperature).log_softmax(dim=-1)
    student = (student_logits.float() / temperature).log_softmax(dim=-1)
    return (target.exp() * (target - student)).sum(dim=-1).mean()


def symmetric_info_nce(image: torch.Tensor, text: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss: mean of image->text and text->image cross-entropy, targets on the diagonal."""
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


# ---- herding (replay memory) ----------------------------------------------------------------------------


def herding(features: torch.Tensor, count: int) -> list[int]:
    """iCaRL herding: greedily pick samples whose running mean stays closest to the class mean.

    ``features`` are L2-normalised rows of one class; returns up to ``count`` distinct row indices.
    """
    n = len(features)
    count = min(count, n)
    mean = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(mean)
    available = torch.ones(n, dtype=torch.bool)
    for k in range(1, count + 1):
        candidates = (running.unsqueeze(0) + features) / k
        distance = (mean.unsqueeze(0) - candidates).norm(dim=1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        running += features[pick]
    return chosen


def reservoir_update(memory: list, seen: int, items: list, capacity: int, rng) -> tuple[list, int]:
    """Reservoir sampling (Vitter's algorithm R) over a stream: after it, every item seen so far is in the
    memory with probability capacity / seen. ``rng`` is a random.Random; returns (memory, seen)."""
    memory = list(memory)
    for item in items:
        if len(memory) < capacity:
            memory.append(item)
        else:
            slot = rng.randint(0, seen)  # inclusive: seen + 1 candidates for this item
            if slot < capacity:
                memory[slot] = item
        seen += 1
    return memory, seen


# ---- datasets ----------------------------------------------------------------------------------------------


class Relabelled(torch.utils.data.Dataset):
    """A task split with its labels mapped into the method's label space (indices of label_keys)."""

    def __init__(self, dataset, mapping: list[int], rows: list[int] | None = None):
        self.dataset, self.mapping = dataset, mapping
        self.rows = rows if rows is not None else list(range(len(dataset)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.rows[index]]
        return image, self.mapping[label]


class Indexed(torch.utils.data.Dataset):
    """Samples as (image, label, index): the index lets a method look up per-sample outputs it cached."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


@torch.no_grad()
def cached_image_features(model: torch.nn.Module, dataset, ctx: Context) -> torch.Tensor:
    """Normalised image features of every sample of ``dataset`` (on the device), for a frozen model whose
    outputs on a fixed image never change during the task. Exact only when the images are not augmented."""
    from components.model.data import make_loader

    backbone, rows = ctx.backbone, []
    for batch in make_loader(dataset, ctx.batch_size, ctx.workers):
        with backbone.autocast():
            rows.append(normalize(model.encode_image(batch[0].to(backbone.device, backbone.weights_dtype)).float()))
    return torch.cat(rows)


# ---- the shared base ------------------------------------------------------------------------------------


# Parameter-name prefixes of the text tower (open_clip's CLIP, and CustomTextCLIP's ``text.``).
TEXT_TOWER = ("transformer.", "token_embedding", "text.", "positional_embedding", "ln_final", "text_projection")


def visual_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        return list(model.visual.transformer.resblocks)
    except AttributeError:
        raise MethodError(
            "this method needs a ViT image tower (open_clip VisionTransformer); "
            f"{type(getattr(model, 'visual', model)).__name__} is not one"
        ) from None


class TunedCLIP(Method):
    """Base of the methods that fine-tune CLIP's weights. Subclasses choose what trains and the loss."""

    Settings = TuneSettings
    trained = frozenset({"image", "text"})  # every parameter but the logit scale (select_trainable)

    @classmethod
    def config_problems(cls, settings) -> list[tuple[str, str]]:
        return settings.schedule_problems()

    def __init__(self, settings=None):
        super().__init__(settings)
        self._pool_scorer: Method | None = None  # LVP scoring the rebuilt pools (it caches their merge)
        self._pools_built: tuple[PoolStats, ...] = ()  # the pools rebuilt at the end of the last task

    # ---- hooks a subclass overrides --------------------------------------------------------------------

    def select_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every parameter but the (frozen) logit scale."""
        return [(n, p) for n, p in self.model.named_parameters() if n != "logit_scale"]

    def setup(self) -> None:
        """Teachers, cached outputs and method state, once the task's label space is known."""

    def export(self, state) -> None:
        """Per-task method state into ``state.method_tensors`` / ``state.method_meta``."""

    # ---- contract ---------------------------------------------------------------------------------------

    def begin_task(self, state, task, ctx: Context) -> None:
        self.state, self.task, self.ctx = state, task, ctx
        self.chain_settings = self.settings  # what the state records; this task may override some of it
        try:
            self.settings = self.settings.for_task(task.task_id, task.dataset)
        except ValueError as exc:
            raise MethodError(f"{self.name}: per_task settings for {task.task_id}: {exc}") from None
        self.model = ctx.backbone.model
        self.device = torch.device(ctx.backbone.device)
        self.task_index = len(state.tasks)  # 0 for the first task of the chain
        names = {c.key: c.name for c in state.classes}
        names.update(zip(task.class_keys, task.class_names))
        self.class_names = names
        seen = [c.key for c in state.classes] + [k for k in task.class_keys if k not in {c.key for c in state.classes}]
        self.label_keys = list(task.class_keys) if self.settings.loss_classes == "task" else seen
        replays = state.method_meta.get("memory") or state.method_meta.get("reservoir")
        if self.settings.loss_classes == "task" and replays:
            self.label_keys = seen  # replayed samples of old classes need their classes in the loss
        self.old_keys = [c.key for c in state.classes]
        self.label_tokens = self.tokenize([self.train_prompt(k) for k in self.label_keys])
        # With iterations set the config was checked when resolved; an epoch schedule's length is known only now.
        steps = task_steps(self.settings, len(self.train_dataset()) if self.settings.iterations is None else 0)
        problems = run_problems(self.settings, steps)
        if problems:
            raise MethodError(f"{self.name}: task {task.task_id} runs {steps} steps: {'; '.join(problems)}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.trainable = self.select_trainable()
        for _, p in self.trainable:
            p.requires_grad_(True)
        self.text_trains = any(n.startswith(TEXT_TOWER) for n, _ in self.trainable)
        scale = getattr(self.model, "logit_scale", None)
        self.scale = scale.exp().detach().float() if scale is not None else torch.tensor(100.0)
        self._frozen_text: dict[str, torch.Tensor] = {}
        self._pools_built = ()
        self.model.train()
        self.setup()

    def trainable_parameters(self):
        return self.trainable

    def train_dataset(self):
        backbone = self.ctx.backbone
        augment = self.settings.augment and backbone.preprocess_train
        transform = backbone.preprocess_train if augment else backbone.preprocess
        index = {k: i for i, k in enumerate(self.label_keys)}
        parts = [Relabelled(self.task.dataset_for("train", transform), [index[k] for k in self.task.class_keys])]
        by_task: dict[str, list[int]] = {}
        for item in self.state.method_meta.get("memory", []) + self.state.method_meta.get("reservoir", []):
            by_task.setdefault(item["task_id"], []).append(item["row"])
        for task_id, rows in by_task.items():
            old = self.ctx.task(task_id)
            parts.append(Relabelled(old.dataset_for("train", transform), [index[k] for k in old.class_keys], rows))
        return Indexed(parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts))

    def end_task(self):
        state, task = self.state, self.task
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        state.weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state.add_classes(task.task_id, task.dataset, list(zip(task.class_keys, task.class_names)))
        state.tasks.append(task.summary())
        state.method_settings = self.chain_settings.model_dump(mode="json")
        if self.settings.memory_per_class:
            state.method_meta["memory"] = state.method_meta.get("memory", []) + self.select_exemplars()
        if self.settings.memory_size:
            import random

            items = [
                {"task_id": task.task_id, "row": row, "class_key": task.class_keys[label]}
                for row, (_, label) in enumerate(task.train)
            ]
            rng = random.Random(f"{self.ctx.seed}:{task.task_id}")  # reproducible, and independent of task order
            state.method_meta["reservoir"], state.method_meta["reservoir_seen"] = reservoir_update(
                state.method_meta.get("reservoir", []),
                state.method_meta.get("reservoir_seen", 0),
                items,
                self.settings.memory_size,
                rng,
            )
        self.export(state)
        if self.settings.classifier == "pool":
            self.rebuild_pools(state)
        self.forget_key_text()  # the weights changed: class text and pools are scored afresh
        self._pool_scorer = None
        self.settings = self.chain_settings
        return state

    def report(self) -> MethodReport:
        return MethodReport(pools=self._pools_built)

    # ---- text side ---------------------------------------------------------------------------------------

    def train_prompt(self, key: str) -> str:
        """The first template of the configured set, as the official codes train with one template."""
        from components.model.prompts import clean_class_name

        return self.ctx.templates_for(key.split("/", 1)[0])[0](clean_class_name(self.class_names[key]))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.ctx.backbone.tokenizer(texts).to(self.device)

    def encode_text(self, tokens: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        return normalize((model or self.model).encode_text(tokens).float())

    def encode_image(self, images: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        return normalize((model or self.model).encode_image(images).float())

    def text_of(self, tokens: torch.Tensor, cache_key: str) -> torch.Tensor:
        """Text embeddings: with gradient when the text tower trains, else computed once per task."""
        if self.text_trains:
            return self.encode_text(tokens)
        if cache_key not in self._frozen_text:
            with torch.no_grad():
                self._frozen_text[cache_key] = self.encode_text(tokens)
        return self._frozen_text[cache_key]

    def class_text(self) -> torch.Tensor:
        """Text embeddings of the label space's training prompts."""
        return self.text_of(self.label_tokens, "labels")

    # ---- training -------------------------------------------------------------------------------------

    def task_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """CE with label smoothing over the label space; also returns the image and class-text features.

        Over the global batch: with data-parallel workers, every worker's features and labels (model/replicas.py)."""
        replicas = self.ctx.replicas
        features, text = replicas.gather(self.encode_image(images)), self.class_text()
        labels = replicas.gather(labels)
        logits = self.scale * features @ text.T
        return F.cross_entropy(logits, labels, label_smoothing=self.settings.label_smoothing), features, text

    def training_step(self, batch):
        images, labels = batch[:2]
        return {"ce": self.task_loss(images, labels)[0]}

    # ---- memory and pools -----------------------------------------------------------------------------

    @torch.no_grad()
    def select_exemplars(self) -> list[dict]:
        """Herding on the fine-tuned model's normalised image embeddings, per class of this task.

        With data-parallel workers, the first worker's choice is every worker's: each picks as many rows per class
        (the labels are the same everywhere), and which ones is broadcast, so a rounding difference in one worker's
        embeddings cannot give it another memory (and so other batches in the next task)."""
        features, labels = self.ctx.image_embeddings(self.task, "train")
        chosen = []
        for local, key in enumerate(self.task.class_keys):
            rows = (labels == local).nonzero().flatten().tolist()
            if rows:
                for pick in herding(features[rows], self.settings.memory_per_class):
                    chosen.append({"task_id": self.task.task_id, "row": rows[pick], "class_key": key})
        if chosen and not self.ctx.replicas.single:
            picked = torch.tensor([c["row"] for c in chosen], dtype=torch.long, device=self.device)
            for item, row in zip(chosen, self.ctx.replicas.broadcast(picked).tolist()):
                item["row"] = row
        return chosen

    def rebuild_pools(self, state) -> None:
        """Pools of every learned task from the fine-tuned encoder (old pools are stale once it changed)."""
        from components.methods.lvp import build_pool

        built = []
        for summary in state.tasks:
            tid = summary["task_id"]
            task = self.task if tid == self.task.task_id else self.ctx.task(tid)
            state.pools[tid], stats = build_pool(task, self.ctx, self.settings.pool)
            built.append(stats)
        self._pools_built = tuple(built)

    # ---- prediction ----------------------------------------------------------------------------------------

    def scores(self, state, images, class_keys, class_names, ctx: Context) -> torch.Tensor:
        from components.model.backbones import encode_batch

        if self.settings.classifier == "pool" and state.pools:
            if self._pool_scorer is None:  # LVP's own scoring, merged pools cached until they change
                from components.methods.lvp import LVP

                self._pool_scorer = LVP(self.settings.pool)
            return self._pool_scorer.scores(state, images, class_keys, class_names, ctx)
        text = self.key_text(class_keys, class_names, ctx)
        return encode_batch(ctx.backbone, images) @ torch.stack([text[k] for k in class_keys]).T
