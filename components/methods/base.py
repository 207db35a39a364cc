"""The method contract (docs/contracts.md, "Method hooks").

A method sees the learner state and one task, and returns the new learner state; it can also score
images against any set of classes. Its hooks::

    begin_task(state, task, ctx)              set up: teachers, frozen parts, cached outputs, pools
    trainable_parameters() -> [(name, p)]     what the optimizer updates this task
    before_step(step)                         e.g. CTP's momentum update, ZSCL's weight ensemble
    training_step(batch) -> {name: loss}      summed for backward by the shared trainer; each term logged
    after_backward()                          e.g. GNSP's gradient projection, before the optimizer step
    after_step(step)                          e.g. GNSP's projection of the whole update (ablation)
    end_task() -> LearnerState                per-task state out
    report() -> MethodReport                  what it measured on the task (pools built, their speed)
    scores(state, images, classes, ctx)       logits [N, len(classes)] over the given class keys

A method that builds a per-task pool from the task alone says so (``builds_pools``) and makes it with
``build_pool(task, ctx)``, so the pipeline can build pools as a step of their own.

The shared trainer (components.training.trainer) owns the loop, devices, precision, optimizer and schedule, and
runs the callbacks for checkpoints, logging, timing and progress.
Method code imports no prefect, mlflow or boto3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from components.model.replicas import SINGLE, Replicas

if TYPE_CHECKING:  # type names only: importing them here would load the data and pool modules with every method
    from components.model.backbones import Backbone
    from components.model.data import TaskData
    from components.model.pools import TaskPool
    from components.model.state import LearnerState


class MethodError(RuntimeError):
    pass


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PoolStats:
    """One label-vector pool build: how many training images were encoded, and how fast."""

    images: int
    seconds: float

    @property
    def img_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


@dataclass(frozen=True)
class MethodReport:
    """What a method measured on the task it just learned, for the caller to log (``Method.report``)."""

    pools: tuple[PoolStats, ...] = ()  # every pool built during the task, in order


@dataclass(frozen=True)
class Context:
    """What the shared machinery hands a method: the backbone, and how to turn images into tensors.

    Built complete by the caller (``context_for``); nothing is filled in afterwards."""

    backbone: Backbone
    batch_size: int = 64
    workers: int = 0
    templates: str = "lvp"  # prompt template set for class text embeddings ("task": each dataset's own prompts)
    task_prompts: Mapping[str, list[str]] = field(default_factory=dict)  # dataset -> templates from task.yaml
    seed: int = 0
    prebuilt_pools: Mapping[str, str] = field(default_factory=dict)  # task id -> folder of a pool built elsewhere
    load_base: Callable[[], Backbone] | None = None  # the configured base model, untouched by learning (teachers)
    locate_task: Callable[[str], TaskData] | None = None  # a learned task by id (replay memory, pool rebuilds)
    resolve: Callable[[str], str] | None = None  # a configured location ("demo:...", relative path) -> a loadable one
    progress: Callable[[str], None] | None = None  # where the trainer reports progress
    checkpoint_dir: Path | None = None  # folder for resumable training checkpoints (None: no checkpoints)
    # Told each checkpoint's folder (e.g. to mirror it); None on a data-parallel worker that does not write them.
    checkpoint_saved: Callable[[Path | None], None] | None = None
    fence: Callable[[], None] | None = None  # raises when the run may no longer write its checkpoints (superseded)
    pool_engine: Any = (
        None  # compute.engine: encodes shards for pools of the base encoder (components/model/pool_engine.py)
    )
    # Embeddings of the base encoder, each split encoded once (components/model/embedding_cache.py); only on a context
    # whose backbone is the base model of a method that ``encodes_frozen``. None: encode every time.
    embedding_cache: Any = None
    decoder: str = (
        "pillow-draft2x"  # how frozen encoders' images are decoded (components/model/data.py, resolve_decoder)
    )
    replicas: Replicas = SINGLE  # this worker among data-parallel ones training together (model/replicas.py)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    @functools.cached_property
    def base_backbone(self) -> Backbone:
        """The base model (the teacher of ZSCL and GNSP), loaded on first use."""
        if self.load_base is None:
            raise MethodError("this method needs the base model but the context cannot load it")
        return self.load_base()

    def task(self, task_id: str) -> TaskData:
        if self.locate_task is None:
            raise MethodError(
                f"task {task_id} is needed again (replay or pool rebuild) but the context cannot locate learned tasks"
            )
        return self.locate_task(task_id)

    @property
    def device(self) -> torch.device:
        return torch.device(self.backbone.device)

    def image_embeddings(self, task: TaskData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised fp32 embeddings (on CPU) and labels of a task split, in manifest order."""
        from components.model.backbones import encode_batch
        from components.model.data import make_loader

        dataset = task.dataset_for(split, self.backbone.preprocess, self.decoder, self.backbone.device)
        feats, labels = [], []
        for images, batch_labels in make_loader(dataset, self.batch_size, self.workers):
            feats.append(encode_batch(self.backbone, images))
            labels.append(batch_labels)
        if not feats:
            return torch.zeros(0, self.backbone.embed_dim), torch.zeros(0, dtype=torch.long)
        return torch.cat(feats), torch.cat(labels)

    def templates_for(self, dataset: str | None, own: list[str] | None = None) -> list:
        """The prompt templates of a dataset: its own (task.yaml) when templates is "task", else the configured set.
        ``own``: the prompts of a task outside the stream (a reference set), for a dataset the context lacks."""
        from components.model.prompts import get_templates, task_templates

        if self.templates == "task":
            return task_templates(self.task_prompts.get(dataset or "") or own)
        return get_templates(self.templates)

    def text_embeddings(self, class_names: Iterable[str], dataset: str | None = None) -> torch.Tensor:
        """Normalised text embeddings of class names, averaged over the dataset's templates."""
        from components.model.prompts import class_text_embeddings

        return class_text_embeddings(self.backbone, list(class_names), self.templates_for(dataset))

    def key_text_embeddings(self, keys: list[str], class_names: dict[str, str]) -> torch.Tensor:
        """Text embeddings of class keys ("<dataset>/<name>"), grouped by dataset for the prompts."""
        out = torch.zeros(len(keys), self.backbone.embed_dim)
        by_dataset: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_dataset.setdefault(key.split("/", 1)[0], []).append(i)
        for dataset, rows in by_dataset.items():
            out[rows] = self.text_embeddings([class_names[keys[i]] for i in rows], dataset)
        return out


PARTS = {"image": "image tower", "text": "text tower", "head": "a head of its own", "pools": "label-vector pools"}


def _parts_text(parts: frozenset[str]) -> str:
    if not parts:
        return "nothing (frozen)"
    words = " + ".join(PARTS[p] for p in PARTS if p in parts)
    return f"{words} (frozen encoders)" if parts == {"pools"} else words


class Method:
    """Base class; subclasses are registered with ``@register_method(name)``."""

    name: ClassVar[str] = "?"
    summary: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel]] = NoSettings
    trains: ClassVar[bool] = True  # False: the trainer runs no optimisation loop (e.g. LVP, zero-shot)
    # True: each task's begin_task needs a pool that ``build_pool`` makes from that task alone, with the base
    # encoder, so a pipeline may build the pools beforehand as their own step (and in parallel) (LVP).
    builds_pools: ClassVar[bool] = False
    # What a task changes, as the method's official code trains it: "image" / "text" (parameters of that tower),
    # "head" (a layer of the method's own), "pools" (built from frozen encoders). Empty: nothing (frozen).
    # ``trained_later``: from the second task on, where it differs (GNSP). tests/test_schedule.py checks the
    # declaration against what has requires_grad after ``begin_task``.
    trained: ClassVar[frozenset[str]] = frozenset()
    trained_later: ClassVar[frozenset[str] | None] = None
    trained_note: ClassVar[str] = ""  # which part of a tower, when not all of it
    # True: its loss is computed over the global batch on every data-parallel worker (components/model/replicas.py)
    # and everything else it keeps is identical on every worker, so N workers train as one process does.
    data_parallel: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "data_parallel" not in cls.__dict__:  # declared by each method, never inherited: a subclass adds losses
            cls.data_parallel = False
        unknown = (cls.trained | (cls.trained_later or frozenset())) - set(PARTS)
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown trained parts {sorted(unknown)}; known: {sorted(PARTS)}")

    def __init__(self, settings: BaseModel | dict[str, Any] | None = None):
        if settings is None or isinstance(settings, dict):
            settings = self.Settings.model_validate(settings or {})
        self.settings = settings
        self._key_text: dict[str, torch.Tensor] = {}  # class key -> prompt text embedding for the current weights

    @classmethod
    def trained_text(cls) -> str:
        """``trained`` in words, for ``cliploop methods``."""
        text = _parts_text(cls.trained)
        if cls.trained_later is not None:
            text = f"{text} on the first task, then {_parts_text(cls.trained_later)}"
        return f"{text} ({cls.trained_note})" if cls.trained_note else text

    @classmethod
    def config_problems(cls, settings: BaseModel) -> list[tuple[str, str]]:
        """(setting, problem) for valid settings that cannot run as configured (a step-counted setting that its
        schedule cannot hold), found when a config is resolved; a task refuses them again when it starts."""
        return []

    def begin_task(self, state: LearnerState, task: TaskData, ctx: Context) -> None:
        raise NotImplementedError

    def build_pool(self, task: TaskData, ctx: Context) -> tuple[TaskPool, PoolStats]:
        """The task's pool, from its training images alone (only when ``builds_pools``)."""
        raise NotImplementedError(f"{self.name} builds no per-task pools")

    def key_text(self, keys: list[str], class_names: dict[str, str], ctx: Context) -> dict[str, torch.Tensor]:
        """Prompt text embeddings of class keys, each computed once for the current weights
        (a method that changes the weights calls ``forget_key_text`` when it does)."""
        missing = [k for k in keys if k not in self._key_text]
        if missing:
            for key, vector in zip(missing, ctx.key_text_embeddings(missing, class_names)):
                self._key_text[key] = vector
        return {k: self._key_text[k] for k in keys}

    def forget_key_text(self) -> None:
        self._key_text = {}

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError(f"{self.name} has no training loop")

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The dataset the trainer iterates this task (a replay memory mixes old samples in)."""
        raise NotImplementedError(f"{self.name} has no training loop")

    def before_step(self, step: int) -> None:
        return None

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no training loop")

    def after_backward(self) -> None:
        return None

    def after_step(self, step: int) -> None:
        return None

    def after_fit(self) -> None:
        return None

    def training_state(self) -> dict[str, torch.Tensor]:
        """What the method changes during a task besides the trained weights and the optimizer (a running
        average, a momentum model, queues, a data cursor): saved in training checkpoints so that a resumed
        task goes on exactly where it stopped."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        return None

    def end_task(self) -> LearnerState:
        raise NotImplementedError

    def report(self) -> MethodReport:
        """What the method measured on the task that just ended (called after ``end_task``)."""
        return MethodReport()

    def scores(
        self,
        state: LearnerState,
        images: torch.Tensor,
        class_keys: list[str],
        class_names: dict[str, str],
        ctx: Context,
    ) -> torch.Tensor:
        raise NotImplementedError

    def embedding_scores(
        self,
        state: LearnerState,
        embeddings: torch.Tensor,
        class_keys: list[str],
        class_names: dict[str, str],
        ctx: Context,
    ) -> torch.Tensor:
        """``scores`` from the images' L2-normalised fp32 embeddings under ``ctx.backbone``, for a method whose
        scores depend on the images through those alone (see ``encodes_frozen``)."""
        raise NotImplementedError(f"{self.name} scores images, not embeddings")

    @classmethod
    def encodes_frozen(cls) -> bool:
        """Whether evaluation may score this method from embeddings read from the embedding cache: it trains no
        image tower (``trained``) and scores by ``embedding_scores``."""
        frozen = "image" not in cls.trained | (cls.trained_later or frozenset())
        return frozen and cls.embedding_scores is not Method.embedding_scores


def task_prompts(tasks: Iterable[TaskData | None]) -> dict[str, list[str]]:
    """Dataset -> its own prompt templates, from the first of ``tasks`` that brings some (for ``Context``)."""
    prompts: dict[str, list[str]] = {}
    for task in tasks:
        if task is not None and task.prompts:
            prompts.setdefault(task.dataset, task.prompts)
    return prompts
