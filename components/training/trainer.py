"""The shared training loop of the continual fine-tuning methods.

A method supplies hooks (components.methods.base); this module owns everything around them: the data
loader, the device and precision, the optimizer and learning-rate schedule, gradient clipping and the
loop that calls the callbacks (timing, loss logging, progress and checkpoints, in ``components/training/callbacks.py``).
So every method is trained, timed and checkpointed the same way, and method modules stay small and free of
platform code.

The optimiser settings are part of each method's settings (``methods.settings.TrainSettings``), with the official code's
defaults, so the resolved config logged with a run says exactly how it was trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.methods.base import MethodReport
from components.methods.settings import TrainSettings
from components.training.callbacks import (
    Callback,
    Checkpoint,
    FitRun,
    LossLines,
    LossLog,
    StepProgress,
    StepTimer,
    load_checkpoint,
)

if TYPE_CHECKING:
    from components.methods.base import Context, Method
    from components.model.data import TaskData
    from components.model.state import LearnerState


class TrainError(RuntimeError):
    """Training cannot go on: a non-finite loss, no trainable parameter, an empty task."""


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
    ctx.replicas.mean_grads(p for _, p in named)  # every worker steps alike; before a method's gradient hook
    method.after_backward()
    if method.settings.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], method.settings.grad_clip)
    optimizer.step()
    method.after_step(step)
    return losses


def _check_split(method: Method, task: TaskData, batch_size: int, images: int, workers: int) -> None:
    """Data-parallel training needs a method that declares it, and a slice of every batch for every worker."""
    if workers == 1:
        return
    if not method.data_parallel:
        raise TrainError(
            f"{method.name} does not train data-parallel yet ({workers} workers); train it with one "
            "(docs/methods/README.md, 'Training on several workers', lists the methods that do)"
        )
    smallest = min(batch_size, images % batch_size or batch_size)
    if smallest < workers:
        raise TrainError(
            f"task {task.task_id}: a batch of {smallest} images cannot be split over {workers} workers "
            f"({images} training images in batches of {batch_size}); use fewer workers or another batch size"
        )


def fit(method: Method, task: TaskData, ctx: Context, callbacks: list[Callback] | None = None) -> TrainReport:
    """Train ``method`` on ``task`` (after ``method.begin_task``); returns the run's report."""
    from components.model.data import make_loader

    settings = method.settings
    dataset = method.train_dataset()
    if len(dataset) == 0:
        raise TrainError(f"{method.name}: task {task.task_id} has no training images")
    batch_size = min(settings.batch_size, len(dataset))
    _check_split(method, task, batch_size, len(dataset), ctx.replicas.world)
    loader = make_loader(dataset, batch_size, ctx.workers, shuffle=True, seed=ctx.seed, replicas=ctx.replicas)
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
        callbacks.append(LossLines(ctx.say, every=max(1, total // 10)))
    start = 0
    if ctx.checkpoint_dir is not None and settings.checkpoint_every:
        folder = Path(ctx.checkpoint_dir) / task.task_id
        start = load_checkpoint(folder, run)  # every worker resumes from it; the first one alone writes them
        writes = ctx.replicas.rank == 0
        callbacks.append(Checkpoint(folder, settings.checkpoint_every, ctx.checkpoint_saved, ctx.fence, writes))
        if start:
            ctx.say(f"  resuming {task.task_id} at step {start + 1}/{total} from {folder}")
    steps_done = StepProgress(f"train {task.task_id} ({method.name})", first=start)
    callbacks.append(steps_done)
    device = torch.device(ctx.backbone.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for cb in callbacks:
        cb.on_fit_start(run)

    batches = _batches(loader, ctx.seed)
    for _ in range(start):  # a resumed run sees the batches it would have seen
        next(batches)
    try:
        for step in range(start, total):
            images, labels, *rest = next(batches)
            t0 = time.perf_counter()
            factor = lr_factor(step, total, settings)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            run.lr = settings.lr * factor
            try:
                losses = optimization_step(
                    method, optimizer, named, images, labels, ctx, step, rest[0] if rest else None
                )
            except TrainError as exc:
                raise TrainError(f"task {task.task_id}: {exc}") from None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            values = {k: float(v.detach()) for k, v in losses.items()}
            for cb in callbacks:
                cb.on_step_end(run, step, values, seconds)
    finally:  # a failed or interrupted run's progress ends too (closing twice is harmless)
        steps_done.bar.close()
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
