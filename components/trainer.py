"""The shared training loop of the continual fine-tuning methods.

A method supplies hooks (components.methods.base); this module owns everything around them: the data
loader, the device and precision, the optimizer and learning-rate schedule, gradient clipping, and the
callbacks for timing, loss logging, progress and checkpoints. So every method is trained, timed and
checkpointed the same way, and method modules stay small and free of platform code.

The optimiser settings are part of each method's settings (``TrainSettings``), with the official code's
defaults, so the resolved config logged with a run says exactly how it was trained.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from components.faults import fault_point
from components.methods.base import MethodReport

if TYPE_CHECKING:
    from components.data import TaskData
    from components.methods.base import Context, Method
    from components.state import LearnerState


class TrainError(RuntimeError):
    """Training cannot go on: a non-finite loss, no trainable parameter, an empty task."""


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


def total_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    return settings.iterations if settings.iterations is not None else settings.epochs * batches_per_epoch


def lr_factor(step: int, total: int, settings: TrainSettings) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine to min_lr or constant.

    A warmup longer than the run leaves the whole run in warmup, as the official GNSP/ZSCL code does.
    """
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = settings.min_lr / settings.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay)


# ---- callbacks ------------------------------------------------------------------------------------------


class Callback:
    """Cross-cutting work around the loop. Every hook is optional."""

    def on_fit_start(self, run: FitRun) -> None: ...
    def on_step_end(self, run: FitRun, step: int, losses: dict[str, float], seconds: float) -> None: ...
    def on_fit_end(self, run: FitRun) -> None: ...


class StepTimer(Callback):
    """Wall time of every optimisation step run in this process."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, run, step, losses, seconds):
        self.times.append(seconds)

    def median_ms(self) -> float | None:
        """The median step, leaving out the first steps (they warm caches)."""
        steady = self.times[2:] or self.times
        return 1000 * sorted(steady)[len(steady) // 2] if steady else None


class LossLog(Callback):
    """Every loss term per step (the method names them), kept for the run's report."""

    def __init__(self, every: int = 1) -> None:
        self.every, self.rows = every, []

    def on_step_end(self, run, step, losses, seconds):
        if step % self.every == 0 or step == run.total - 1:
            self.rows.append({"step": step, "lr": run.lr, **{k: round(v, 6) for k, v in losses.items()}})


class Progress(Callback):
    def __init__(self, say, every: int = 50) -> None:
        self.say, self.every = say, every

    def on_step_end(self, run, step, losses, seconds):
        if step % self.every == 0 or step == run.total - 1:
            terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            self.say(f"  step {step + 1}/{run.total} lr={run.lr:.2e} {terms}")


class Checkpoint(Callback):
    """Trainable weights, optimizer moments and the step, every N steps (safetensors + JSON, no pickle).

    ``fit`` resumes from it when the same method and task are trained again (a crashed run's rerun).
    """

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = Path(folder), every

    def on_step_end(self, run, step, losses, seconds):
        if (step + 1) % self.every == 0 and step + 1 < run.total:
            save_checkpoint(self.folder, run, step + 1)
            fault_point("after_checkpoint")

    def on_fit_end(self, run):
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            (self.folder / name).unlink(missing_ok=True)


def save_checkpoint(folder: Path, run: FitRun, next_step: int) -> None:
    from safetensors.torch import save_file

    from components.storage import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": p.detach().cpu().contiguous().clone() for name, p in run.named_params}
    names = {id(p): name for name, p in run.named_params}
    moments: dict[str, Any] = {}
    for p, slot in run.optimizer.state.items():
        for key, value in slot.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"opt/{names[id(p)]}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                moments.setdefault(names[id(p)], {})[key] = float(value)
    for key, value in run.method.training_state().items():
        tensors[f"method/{key}"] = value.detach().cpu().contiguous().clone()
    tmp = folder / ".checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "checkpoint.safetensors")
    atomic_write_text(
        folder / "checkpoint.json",
        json.dumps({"next_step": next_step, "identity": run.identity, "scalars": moments}, indent=2, sort_keys=True),
    )


def load_checkpoint(folder: Path, run: FitRun) -> int:
    """Restore a matching checkpoint; returns the step to continue from (0 when there is none)."""
    from safetensors.torch import load_file

    meta_path, tensor_path = folder / "checkpoint.json", folder / "checkpoint.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("identity") != run.identity:
        return 0  # another task, method or setting: start over rather than mix runs
    tensors = load_file(str(tensor_path))
    by_name = dict(run.named_params)
    with torch.no_grad():
        for name, p in run.named_params:
            p.copy_(tensors[f"param/{name}"].to(p.device, p.dtype))
    for name, p in by_name.items():
        slot = {
            key.split("/")[-1]: value.to(p.device) for key, value in tensors.items() if key.startswith(f"opt/{name}/")
        }
        for key, value in meta.get("scalars", {}).get(name, {}).items():
            slot[key] = torch.tensor(value)
        if slot:
            run.optimizer.state[p] = slot
    extra = {k[len("method/") :]: v for k, v in tensors.items() if k.startswith("method/")}
    if extra:
        run.method.load_training_state(extra)
    return int(meta["next_step"])


# ---- reports --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReport:
    """One task's training: every step's losses and lr, the steps run here, their median time, peak memory."""

    losses: list[dict[str, float]]  # {"step", "lr", <term>: value}, one row per logged step
    train_steps: int  # steps run by this process (fewer than the schedule's when it resumed)
    resumed_from: int  # the step it started at (0: from the beginning; else from a checkpoint)
    train_step_ms: float | None = None  # median step time, warm-up steps left out
    peak_mem_mb: float | None = None  # CUDA only

    @property
    def final_loss(self) -> dict[str, float] | None:
        return {k: v for k, v in self.losses[-1].items() if k not in ("step", "lr")} if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        """The ``eval/training.json`` document (its keys and their order are what readers expect)."""
        doc: dict[str, Any] = {}
        if self.train_step_ms is not None:
            doc["train_step_ms"] = self.train_step_ms
        doc["train_steps"] = self.train_steps
        doc["losses"] = self.losses
        if self.losses:
            doc["final_loss"] = self.final_loss
        if self.peak_mem_mb is not None:
            doc["peak_mem_mb"] = self.peak_mem_mb
        doc["resumed_from"] = self.resumed_from
        return doc


@dataclass(frozen=True)
class TaskReport:
    """What learning one task measured: the training loop's report (None when the method does not train)
    and the method's own (pools built and their speed)."""

    train: TrainReport | None
    method: MethodReport

    @property
    def pool_img_per_s(self) -> float | None:
        """Images per second of the last pool built during the task (None when none was built)."""
        return self.method.pools[-1].img_per_s if self.method.pools else None


# ---- the loop -------------------------------------------------------------------------------------------


@dataclass
class FitRun:
    """The loop's state as callbacks see it."""

    method: Method
    named_params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    total: int
    identity: dict[str, Any]
    lr: float = 0.0


def _batches(loader, seed: int):
    """Endless batches; each epoch's order is seeded by (seed + epoch), so a resumed run sees the same ones."""
    epoch = 0
    while True:
        loader.generator.manual_seed(seed + epoch)
        yield from loader
        epoch += 1


def optimization_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    named: list[tuple[str, torch.nn.Parameter]],
    images: torch.Tensor,
    labels: torch.Tensor,
    ctx: Context,
    step: int,
    indices: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One step: the method's hooks around forward, backward and the optimizer (also timed by benchmarks).

    The method's batch is (images, labels), plus the samples' dataset indices when the dataset gives them.
    """
    device = torch.device(ctx.backbone.device)
    method.before_step(step)
    images = images.to(device, dtype=ctx.backbone.weights_dtype, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    batch = (images, labels) if indices is None else (images, labels, indices.to(device, non_blocking=True))
    with ctx.backbone.autocast():
        losses = method.training_step(batch)
    loss = sum(v.float() for v in losses.values())
    if not torch.isfinite(loss):
        raise TrainError(
            f"{method.name}: loss is {loss.item()} at step {step + 1} "
            f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); lower the lr"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward()
    if method.settings.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], method.settings.grad_clip)
    optimizer.step()
    method.after_step(step)
    return losses


def fit(method: Method, task: TaskData, ctx: Context, callbacks: list[Callback] | None = None) -> TrainReport:
    """Train ``method`` on ``task`` (after ``method.begin_task``); returns the run's report."""
    from components.data import make_loader

    settings = method.settings
    dataset = method.train_dataset()
    if len(dataset) == 0:
        raise TrainError(f"{method.name}: task {task.task_id} has no training images")
    loader = make_loader(dataset, min(settings.batch_size, len(dataset)), ctx.workers, shuffle=True, seed=ctx.seed)
    named = [(n, p) for n, p in method.trainable_parameters() if p.requires_grad]
    if not named:
        raise TrainError(f"{method.name}: nothing to train on task {task.task_id} (every parameter is frozen)")
    optimizer = make_optimizer([p for _, p in named], settings)
    total = total_steps(settings, len(loader))
    identity = {
        "method": method.name,
        "task": task.task_id,
        "settings": settings.model_dump(mode="json"),
        "params": [n for n, _ in named],
    }
    run = FitRun(method, named, optimizer, total, identity)
    timer, log = StepTimer(), LossLog()
    callbacks = [timer, log, *(callbacks or [])]
    if ctx.progress is not None:
        callbacks.append(Progress(ctx.say, every=max(1, total // 10)))
    start = 0
    if ctx.checkpoint_dir is not None and settings.checkpoint_every:
        folder = Path(ctx.checkpoint_dir) / task.task_id
        start = load_checkpoint(folder, run)
        callbacks.append(Checkpoint(folder, settings.checkpoint_every))
        if start:
            ctx.say(f"  resuming {task.task_id} at step {start + 1}/{total} from {folder}")
    device = torch.device(ctx.backbone.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for cb in callbacks:
        cb.on_fit_start(run)

    batches = _batches(loader, ctx.seed)
    for _ in range(start):  # a resumed run sees the batches it would have seen
        next(batches)
    for step in range(start, total):
        images, labels, *rest = next(batches)
        t0 = time.perf_counter()
        factor = lr_factor(step, total, settings)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        run.lr = settings.lr * factor
        try:
            losses = optimization_step(method, optimizer, named, images, labels, ctx, step, rest[0] if rest else None)
        except TrainError as exc:
            raise TrainError(f"task {task.task_id}: {exc}") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        values = {k: float(v.detach()) for k, v in losses.items()}
        for cb in callbacks:
            cb.on_step_end(run, step, values, seconds)
    method.after_fit()
    for cb in callbacks:
        cb.on_fit_end(run)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return TrainReport(
        losses=log.rows,
        train_steps=len(timer.times),
        resumed_from=start,
        train_step_ms=timer.median_ms(),
        peak_mem_mb=peak,
    )


def run_task(method: Method, state: LearnerState, task: TaskData, ctx: Context) -> tuple[LearnerState, TaskReport]:
    """One task through a method's hooks: begin, the shared loop when the method trains, end.

    Returns the new learner state and what the task measured."""
    method.begin_task(state, task, ctx)
    train = fit(method, task, ctx) if method.trains else None
    state = method.end_task()
    return state, TaskReport(train=train, method=method.report())
