"""What every fine-tuning method is configured with (``TuneSettings``), and the schedules it refuses.

Some settings are counted in optimizer steps (the warmup, ZSCL's ensemble interval). The official values
fit the official schedules (100 warmup steps of 1000 iterations); a shortened schedule that kept them
would run entirely in warmup, or hold an ensemble of three points. Such a schedule is refused, with the
setting, its value and the run's length in one line: when the config is resolved, where ``iterations``
gives the run's length (``TuneSettings.schedule_problems``, through ``Method.config_problems``), and always
when a task starts (``run_problems``), where an ``epochs`` schedule's length is known at last. The
settings themselves stay valid data: a learned state's recorded settings load (serving) whatever they say.

Each settings class declares its step-counted settings in ``step_intervals``; ``checkpoint_every`` is not
one of them: it bounds the work a crash loses, and a task shorter than it loses at most itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from components.model.pools import PoolConfig


class TrainSettings(BaseModel):
    """How a method is optimised. Each method's settings extend this with its official defaults."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="optimizer, re-created at every task")
    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    epochs: int = Field(1, ge=1, description="passes over the task when iterations is null")
    iterations: int | None = Field(None, ge=1, description="optimizer steps per task (overrides epochs)")
    batch_size: int = Field(64, ge=1)
    warmup_steps: int = Field(0, ge=0, description="linear warmup lr*(step+1)/warmup, then the schedule")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0, description="cosine floor")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm, applied after any projection")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = Field(True, description="train with open_clip's training transform (random resized crop)")
    checkpoint_every: int | None = Field(None, ge=1, description="save a resumable checkpoint every N steps")
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="settings for one task, by task id or dataset name, e.g. {aircraft: {lr: 5e-5, iterations: 100}} "
        "(the official per-dataset schedules)",
    )

    def for_task(self, task_id: str, dataset: str) -> TrainSettings:
        """These settings with the task's own overrides applied (by task id, else by dataset name)."""
        override = self.per_task.get(task_id) or self.per_task.get(dataset)
        if not override:
            return self
        if "per_task" in override:
            raise ValueError("per_task entries cannot nest per_task")
        return type(self).model_validate({**self.model_dump(), **override})


@dataclass(frozen=True)
class StepInterval:
    """A setting counted in optimizer steps, and when a run of ``steps`` steps cannot hold it."""

    refuse_equal: bool  # True: refused when it equals the run's length too (not only when it exceeds it)
    why: str  # what would go wrong, for the refusal

    def problem(self, name: str, value: Any, steps: Any, length: str = "iterations") -> str | None:
        if not _count(value) or not _count(steps):
            return None  # off (null / 0), or a value whose own validation reports it
        if value > steps or (self.refuse_equal and value == steps):
            sign = ">=" if self.refuse_equal else ">"
            return f"{name} ({value}) {sign} {length} ({steps}): {self.why}; shorten {name} with the schedule"
        return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


WARMUP = StepInterval(
    refuse_equal=False,  # equal: the lr peaks at the last step (the official GNSP Aircraft schedule, 100 of 100)
    why="the learning rate would never reach its peak",
)


def task_steps(settings: TrainSettings, train_images: int) -> int:
    """Optimizer steps of a task: ``iterations``, else ``epochs`` passes in batches of at most
    ``batch_size`` (the trainer's loader keeps the last, smaller batch)."""
    if settings.iterations is not None:
        return settings.iterations
    return settings.epochs * math.ceil(train_images / max(1, min(settings.batch_size, train_images)))


def run_problems(settings: TuneSettings, steps: int) -> list[str]:
    """The step-counted settings that a run of ``steps`` steps cannot hold (empty when it can)."""
    problems = (
        rule.problem(name, getattr(settings, name), steps, "steps") for name, rule in settings.step_intervals.items()
    )
    return [p for p in problems if p]


class TuneSettings(TrainSettings):
    # Settings counted in optimizer steps: each must fit the task's run (a subclass adds its own).
    step_intervals: ClassVar[dict[str, StepInterval]] = {"warmup_steps": WARMUP}

    loss_classes: Literal["task", "seen"] = Field(
        "task", description="classes the task loss ranges over: the task's own (MTIL) or every class seen so far"
    )
    memory_per_class: int = Field(
        0, ge=0, description="replay exemplars kept per class (herding), mixed into later tasks"
    )
    memory_size: int = Field(
        0,
        ge=0,
        description="replay memory of this many training samples, reservoir-sampled over "
        "every task seen (CTP+ER: 10000), mixed into later tasks",
    )
    classifier: Literal["text", "pool"] = Field(
        "text",
        description="predict with class-prompt text embeddings, or with LVP pools rebuilt from the fine-tuned encoder",
    )
    pool: PoolConfig = Field(default_factory=PoolConfig, description="LVP pool settings when classifier is pool")

    def schedule_problems(self) -> list[tuple[str, str]]:
        """(setting, problem) for each step-counted setting that ``iterations`` cannot hold, and each per_task
        entry's (with what it inherits). Empty with an epoch schedule: the task's length is not known yet."""
        problems = [
            (name, rule.problem(name, getattr(self, name), self.iterations))
            for name, rule in self.step_intervals.items()
        ]
        for key, override in self.per_task.items():
            steps = override.get("iterations", self.iterations)
            for name, rule in self.step_intervals.items():
                own = override.get(name, getattr(self, name))
                problems.append((f"per_task.{key}", rule.problem(name, own, steps)))
        return [(where, p) for where, p in problems if p]
