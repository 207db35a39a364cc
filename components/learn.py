"""Run a continual-learning method over a sequence of task drops, with no platform at all.

    python -m components.learn --method lvp TASK_DIR [TASK_DIR ...] [--json] [--out DIR]

No Prefect, MLflow, DVC or S3: the library alone. Drops are validated first (the same checks as
ingestion, across the sequence), then learned in the order given; after every step all tasks are
evaluated, and the accuracy matrix, the continual-learning metrics, the plots, the resolved config and
the learner-state bundle are written to the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.config import Config, load_config
from components.methods.base import context_for  # noqa: F401  (callers import it from here too)


class LearnError(RuntimeError):
    pass


@dataclass
class LearnResult:
    matrix: Any  # metrics.AccuracyMatrix
    metrics: dict[str, float | None]
    out_dir: Path | None
    state: Any
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy_matrix": self.matrix.to_dict(), "metrics": self.metrics,
                "out_dir": str(self.out_dir) if self.out_dir else None, "timings": self.timings}


def make_method(config: Config, name: str | None = None):
    from pydantic import ValidationError

    from components.methods import get_method

    cls = get_method(name or config.method.name)
    try:
        return cls(config.method.settings)
    except ValidationError as exc:
        problems = "; ".join(f"method.settings.{'.'.join(map(str, e['loc']))}: "
                             f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in exc.errors())
        raise LearnError(f"method {cls.name}: {problems}") from None


def validate_sequence(locations: list[str], config: Config) -> None:
    """The ingestion checks on every drop, with earlier drops of the sequence as the 'earlier tasks'."""
    from components.tasks import DropError, normalise_class_name, open_drop, read_metadata
    from components.validation import TaskContext, content_digest, scan_images, validate

    known: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    for loc in locations:
        if (Path(loc) / "index.csv").is_file():
            continue  # a stored task was validated when it was ingested
        source = open_drop(loc)
        try:
            spec, manifest, spec_bytes, manifest_bytes = read_metadata(source)
        except DropError as exc:
            raise LearnError(f"{loc}: {exc}") from None
        facts = scan_images(source, manifest, config.validation)
        ctx = TaskContext(known_classes=dict(known.get(spec.dataset, {})), seen_images=dict(seen))
        report = validate(spec, manifest, facts, config.validation, ctx, source=loc, checked_at="",
                          digest=content_digest(spec_bytes, manifest_bytes, facts))
        if not report.success:
            raise LearnError(f"{loc} is not a valid task drop:\n{report.summary()}")
        for name in spec.class_names:
            known.setdefault(spec.dataset, {}).setdefault(normalise_class_name(name), spec.task_id)
        for f in facts:
            if f.sha256:
                seen.setdefault(f.sha256, spec.task_id)


def learn(locations: list[str], config: Config, method_name: str | None = None, out_dir: Path | None = None,
          backbone=None, validate_first: bool = True, progress=None) -> LearnResult:
    from components.data import load_task
    from components.evaluation import accuracy, evaluate_row
    from components.metrics import AccuracyMatrix, compute_all
    from components.models import load_backbone
    from components.state import LearnerState
    from components.trainer import learn_task

    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    method = make_method(config, method_name)
    if validate_first:
        validate_sequence(locations, config)
    timings["validate_s"] = time.perf_counter() - started
    if backbone is None:
        backbone = load_backbone(config.model)
    ctx = context_for(config, backbone)
    ctx.progress = progress
    torch.manual_seed(config.evaluation.seed)
    tasks = [load_task(loc) for loc in locations]
    by_id = {t.task_id: t for t in tasks}
    ctx.locate_task = lambda task_id: by_id[task_id]
    zero_shot = load_task(config.location(config.evaluation.zero_shot_set)) if config.evaluation.zero_shot_set else None
    for task in tasks + ([zero_shot] if zero_shot else []):
        if task.prompts:
            ctx.task_prompts.setdefault(task.dataset, task.prompts)
    state = LearnerState(method=method.name, backbone=backbone.reference)

    t0 = time.perf_counter()
    initial = evaluate_row(method, state, tasks, ctx, learned=0, future=True)
    zs_initial = accuracy(method, state, zero_shot, ctx) if zero_shot else None
    timings["evaluate_s"] = time.perf_counter() - t0
    rows, zs_after = [], []
    training: dict[str, dict] = {}  # the trainer's report per task: losses per step, step time
    timings["learn_s"] = 0.0
    for i, task in enumerate(tasks):
        say(f"[{i + 1}/{len(tasks)}] learning {task.task_id} ({len(task.train)} train images) with {method.name}")
        t0 = time.perf_counter()
        state, report = learn_task(method, state, task, ctx)
        if report is not None:
            training[task.task_id] = report
        timings["learn_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append(evaluate_row(method, state, tasks, ctx, learned=i + 1, future=config.evaluation.future_tasks))
        if zero_shot is not None:
            zs_after.append(round(accuracy(method, state, zero_shot, ctx), 6))
        timings["evaluate_s"] += time.perf_counter() - t0
    for key in ("pool_img_per_s",):
        if key in ctx.info and ctx.info[key] is not None:
            timings[key] = ctx.info[key]

    matrix = AccuracyMatrix(tasks=[t.task_id for t in tasks], matrix=rows, initial=initial,
                            test_sizes=[len(t.test) for t in tasks],
                            zero_shot={"name": zero_shot.task_id, "initial": zs_initial, "after": zs_after}
                            if zero_shot else None)
    metrics = compute_all(matrix)
    state.history = matrix.to_dict()
    timings["total_s"] = time.perf_counter() - started
    if out_dir is not None:
        write_outputs(Path(out_dir), matrix, metrics, state, config, timings)
        if training:
            from components.storage import atomic_write_text

            atomic_write_text(Path(out_dir) / "eval" / "training.json", json.dumps(training, indent=2))
    return LearnResult(matrix, metrics, Path(out_dir) if out_dir else None, state, timings)


def write_outputs(out: Path, matrix, metrics, state, config: Config, timings: dict[str, float]) -> None:
    from components import plots
    from components.storage import atomic_write_text

    (out / "eval").mkdir(parents=True, exist_ok=True)
    matrix.save(out / "eval" / "accuracy_matrix.json")
    atomic_write_text(out / "eval" / "metrics.json", json.dumps({"metrics": metrics, "timings": timings}, indent=2))
    plots.heatmap(matrix, out / "eval" / "heatmap.png")
    plots.curves(matrix, out / "eval" / "curves.png")
    config.write_resolved(out)
    state.save(out / "state")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.learn", description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="+", help="task drops or stored task folders, in learning order")
    parser.add_argument("--method", "-m", help="method name (default: method.name from the config)")
    parser.add_argument("--out", help="output folder (default: runs/learn-<time>)")
    parser.add_argument("--json", action="store_true", help="print matrix and metrics as JSON")
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    return run_cli(args)


def run_cli(args) -> int:
    from components.config import ConfigError
    from components.metrics import format_table
    from components.methods import MethodError

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("learn-%Y%m%d-%H%M%S")
    progress = None if args.json else (lambda m: print(m, file=sys.stderr))
    try:
        result = learn(args.tasks, config, args.method, out_dir=out, progress=progress)
    except (LearnError, MethodError, FileNotFoundError) as exc:
        print(f"cliploop learn: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result.matrix, result.metrics))
        print(f"\noutputs: {out} (eval/accuracy_matrix.json, eval/heatmap.png, eval/curves.png, state/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
