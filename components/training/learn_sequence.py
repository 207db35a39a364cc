"""A sequence of continual steps, the library behind ``cliploop learn``: the drops validated against each
other first, then one ``learn_step`` (``components/training/learn.py``) per task in the order given, and the
sequence's outputs and command line.

    python -m components.training.learn_sequence [--method M] [--parent STATE_DIR] TASK [TASK ...] [--json] [--out DIR]

Kept apart from the step because it changes with the command's needs (validation of a whole sequence,
totals over its steps, the printed table), while the step is shared with the pipeline. Nothing here imports
Prefect, MLflow, DVC or boto3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.model.data import TaskData, load_task
from components.settings.config import Config
from components.settings.config_loading import load_config
from components.training.learn import (
    LearnError,
    StepResult,
    learn_step,
    make_method,
    stored_task_locator,
    write_outputs,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from components.model.state import LearnerState
    from components.training.metrics import AccuracyMatrix


@dataclass(frozen=True)
class SequenceTimings:
    validate_s: float
    evaluate_s: float
    learn_s: float
    total_s: float
    pool_img_per_s: float | None = None  # the last pool built

    def to_dict(self) -> dict[str, float]:
        doc = {"validate_s": self.validate_s, "evaluate_s": self.evaluate_s, "learn_s": self.learn_s}
        if self.pool_img_per_s is not None:
            doc["pool_img_per_s"] = self.pool_img_per_s
        return doc | {"total_s": self.total_s}


@dataclass(frozen=True)
class LearnResult:
    matrix: AccuracyMatrix
    metrics: dict[str, float | None]
    out_dir: Path | None
    state: LearnerState
    timings: SequenceTimings
    steps: list[StepResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy_matrix": self.matrix.to_dict(),
            "metrics": self.metrics,
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "timings": self.timings.to_dict(),
        }


def validate_sequence(locations: list[str], config: Config) -> None:
    """The ingestion checks on every drop, with earlier drops of the sequence as the 'earlier tasks'."""
    from components.intake.tasks import DropError, normalise_class_name, open_drop, read_metadata
    from components.intake.validation import TaskContext, content_digest, scan_images, validate

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
        report = validate(
            spec,
            manifest,
            facts,
            config.validation,
            ctx,
            source=loc,
            checked_at="",
            digest=content_digest(spec_bytes, manifest_bytes, facts),
        )
        if not report.success:
            raise LearnError(f"{loc} is not a valid task drop:\n{report.summary()}")
        for name in spec.class_names:
            known.setdefault(spec.dataset, {}).setdefault(normalise_class_name(name), spec.task_id)
        for f in facts:
            if f.sha256:
                seen.setdefault(f.sha256, spec.task_id)


def learn(
    locations: list[str],
    config: Config,
    method_name: str | None = None,
    out_dir: Path | None = None,
    validate_first: bool = True,
    progress: Callable[[str], None] | None = None,
    parent: LearnerState | None = None,
) -> LearnResult:
    """Learn task drops or stored tasks in the order given, one ``learn_step`` each (on top of ``parent``)."""
    from components.model.backbones import load_backbone
    from components.model.embedding_cache import for_config

    started = time.perf_counter()
    if not locations:
        raise LearnError("no task to learn")
    name = method_name or config.method.name
    make_method(config, name)  # settings errors before anything slow
    if validate_first:
        validate_sequence(locations, config)
    validate_s = time.perf_counter() - started
    base = load_backbone(config.model, frozen=True)  # learns only as itself when the method trains nothing
    tasks = [load_task(loc) for loc in locations]
    by_id = {t.task_id: t for t in tasks}
    stored = stored_task_locator(config)

    def locate(task_id: str) -> str | TaskData:
        return by_id[task_id] if task_id in by_id else stored(task_id)  # the parent's tasks are stored ones

    steps: list[StepResult] = []
    state = parent
    embeddings = for_config(config)  # one for the sequence: kept in memory across its steps too
    for i, task in enumerate(tasks):
        step = learn_step(
            task,
            config,
            state,
            locate=locate,
            upcoming=tasks[i + 1 :],
            base=base,
            method_name=name,
            progress=progress,
            embeddings=embeddings,
        )
        steps.append(step)
        state = step.state
    last = steps[-1]
    rates = [s.timings.pool_img_per_s for s in steps if s.timings.pool_img_per_s is not None]
    timings = SequenceTimings(
        validate_s=validate_s,
        evaluate_s=sum(s.timings.evaluate_before_s + s.timings.evaluate_s for s in steps),
        learn_s=sum(s.timings.learn_s for s in steps),
        total_s=time.perf_counter() - started,
        pool_img_per_s=rates[-1] if rates else None,
    )
    if out_dir is not None:
        training = {s.task_id: s.report.train.to_dict() for s in steps if s.report.train is not None}
        write_outputs(Path(out_dir), last.matrix, last.metrics, last.state, config, timings.to_dict(), training or None)
    return LearnResult(last.matrix, last.metrics, Path(out_dir) if out_dir else None, last.state, timings, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.training.learn_sequence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("tasks", nargs="+", help="task drops or stored task folders, in learning order")
    parser.add_argument("--method", "-m", help="method name (default: method.name from the config)")
    parser.add_argument("--parent", help="a learner-state folder to continue from (default: the base model)")
    parser.add_argument("--out", help="output folder (default: runs/learn-<time>)")
    parser.add_argument("--json", action="store_true", help="print matrix and metrics as JSON")
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    return run_cli(args)


def run_cli(args: argparse.Namespace) -> int:
    """``cliploop learn`` (flows.cli parses its own arguments into the same names)."""
    from components.methods import MethodError
    from components.model.state import LearnerState, StateError
    from components.settings.config import ConfigError
    from components.training.metrics import format_table
    from components.training.ray_train import TrainWorkersError
    from components.training.trainer import TrainError

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("learn-%Y%m%d-%H%M%S")
    progress = None if args.json else (lambda m: print(m, file=sys.stderr))
    try:
        parent = LearnerState.load(Path(args.parent)) if getattr(args, "parent", None) else None
        result = learn(args.tasks, config, args.method, out_dir=out, progress=progress, parent=parent)
    except (LearnError, MethodError, StateError, TrainError, TrainWorkersError, FileNotFoundError) as exc:
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
