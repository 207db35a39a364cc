"""``cliploop demo``: the embedded demo's policy and its run (the nightly flow on the embedded default).

The data and the base model come from :mod:`components.scenarios.demo`; this module decides how the demo's night
is configured (promotion by rule, gate rules, a short schedule) and runs it. What it prints at the end
is :func:`flows.demo_report.demo_text`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The demo's promotion policy: gate rules a reviewer would set, and promotion by rule so the demo needs no one.
DEMO_POLICY = ["approval.auto_promote=true", "gate.max_forgetting=10", "gate.min_new_task_accuracy=25"]
# The official schedules (1000 iterations a task) take minutes per task on a CPU; the demo's tasks have
# 150-300 training images, which 60 iterations pass over many times. Every method that trains gets the same
# run, so that their demos compare: 60 iterations of batch 64, each step-counted setting (warmup, ZSCL's
# ensemble interval) a tenth of the run as in the official ViT-B/16 schedule (100 of 1000), and the AdamW
# methods one peak lr (1e-4, the matched setting of issue 16's side-by-side comparison, for a run 16 times
# shorter than the official one; SG keeps its official SGD step size, which is not on AdamW's scale). Each
# method keeps its own lr shape and losses.
DEMO_ITERATIONS = 60
DEMO_BATCH_SIZE = 64
DEMO_ADAMW_LR = 1e-4


def demo_schedule(method: str, user_overrides: list[str]) -> list[str]:
    """The demo's schedule for a method that trains, unless the user chose one (``--set
    method.settings.iterations=...`` or ``epochs``); the user's other ``--set`` still win, as they come later."""
    from components.methods import get_method

    cls = get_method(method)
    chosen = any(
        o.split("=", 1)[0].strip() in ("method.settings.iterations", "method.settings.epochs") for o in user_overrides
    )
    if not cls.trains or chosen:
        return []
    settings = cls.Settings()
    out = [f"method.settings.iterations={DEMO_ITERATIONS}", f"method.settings.batch_size={DEMO_BATCH_SIZE}"]
    out += [f"method.settings.{name}={DEMO_ITERATIONS // 10}" for name in getattr(settings, "step_intervals", {})]
    if settings.optimizer == "adamw":
        out.append(f"method.settings.lr={DEMO_ADAMW_LR}")
    return out


# A method's demo also learns the same tasks with plain fine-tuning, so that what the method changes shows
# (REPRODUCIBILITY.md, "Small scale: the glyph proving ground (offline, 2 CPU cores)": every anti-forgetting method
# is measured against it).
BASELINE = "finetune"


def baseline_overrides(user_overrides: list[str]) -> list[str]:
    """The baseline's method config: its demo schedule, and the user's schedule settings that it also has."""
    from components.methods import get_method

    fields = get_method(BASELINE).Settings.model_fields
    own = [
        o
        for o in user_overrides
        if o.startswith("method.settings.") and o.split("=", 1)[0].strip()[len("method.settings.") :] in fields
    ]
    return [f"method.name={BASELINE}", *demo_schedule(BASELINE, own), *own]


def learn_baseline(config, task_ids: list[str]) -> dict[str, Any]:
    """Plain fine-tuning (``config``: the baseline's) over the stored tasks the night learned, outside the
    pipeline: nothing is ingested, registered or promoted."""
    from components.training.learn import stored_task_locator
    from components.training.learn_sequence import learn

    started = time.perf_counter()
    stored = stored_task_locator(config)
    result = learn([stored(t) for t in task_ids], config, validate_first=False)
    return {
        "method": config.method.name,
        "tasks": task_ids,
        "forgetting": result.metrics.get("cl.forgetting"),
        "last": result.metrics.get("cl.last"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def demo_root(folder: str, method: str) -> Path:
    """A chain keeps one method: another method's demo gets its own folder."""
    return Path(folder if method == "lvp" else f"{folder}-{method}").resolve()


@dataclass
class DemoRun:
    summary: dict[str, Any]  # the night's summary (flows.nightly.run_night)
    config: Any  # the resolved components.settings.config.Config of the demo's workspace
    ledger: list[dict]  # the task ledger's rows after the night
    registry: str  # the registry view, rendered ("" when empty)
    night_s: float
    elapsed_s: float
    baseline: dict[str, Any] | None = None  # plain fine-tuning of the same tasks (learn_baseline), for a method's demo

    @property
    def chain_stopped(self) -> bool:
        """The chain stopped before learning every task (a waiting reviewer does not count)."""
        return bool(self.summary.get("stopped")) and "awaiting" not in self.summary["stopped"]


def run_demo(
    method: str,
    folder: str,
    include_bad: bool,
    overrides: list[str],
    say: Callable[[str], None] = print,
    check: Callable[[Any], None] | None = None,
    compare: bool = True,
) -> DemoRun:
    """Build the drop zone and the base model (cached), then run one night on them. ``check`` vets the
    resolved config (the user's ``--set`` included) before the workspace is made. With ``compare``, a method
    that trains (other than the baseline itself) is set beside plain fine-tuning of the tasks the night learned."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo prints its own summary
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network calls from the temporary server
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the champion's download is instant here
    quiet_library_logs()
    from components.intake import workspace
    from components.methods import get_method
    from components.scenarios import demo
    from components.settings.config_loading import load_config
    from components.support.storage import cache_dir
    from flows.console import registry_text
    from flows.nightly import NightFailed, run_night

    root = demo_root(folder, method)
    schedule = demo_schedule(method, overrides)
    if check is not None:  # the method's settings (a schedule it cannot follow, say) before anything is built
        check(load_config(overrides=[f"method.name={method}", *schedule, *overrides], env={}, cwd=root))
    started = time.perf_counter()
    drop_zone = root / "incoming"
    demo.build_drop_zone(drop_zone, include_bad=include_bad)
    say(f"demo drop zone: {drop_zone} (three digit tasks and one broken one)")
    say("base model: tiny image tower + pretrained MiniLM text tower (built once, then cached)")
    model = demo.model_overrides(cache_dir() / "demo", progress=say)
    if schedule:
        default = get_method(method).Settings()
        length = f"{default.iterations} iterations" if default.iterations else f"{default.epochs} epochs"
        say(
            f"demo schedule, the same for every method that trains: {', '.join(s.split('.', 2)[2] for s in schedule)} "
            f"(official for {method}: {length}; --set method.settings.iterations=N for your own, with its warmup)"
        )
    # The nightly flow on the embedded default: Prefect without a server, MLflow on SQLite, DVC local remote.
    common = [f"workspace={root / 'workspace'}", f"drop_zone={drop_zone}", *model, *DEMO_POLICY]
    config = load_config(overrides=[*common, f"method.name={method}", *schedule, *overrides], env={}, cwd=root)
    if check is not None:
        check(config)
    workspace.ensure_workspace(config)
    say(
        "\nnightly flow: reconcile -> ingest + validate -> build pools -> per task: train/evaluate -> register "
        "-> gate -> promote\n(the demo promotes by rule, approval.auto_promote=true; a reviewer uses "
        "`cliploop approve`)\n"
    )
    night_started = time.perf_counter()
    try:
        summary = run_night(config)
    except NightFailed as exc:
        summary = exc.summary
    night = time.perf_counter() - night_started
    ledger = workspace.status(config)
    registry = registry_text(config)
    baseline = None
    learned = [u["task_id"] for u in summary["updates"] if u.get("metrics")]
    if compare and learned and method != BASELINE and get_method(method).trains:
        say(f"\nlearning the same {len(learned)} task(s) with plain fine-tuning, for comparison (nothing registered)")
        others = [o for o in overrides if not o.startswith("method.")]
        baseline_config = load_config(overrides=[*common, *baseline_overrides(overrides), *others], env={}, cwd=root)
        baseline = learn_baseline(baseline_config, learned)
    return DemoRun(summary, config, ledger, registry, night, time.perf_counter() - started, baseline)


def quiet_library_logs() -> None:
    """The demo prints its own summary: INFO lines of GX (whose modules set INFO on their own loggers at
    import) and of MLflow's database setup would only bury it."""
    import logging

    import great_expectations  # noqa: F401  (its import sets those levels; override them after it)
    import mlflow  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("great_expectations", "mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
