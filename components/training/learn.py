"""The learning driver: one continual step (``learn_step``), with no platform at all.

``learn_step`` learns one task on top of a parent learner state (None: the base model). Both drivers of
learning call it: the pipeline's train-and-evaluate step (one task on top of the champion) and
``cliploop learn`` (a loop of steps, in ``components/training/learn_sequence.py``). So a sequence learned at
once and the same tasks learned one night at a time give the same matrix. A step:

1. evaluates before learning: the base model on every new column of the accuracy matrix (its
   ``initial`` entries), and the parent on a task the matrix did not know yet (transfer);
2. learns the task with the configured method, from the parent's state (components.training.trainer.run_task);
3. evaluates every learned task's test split, the tasks still to come when the sequence is known and
   ``evaluation.future_tasks`` says so, and the held-out zero-shot set; appends a row to the parent's
   accuracy matrix and recomputes the metrics from the whole matrix;
4. writes the matrix, metrics, plots, training report, resolved config and learner state, when asked.

Nothing here imports Prefect, MLflow, DVC or boto3.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.methods.base import Method, task_prompts
from components.model.data import TaskData, load_task
from components.settings.config import Config
from components.training.run_context import context_for

if TYPE_CHECKING:
    from components.model.backbones import Backbone
    from components.model.embedding_cache import EmbeddingCache
    from components.model.state import LearnerState
    from components.training.metrics import AccuracyMatrix
    from components.training.trainer import TaskReport


class LearnError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepTimings:
    evaluate_before_s: float
    learn_s: float
    evaluate_s: float
    total_s: float
    pool_img_per_s: float | None = None  # when the step built a pool itself
    train_step_ms: float | None = None  # when the method trains

    def to_dict(self) -> dict[str, float]:
        """The ``timings`` of eval/metrics.json and the pipeline's result.json (read by its MLflow logging)."""
        doc = {"evaluate_before_s": self.evaluate_before_s, "learn_s": self.learn_s}
        if self.pool_img_per_s is not None:
            doc["pool_img_per_s"] = self.pool_img_per_s
        if self.train_step_ms is not None:
            doc["train_step_ms"] = self.train_step_ms
        return doc | {"evaluate_s": self.evaluate_s, "total_s": self.total_s}


@dataclass(frozen=True)
class StepResult:
    task_id: str
    state: LearnerState
    matrix: AccuracyMatrix
    metrics: dict[str, float | None]
    report: TaskReport  # the trainer's and the method's: losses, step time, pools built
    timings: StepTimings
    out_dir: Path | None = None


def make_method(config: Config, name: str | None = None) -> Method:
    from pydantic import ValidationError

    from components.methods import get_method

    cls = get_method(name or config.method.name)
    try:
        return cls(config.method.settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"method.settings.{'.'.join(map(str, e['loc']))}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        )
        raise LearnError(f"method {cls.name}: {problems}") from None


def stored_task_locator(config: Config) -> Callable[[str], str]:
    """Learned tasks are found in the workspace, by id (the state names tasks, not machine paths)."""
    return lambda task_id: str(config.workspace_path / "data" / "tasks" / task_id)


def _as_task(task: str | Path | TaskData) -> TaskData:
    return task if isinstance(task, TaskData) else load_task(task)


def learn_step(
    task: str | Path | TaskData,
    config: Config,
    parent: LearnerState | None = None,
    *,
    locate: Callable[[str], str | TaskData] | None = None,
    upcoming: Sequence[TaskData] = (),
    base: Backbone | None = None,
    pools: dict[str, str] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_saved: Callable[[Path], None] | None = None,
    fence: Callable[[], None] | None = None,
    method_name: str | None = None,
    out_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    embeddings: EmbeddingCache | None = None,
    addresses: dict[str, dict] | None = None,
) -> StepResult:
    """Learn one task (a drop, a stored task or a loaded one) on top of ``parent``.

    ``locate``: a learned task's id -> its location or data (default: the workspace's stored tasks).
    ``upcoming``: the tasks still to come when the sequence is known (``cliploop learn``): columns of the
    matrix from the start. ``base``: the base model, already loaded (it is never trained).
    ``pools``: task id -> folder of a pool built beforehand (the pipeline's build_pool step).
    ``checkpoint_dir``: where training checkpoints go (``method.settings.checkpoint_every``); a step that
    finds a matching checkpoint there resumes from it. ``fence``: called before each checkpoint write; raises
    when this attempt of the step was superseded (``components/support/fencing.py``).
    ``embeddings``: the embedding cache to read and fill (default: the configured one, ``for_config``); used only
    when the method's image encoder is frozen (``Method.encodes_frozen``). ``addresses``: task id -> DVC content
    address, handed to data-parallel training workers (``compute.train_workers``) that share only object storage.
    """
    from components.model.backbones import load_backbone
    from components.model.embedding_cache import for_config
    from components.model.state import LearnerState, check_backbone
    from components.training.evaluation import evaluate
    from components.training.metrics import AccuracyMatrix, compute_all
    from components.training.trainer import run_task

    say = progress or (lambda message: None)
    started = time.perf_counter()
    name = method_name or config.method.name
    if parent is not None and parent.method != name:
        raise LearnError(
            f"the parent model was made by method {parent.method!r} but the configuration selects "
            f"{name!r}; a chain keeps one method (start a new chain to switch)"
        )
    method = make_method(config, name)
    base = base if base is not None else load_backbone(config.model, frozen=True)  # the model itself only if frozen
    if parent is not None:
        check_backbone(parent.backbone, base.reference, "the parent model")
    weights = parent.weights if parent is not None else None
    # The model that learns: the parent's weights, in a copy of its own when training would change the base.
    backbone = (
        base
        if weights is None and not method.trains
        else load_backbone(config.model, weights=weights, frozen=not method.trains)
    )

    task = _as_task(task)
    learned = parent.task_ids if parent is not None else []
    if task.task_id in learned:
        raise LearnError(f"task {task.task_id} was already learned by the parent model")
    locate = locate or stored_task_locator(config)
    seen = [_as_task(locate(t)) for t in learned]
    known = {t.task_id: t for t in [*seen, task, *upcoming]}
    zero_shot = load_task(config.location(config.evaluation.zero_shot_set)) if config.evaluation.zero_shot_set else None
    prompts = task_prompts([*seen, task, *upcoming, zero_shot])
    # Only the base encoder's embeddings are cached: a frozen method's context holds the base model.
    cache = (embeddings or for_config(config)) if method.encodes_frozen() else None
    ctx = context_for(
        config,
        backbone,
        task_prompts=prompts,
        prebuilt_pools=dict(pools or {}),
        locate_task=lambda task_id: known[task_id] if task_id in known else _as_task(locate(task_id)),
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_saved=checkpoint_saved,
        fence=fence,
        embedding_cache=cache,
    )
    base_ctx = context_for(config, base, task_prompts=prompts, embedding_cache=cache)
    torch.manual_seed(config.evaluation.seed)
    state = parent if parent is not None else LearnerState(method=name, backbone=base.reference)
    previous = AccuracyMatrix.from_dict(state.history) if state.history else None
    old_ids = list(previous.tasks) if previous else []
    new_columns = [t for t in [task, *upcoming] if t.task_id not in old_ids]

    # Before learning: the base model on the new columns, the parent's transfer to a task not seen yet.
    t0 = time.perf_counter()
    fresh, empty = make_method(config, name), LearnerState(method=name, backbone=base.reference)
    initial = evaluate(fresh, empty, new_columns, base_ctx)
    initial_new = [round(initial[t.task_id], 6) for t in new_columns]
    transfer = None
    if parent is not None and previous is not None and previous.matrix and task.task_id not in old_ids:
        transfer = round(evaluate(method, state, [task], ctx)[task.task_id], 6)
    zs_initial = (previous.zero_shot or {}).get("initial") if previous and previous.zero_shot else None
    if zero_shot is not None and zs_initial is None:
        zs_initial = round(evaluate(fresh, empty, [zero_shot], base_ctx)[zero_shot.task_id], 6)
    evaluate_before_s = time.perf_counter() - t0

    if checkpoint_dir is not None and method.trains:  # a data-parallel training's checkpoint, for any N to resume
        from components.training.train_storage import adopt_latest, place_of

        adopt_latest(place_of(config, checkpoint_dir, task.task_id), Path(checkpoint_dir) / task.task_id)
    say(f"learning {task.task_id} ({len(task.train)} train images) with {method.name}")
    t0 = time.perf_counter()
    if method.trains and config.compute.train_workers > 1:
        state, report = _train_on_workers(config, name, task, parent, known, ctx, addresses)
        method = make_method(config, name)  # evaluated afresh, with no cache of the parent's weights
    else:
        state, report = run_task(method, state, task, ctx)
    learn_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluated = [*seen, task, *(upcoming if config.evaluation.future_tasks else [])]
    say(f"evaluating {len(evaluated)} task(s)")
    after = {k: round(v, 6) for k, v in evaluate(method, state, evaluated, ctx).items()}
    zs_after = round(evaluate(method, state, [zero_shot], ctx)[zero_shot.task_id], 6) if zero_shot is not None else None
    evaluate_s = time.perf_counter() - t0

    ids = old_ids + [t.task_id for t in new_columns]
    rows = [list(r) + [None] * len(new_columns) for r in previous.matrix] if previous else []
    if transfer is not None:
        rows[-1][ids.index(task.task_id)] = transfer
    initial = (list(previous.initial) if previous and previous.initial else [None] * len(old_ids)) + initial_new
    sizes = list(previous.test_sizes) if previous and previous.test_sizes else [len(known[i].test) for i in old_ids]
    zs_doc = None
    if zero_shot is not None:
        before = list((previous.zero_shot or {}).get("after", [])) if previous and previous.zero_shot else []
        zs_doc = {"name": zero_shot.task_id, "initial": zs_initial, "after": before + [zs_after]}
    matrix = AccuracyMatrix(
        tasks=ids,
        matrix=rows + [[after.get(i) for i in ids]],
        initial=initial,
        test_sizes=sizes + [len(t.test) for t in new_columns],
        zero_shot=zs_doc,
    )
    metrics = compute_all(matrix)
    state.history = matrix.to_dict()
    timings = StepTimings(
        evaluate_before_s=evaluate_before_s,
        learn_s=learn_s,
        evaluate_s=evaluate_s,
        total_s=time.perf_counter() - started,
        pool_img_per_s=report.pool_img_per_s,
        train_step_ms=report.train.train_step_ms if report.train else None,
    )
    if out_dir is not None:
        write_outputs(
            Path(out_dir),
            matrix,
            metrics,
            state,
            config,
            timings.to_dict(),
            report.train.to_dict() if report.train else None,
        )
    return StepResult(task.task_id, state, matrix, metrics, report, timings, Path(out_dir) if out_dir else None)


def _train_on_workers(config, name, task, parent, known, ctx, addresses):
    """The task trained by ``compute.train_workers`` data-parallel workers on Ray Train
    (components/training/ray_train.py), from the random state one process would start from; the learned weights
    then go into this process's model, which evaluates them."""
    from components.methods.base import MethodError
    from components.training.ray_train import make_job, train_on_workers
    from components.training.trainer import _check_split

    method = make_method(config, name)
    if not method.data_parallel:  # refused here, before Ray starts
        _check_split(method, task, 1, 1, config.compute.train_workers)
    job = make_job(config, name, task, parent, known, dict(ctx.task_prompts), addresses)
    state, report = train_on_workers(job, config, ctx.checkpoint_dir, ctx.say)
    if state.weights is not None:
        missing = ctx.backbone.model.load_state_dict(state.weights, strict=True)
        if missing.missing_keys or missing.unexpected_keys:
            raise MethodError(f"the workers' weights do not fit the model: {missing}")
    return state, report


def write_outputs(
    out: Path,
    matrix: AccuracyMatrix,
    metrics: dict[str, float | None],
    state: LearnerState,
    config: Config,
    timings: dict[str, float],
    training: dict[str, Any] | None,
) -> None:
    """eval/ (matrix, metrics and timings, plots, the training report), the resolved config and state/."""
    from components.support.storage import atomic_write_text
    from components.training import plots

    (out / "eval").mkdir(parents=True, exist_ok=True)
    matrix.save(out / "eval" / "accuracy_matrix.json")
    atomic_write_text(out / "eval" / "metrics.json", json.dumps({"metrics": metrics, "timings": timings}, indent=2))
    plots.heatmap(matrix, out / "eval" / "heatmap.png")
    plots.curves(matrix, out / "eval" / "curves.png")
    config.write_resolved(out)
    state.save(out / "state")
    if training:  # a step: its trainer's report; a sequence: one per task, by task id
        atomic_write_text(out / "eval" / "training.json", json.dumps(training, indent=2))
