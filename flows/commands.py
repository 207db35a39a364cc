"""What each ``cliploop`` subcommand does with its parsed arguments: resolve the config, call
``components`` (or ``flows``), print through :mod:`flows.console`, return an exit code.

Exit codes: 0 success; 1 a task was quarantined / validation failed / verification failed;
2 usage or configuration error; 3 refused (a changed payload under a known task id);
4 an external tool failed (git, DVC, storage, the registry): safe to re-run.
Errors that every command can meet (a bad config, an unknown version) are mapped in :mod:`flows.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_REFUSED, EXIT_EXTERNAL = 0, 1, 2, 3, 4


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None, writes: bool = False):
    """The command's configuration: file, environment, ``--set`` and ``-w``, with its method checked.

    ``writes``: the command writes into the workspace, so it must exist already or have been named
    (:func:`components.intake.workspace.require_workspace`): no folder becomes a workspace behind the user's back."""
    from components.settings.config_loading import ENV_PREFIX, find_config_file, load_config

    overrides = list(getattr(args, "overrides", []) or []) + list(extra or [])
    home = None
    if getattr(args, "workspace", None):
        home = Path(args.workspace).resolve()
        overrides.append(f"workspace={home}")
    # With -w, the workspace's own cliploop.yaml (or none) is read, not one that happens to be in the current
    # folder: that one belongs to another workspace (its remote, its drop zone) unless -c names it.
    config = load_config(getattr(args, "config", None), overrides, cwd=home)
    check_method(config)
    if writes:
        from components.intake.workspace import require_workspace

        named = (
            find_config_file(getattr(args, "config", None), cwd=home) is not None
            or any(o.partition("=")[0].strip() == "workspace" for o in overrides)
            or f"{ENV_PREFIX}WORKSPACE" in os.environ
        )
        require_workspace(config, named)
    return config


def resolve_existing(args: argparse.Namespace):
    """The configuration of a command that only reads a workspace: it must exist already, so a mistyped ``-w``
    creates nothing (no folder, no registry database)."""
    from components.intake.workspace import is_initialised, require_workspace

    config = resolve_config(args)
    ws = config.workspace_path
    # One with a registry database of its own but no git + DVC set-up counts.
    if not ws.is_dir() or not (is_initialised(config) or (ws / ".cliploop").is_dir() or config.mlflow.tracking_uri):
        require_workspace(config, named=False)
    return config


def check_method(config) -> None:
    """An unknown method, settings its method does not accept, or settings that cannot run as configured (a
    schedule its step counts cannot follow) are a configuration error found when the config is resolved, not
    when a night reaches training. Raises ConfigError."""
    from pydantic import ValidationError

    from components.settings.config import ConfigError, MethodConfig

    if config.method == MethodConfig():
        return  # the default method with its defaults is valid, and needs no import of the methods (torch)
    from components.methods import MethodError, get_method

    try:
        cls = get_method(config.method.name)
    except MethodError as exc:
        raise ConfigError(f"method.name: {exc} (see `cliploop methods`)") from None
    try:
        settings = cls.Settings.model_validate(config.method.settings)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(
                f"method.settings.{'.'.join(map(str, e['loc']))}: "
                f"{'not a setting of ' + cls.name if e['type'] == 'extra_forbidden' else e['msg']} "
                f"(see `cliploop methods {cls.name}`)"
                for e in exc.errors()
            )
        ) from None
    see = f"(see `cliploop methods {cls.name}`)"
    problems = [f"method.settings.{where}: {problem} {see}" for where, problem in cls.config_problems(settings)]
    if problems:
        raise ConfigError("\n".join(problems))


def fail(command: str, message: object, code: int) -> int:
    from components.settings.credentials import redact  # a tool's message may quote a URI with its password

    print(f"cliploop {command}: {redact(str(message))}", file=sys.stderr)
    return code


def external_error(exc: Exception) -> int:
    from components.settings.credentials import redact

    print(
        f"cliploop: {redact(str(exc))}\n(nothing was lost; fix the cause and re-run the same command)", file=sys.stderr
    )
    return EXIT_EXTERNAL


def cmd_init(args: argparse.Namespace) -> int:
    from components.intake import workspace
    from components.scenarios import demo
    from components.settings.config_loading import CONFIG_FILENAME, load_config

    ws = Path(args.dir).resolve()
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail("init", f"cannot make the workspace folder {ws}: {exc.strerror or exc}", EXIT_USAGE)
    cfg_path = ws / CONFIG_FILENAME
    if not cfg_path.exists():
        settings = {k: v for k, v in (("drop_zone", args.drop_zone), ("dvc.remote", args.remote)) if v}
        if args.model == "demo":
            print("model: the demo's base model (tiny image tower + pretrained MiniLM text tower; no network)")
            settings |= demo.demo_model_settings(ws)
        cfg_path.write_text(workspace.config_text(settings))
        print(f"wrote {cfg_path}")
    else:
        note = "" if args.model == "default" else f" (its model is unchanged: --model {args.model} is for a new one)"
        print(f"kept the existing {cfg_path}{note}")
    config = load_config(cfg_path)
    if not config.drop_zone.startswith("s3://"):
        config.path(config.drop_zone).mkdir(parents=True, exist_ok=True)
    try:
        done = workspace.ensure_workspace(config)
        if cfg_path.parent == config.workspace_path:  # the config is part of the workspace's history
            from components.intake.versioning import commit

            commit(config.workspace_path, "cliploop: configuration", [cfg_path.name])
    except Exception as exc:
        return external_error(exc)
    for line in done or ["workspace already initialised"]:
        print(f"  {line}")
    print(
        f"workspace ready: {config.workspace_path}\n  drop tasks into: {config.location(config.drop_zone)}\n"
        f"  then run: cliploop ingest"
    )
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.intake import ingestion, tasks
    from components.intake.versioning import VersioningError
    from components.pipeline.label_scoring import champion_scorer
    from components.support.storage import StorageError
    from flows.console import ingest_line

    config = resolve_config(args, writes=True)
    location = config.location(args.location) if args.location else config.location(config.drop_zone)
    try:
        locations = ingestion.drop_locations(location, config, warn=lambda m: print(f"cliploop: {m}", file=sys.stderr))
    except tasks.DropError as exc:
        return fail("ingest", exc, EXIT_USAGE)
    if not locations:
        print(f"no task drops found in {location}")
        return EXIT_OK
    worst = EXIT_OK
    outcomes = []
    for loc in locations:
        try:
            outcome = ingestion.ingest(loc, config, scorer=champion_scorer(config))
        except ingestion.IngestRefused as exc:
            print(f"REFUSED {loc}: {exc}", file=sys.stderr)
            worst = max(worst, EXIT_REFUSED)
            outcomes.append({"location": loc, "status": "refused", "message": str(exc)})
            continue
        except (VersioningError, StorageError, OSError) as exc:
            worst = max(worst, external_error(exc))
            outcomes.append({"location": loc, "status": "error", "message": str(exc)})
            continue
        outcomes.append(
            {
                "location": loc,
                "task_id": outcome.task_id,
                "status": outcome.status,
                "state": outcome.state,
                "report": outcome.report_path,
                "message": outcome.message,
            }
        )
        if not args.json:
            print(ingest_line(outcome))
        if outcome.status == "quarantined":
            worst = max(worst, EXIT_INVALID)
    if args.json:
        print(json.dumps(outcomes, indent=2))
    return worst


def cmd_validate(args: argparse.Namespace) -> int:
    from components.intake import drop_check, workspace
    from components.support import storage

    config = resolve_config(args)
    report_dir = Path(args.report_dir).resolve() if args.report_dir else None
    target = args.target
    by_location = storage.is_s3(target) or Path(target).exists()
    if not by_location and not workspace.workspace_paths(config)["ledger"].exists():  # opening it would make one
        return fail("validate", f"no task {target!r}: {config.workspace_path} has no task ledger", EXIT_USAGE)
    try:
        if by_location:
            report = drop_check.validate_location(target, config, report_dir)
        else:
            report = drop_check.validate_task(target, config, report_dir)
    except FileNotFoundError as exc:
        return fail("validate", exc, EXIT_USAGE)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    if report_dir and not args.json:
        print(f"report: {report_dir / 'report.html'} (opens offline; report.json beside it)")
    return EXIT_OK if report.success else EXIT_INVALID


def cmd_status(args: argparse.Namespace) -> int:
    from components.intake import workspace
    from flows.console import status_text
    from flows.deploy import drift, drift_text

    config = resolve_config(args)
    rows = workspace.status(config)
    differences = drift(config)  # None: never deployed; [] deployed as it is now
    if args.json:
        doc = {"workspace": str(config.workspace_path), "tasks": rows, "deployed_config_differs": differences}
        print(json.dumps(doc, indent=2, default=str))
    elif not rows and not workspace.is_initialised(config):
        print(f"no tasks in {config.workspace_path}: it is not a cliploop workspace yet (`cliploop init` makes one)")
    elif not rows:
        print(f"no tasks in {config.workspace_path} yet (cliploop ingest PATH)")
    else:
        print(status_text(rows, config.workspace_path))
    if differences and not args.json:
        print(drift_text(config, differences))
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    print(resolve_config(args).to_yaml(), end="")
    return EXIT_OK


def cmd_nightly(args: argparse.Namespace) -> int:
    from flows.embedded_prefect import start_early

    start_early()  # Prefect's server boots while the rest is imported (flows/embedded_prefect.py)
    from components.pipeline import chain, chain_method
    from flows.console import night_text
    from flows.nightly import NightFailed, run_night

    config = resolve_config(args, writes=True)
    try:
        chain_method.check(config)  # at once, before Prefect starts (the night checks again, for deployed runs)
    except chain_method.MethodSwitch as exc:
        return fail("nightly", exc, EXIT_USAGE)
    try:
        summary = run_night(config)
    except chain.ChainBusy as exc:
        print(f"cliploop nightly: {exc}", file=sys.stderr)
        return EXIT_OK
    except NightFailed as exc:
        summary, code = exc.summary, EXIT_EXTERNAL
    else:
        code = EXIT_OK
    print(json.dumps(summary, indent=2, default=str) if args.json else night_text(summary, config))
    return code


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.console import deploy_text
    from flows.deploy import DEPLOYED_NOTE, DeployError, deploy

    config = resolve_config(args, writes=True)
    try:
        values = deploy(config, args.api_url)
    except DeployError as exc:
        return fail("deploy", exc, EXIT_EXTERNAL)
    print(deploy_text(values, config.orchestration.gpu_pool))
    print(DEPLOYED_NOTE)
    return EXIT_OK


def cmd_stack(args: argparse.Namespace) -> int:
    from flows.console import stack_status_text, stack_up_text
    from infra.stack import Stack, StackError

    config = resolve_config(args)
    stack = Stack(config.workspace_path / ".cliploop" / "stack")
    try:
        if args.action == "up":
            names = ("s3", "mlflow", "prefect", "postgres")
            ports = {n: getattr(args, f"port_{n}") for n in names if getattr(args, f"port_{n}")}
            state = stack.up(ports, progress=(lambda m: None) if args.json else print, auth=args.auth, db=args.db)
            print(json.dumps(state, indent=2) if args.json else stack_up_text(state))
            return EXIT_OK
        if args.action == "down":
            stack.down()
            return EXIT_OK
    except StackError as exc:
        return fail("stack", exc, EXIT_EXTERNAL)
    rows = stack.status()
    print(json.dumps(rows, indent=2) if args.json else stack_status_text(rows))
    return EXIT_OK if all(r["state"] == "healthy" for r in rows) else EXIT_INVALID


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.embedded_prefect import start_early

    start_early()  # Prefect's server boots while the demo builds its data (flows/embedded_prefect.py)
    from components.methods import MethodError, get_method
    from flows.demo import run_demo
    from flows.demo_report import demo_text

    try:
        get_method(args.method)
    except MethodError as exc:
        return fail("demo", exc, EXIT_USAGE)
    run = run_demo(
        args.method, args.dir, not args.no_bad_task, args.overrides, check=check_method, compare=not args.no_baseline
    )
    print(demo_text(run))
    return EXIT_INVALID if run.chain_stopped else EXIT_OK
