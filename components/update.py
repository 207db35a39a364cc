"""One continual step: from a parent learner state (the champion's) and one new task to a child state.

This is the nightly pipeline's ``train`` + ``evaluate`` steps as a plain function (the flows wrap it):

1. the parent is evaluated on the new task before learning it (that entry of the accuracy matrix is
   the transfer to a task not seen yet), and the base model (an empty state) gives its ``initial`` entry;
2. the configured method learns the task, starting from the parent's state;
3. every learned task's test split is evaluated (plus the held-out zero-shot set), a row is appended
   to the parent's accuracy matrix, and the metrics are recomputed from the whole matrix.

Nothing here imports Prefect, MLflow, DVC or boto3.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from components.config import Config


class UpdateError(RuntimeError):
    pass


@dataclass
class UpdateResult:
    state: Any  # components.state.LearnerState
    matrix: Any  # components.metrics.AccuracyMatrix
    metrics: dict[str, float | None]
    task_id: str
    timings: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None


def stored_task_locator(config: Config) -> Callable[[str], str]:
    """Learned tasks are found in the workspace, by id (the state names tasks, not machine paths)."""
    return lambda task_id: str(config.workspace_path / "data" / "tasks" / task_id)


def learn_next(task_location: str, config: Config, parent=None, locate: Callable[[str], str] | None = None,
               out_dir: Path | None = None, progress: Callable[[str], None] | None = None,
               pools: dict[str, str] | None = None, checkpoint_dir: Path | None = None) -> UpdateResult:
    """Learn one task on top of ``parent`` (a LearnerState, or None for the first task).

    ``pools``: task id -> folder of a label-vector pool built beforehand (the pipeline's build_pool step).
    ``checkpoint_dir``: where training checkpoints go (``method.settings.checkpoint_every``); a call that
    finds a matching checkpoint there resumes from it.
    """
    from components.data import load_task
    from components.evaluation import accuracy
    from components.learn import context_for, make_method, write_outputs
    from components.metrics import AccuracyMatrix, compute_all
    from components.models import load_backbone
    from components.state import LearnerState, check_backbone
    from components.trainer import learn_task

    say = progress or (lambda message: None)
    locate = locate or stored_task_locator(config)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if parent is not None and parent.method != config.method.name:
        raise UpdateError(f"the parent model was made by method {parent.method!r} but the configuration selects "
                          f"{config.method.name!r}; a chain keeps one method (start a new chain to switch)")
    method = make_method(config)
    base = load_backbone(config.model)
    if parent is not None:
        check_backbone(parent.backbone, base.reference, "the parent model")
    backbone = base if parent is None or parent.weights is None else load_backbone(config.model, weights=parent.weights)
    ctx = context_for(config, backbone)
    ctx.prebuilt_pools.update(pools or {})
    ctx.locate_task = lambda task_id: load_task(locate(task_id))
    ctx.progress = progress
    ctx.checkpoint_dir = checkpoint_dir
    base_ctx = context_for(config, base)
    torch.manual_seed(config.evaluation.seed)

    task = load_task(task_location)
    learned = parent.task_ids if parent is not None else []
    if task.task_id in learned:
        raise UpdateError(f"task {task.task_id} was already learned by the parent model")
    seen = [load_task(locate(t)) for t in learned]
    zero_shot = load_task(config.location(config.evaluation.zero_shot_set)) if config.evaluation.zero_shot_set else None
    for t in seen + [task] + ([zero_shot] if zero_shot else []):
        if t.prompts:
            ctx.task_prompts.setdefault(t.dataset, t.prompts)
            base_ctx.task_prompts.setdefault(t.dataset, t.prompts)
    state = parent if parent is not None else LearnerState(method=method.name, backbone=base.reference)
    previous = AccuracyMatrix.from_dict(state.history) if state.history else None

    # Before learning: the parent's transfer to the new task and the base model's accuracy on it.
    t0 = time.perf_counter()
    empty = LearnerState(method=method.name, backbone=base.reference)
    initial_new = round(accuracy(make_method(config), empty, task, base_ctx), 6)
    transfer = round(accuracy(method, state, task, ctx), 6) if parent is not None else None
    zs_initial = None
    if zero_shot is not None:
        zs_initial = (previous.zero_shot or {}).get("initial") if previous and previous.zero_shot else None
        if zs_initial is None:
            zs_initial = round(accuracy(make_method(config), empty, zero_shot, base_ctx), 6)
    timings["evaluate_before_s"] = time.perf_counter() - t0

    say(f"learning {task.task_id} ({len(task.train)} train images) with {method.name}")
    t0 = time.perf_counter()
    state, _ = learn_task(method, state, task, ctx)
    timings["learn_s"] = time.perf_counter() - t0
    for key in ("pool_img_per_s", "train_step_ms"):
        if ctx.info.get(key) is not None:
            timings[key] = ctx.info[key]

    t0 = time.perf_counter()
    say(f"evaluating {len(seen) + 1} task(s)")
    row = [round(accuracy(method, state, t, ctx), 6) for t in seen + [task]]
    zs_after = round(accuracy(method, state, zero_shot, ctx), 6) if zero_shot is not None else None
    timings["evaluate_s"] = time.perf_counter() - t0

    tasks = [t.task_id for t in seen] + [task.task_id]
    old_rows = [list(r) + [None] for r in previous.matrix] if previous else []
    if old_rows:
        old_rows[-1][-1] = transfer
    initial = (list(previous.initial) if previous and previous.initial else [None] * len(seen)) + [initial_new]
    sizes = (list(previous.test_sizes) if previous and previous.test_sizes else [len(t.test) for t in seen])
    zs_doc = None
    if zero_shot is not None:
        after = list((previous.zero_shot or {}).get("after", [])) if previous and previous.zero_shot else []
        zs_doc = {"name": zero_shot.task_id, "initial": zs_initial, "after": after + [zs_after]}
    matrix = AccuracyMatrix(tasks=tasks, matrix=old_rows + [row], initial=initial,
                            test_sizes=sizes + [len(task.test)], zero_shot=zs_doc)
    metrics = compute_all(matrix)
    state.history = matrix.to_dict()
    timings["total_s"] = time.perf_counter() - started
    if out_dir is not None:
        write_outputs(Path(out_dir), matrix, metrics, state, config, timings)
        if ctx.info.get("train"):  # the trainer's report: per-step losses and lr, step time, memory
            from components.storage import atomic_write_text

            atomic_write_text(Path(out_dir) / "eval" / "training.json", json.dumps(ctx.info["train"], indent=2))
    return UpdateResult(state, matrix, metrics, task.task_id, timings, Path(out_dir) if out_dir else None)


def main(argv: list[str] | None = None) -> int:
    """``python -m components.update TASK --out DIR [--parent STATE_DIR]``: one continual step."""
    import argparse
    import json
    import sys

    from components.config import load_config
    from components.metrics import format_table
    from components.state import LearnerState

    parser = argparse.ArgumentParser(prog="python -m components.update", description=main.__doc__)
    parser.add_argument("task", help="a stored task folder or a task drop")
    parser.add_argument("--out", required=True, help="output folder (eval/, state/, config.resolved.yaml)")
    parser.add_argument("--parent", help="the parent's learner-state folder (omit for the first task)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    parent = LearnerState.load(Path(args.parent)) if args.parent else None
    try:
        result = learn_next(args.task, config, parent, out_dir=Path(args.out),
                            progress=None if args.json else (lambda m: print(m, file=sys.stderr)))
    except UpdateError as exc:
        print(f"python -m components.update: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"task_id": result.task_id, "accuracy_matrix": result.matrix.to_dict(),
                          "metrics": result.metrics, "timings": result.timings}, indent=2))
    else:
        print(format_table(result.matrix, result.metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
