"""The ``cliploop`` command. Thin: parses arguments, resolves the config once, calls ``components``.

Exit codes: 0 success; 1 a task was quarantined / validation failed / verification failed;
2 usage or configuration error; 3 refused (a changed payload under a known task id);
4 an external tool failed (git, DVC, storage): safe to re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_REFUSED, EXIT_EXTERNAL = 0, 1, 2, 3, 4


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="config file (default: $CLIPLOOP_CONFIG or ./cliploop.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set validation.max_pixels=1000000 (repeatable)")
    p.add_argument("--workspace", "-w", metavar="DIR", help="shortcut for --set workspace=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliploop", description=(
        "Continual learning for CLIP models: ingest and validate task drops, learn them without forgetting, "
        "and promote reviewed, traceable model versions."))
    parser.add_argument("--version", action="version", version=f"cliploop {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="write a commented cliploop.yaml and prepare a workspace (git + DVC)")
    p.add_argument("dir", nargs="?", default=".", help="workspace folder (default: .)")
    p.add_argument("--remote", help="DVC remote: a folder or s3://bucket/prefix (default: local .cliploop/dvc-remote)")
    p.add_argument("--drop-zone", help="drop zone folder or s3:// prefix (default: incoming/)")

    p = sub.add_parser("ingest", help="ingest a task drop (folder or s3:// prefix), or every new task of a drop zone")
    p.add_argument("location", nargs="?", help="task folder, s3://bucket/prefix/, or a drop zone (default: drop_zone)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _add_config_args(p)

    p = sub.add_parser("validate", help="validate a task by id (re-check) or a drop by location (dry run)")
    p.add_argument("target", help="task id, task folder or s3:// prefix")
    p.add_argument("--report-dir", help="write report.json, data docs and the resolved config here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_args(p)

    p = sub.add_parser("status", help="every task with its state and report")
    p.add_argument("--json", action="store_true")
    _add_config_args(p)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)

    p = sub.add_parser("metrics", help="recompute every continual-learning metric from an accuracy-matrix file")
    p.add_argument("matrix", help="accuracy_matrix.json (rows: after step i; columns: task j; null = not evaluated)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("learn", help="run a method over task drops in the given order (no Prefect/MLflow/DVC/S3)")
    p.add_argument("tasks", nargs="+", help="task drops or stored task folders, in learning order")
    p.add_argument("--method", "-m", help="method name (default: method.name from the config; see `cliploop methods`)")
    p.add_argument("--out", help="output folder (default: runs/learn-<time>)")
    p.add_argument("--json", action="store_true", help="print the accuracy matrix and metrics as JSON")
    _add_config_args(p)

    p = sub.add_parser("methods", help="the registered continual-learning methods, one line each; with a name, its settings")
    p.add_argument("name", nargs="?", help="show this method's settings, defaults and what they mean")
    p.add_argument("--json", action="store_true", help="the settings' defaults as JSON (for method.settings)")

    p = sub.add_parser("lineage", help="a model version's chain back to its data, checks, code and config")
    p.add_argument("ref", help="a version number, champion, challenger or previous-champion")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-hash every task's DVC-tracked data; exit 1 on a mismatch")
    _add_config_args(p)

    p = sub.add_parser("scenario", help="benchmark scenarios: list | show NAME | convert NAME --root R --out O",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("nightly", help="run one night now: reconcile, ingest the drop zone, learn new tasks, gate, review")
    p.add_argument("--json", action="store_true")
    _add_config_args(p)

    p = sub.add_parser("approve", help="promote a version to champion (resumes its paused flow run, if any)")
    p.add_argument("version", help="a version number or challenger")
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    p.add_argument("--note", default="")
    p.add_argument("--override-gate", action="store_true", help="approve a version that failed the gate")
    _add_config_args(p)

    p = sub.add_parser("reject", help="reject a challenger version (resumes its paused flow run, if any)")
    p.add_argument("version", help="a version number or challenger")
    p.add_argument("--reason", required=True)
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    _add_config_args(p)

    p = sub.add_parser("rollback", help="make previous-champion the champion again")
    p.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    p.add_argument("--note", default="")
    _add_config_args(p)

    p = sub.add_parser("requeue", help="learn a rejected task again next night")
    p.add_argument("task_id")
    _add_config_args(p)

    p = sub.add_parser("deploy", help="register the nightly and GPU deployments (infra/prefect.yaml) on a Prefect server")
    p.add_argument("--api-url", help="Prefect API URL (default: $PREFECT_API_URL)")
    _add_config_args(p)

    p = sub.add_parser("stack", help="a local Prefect server, MLflow server and S3-compatible store on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--json", action="store_true")
    for name, port in (("s3", 9000), ("mlflow", 5000), ("prefect", 4200)):
        p.add_argument(f"--port-{name}", type=int, default=None, help=f"port of the {name} service (default {port})")
    _add_config_args(p)

    p = sub.add_parser("demo", help="run cliploop end to end on the embedded demo (no servers needed)")
    p.add_argument("--dir", default=".cliploop/demo", help="where the demo's drop zone and workspace go")
    p.add_argument("--no-bad-task", action="store_true", help="leave out the deliberately broken task")
    p.add_argument("--method", "-m", default="lvp", help="the method to learn the tasks with (see `cliploop methods`); "
                   "other than lvp, the demo goes to <dir>-<method>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. method.settings.iterations=50")
    p.add_argument("--json", action="store_true")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cliploop")
    except Exception:
        return "unknown"


def _config(args: argparse.Namespace, base: dict | None = None):
    from components.config import load_config

    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "workspace", None):
        overrides.append(f"workspace={Path(args.workspace).resolve()}")
    return load_config(getattr(args, "config", None), overrides, base=base)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from components.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"cliploop: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cliploop: interrupted; re-running the same command is safe", file=sys.stderr)
        return 130


def cmd_init(args: argparse.Namespace) -> int:
    from components import ingestion
    from components.config import CONFIG_FILENAME, default_config_yaml, load_config

    ws = Path(args.dir).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    cfg_path = ws / CONFIG_FILENAME
    if not cfg_path.exists():
        text = default_config_yaml()
        if args.drop_zone:
            text = text.replace("drop_zone: incoming", f"drop_zone: {json.dumps(args.drop_zone)}")
        if args.remote:
            text = text.replace("  remote: null", f"  remote: {json.dumps(args.remote)}", 1)
        cfg_path.write_text(text)
        print(f"wrote {cfg_path}")
    else:
        print(f"kept the existing {cfg_path}")
    config = load_config(cfg_path)
    if not config.drop_zone.startswith("s3://"):
        config.path(config.drop_zone).mkdir(parents=True, exist_ok=True)
    try:
        done = ingestion.ensure_workspace(config)
        if cfg_path.parent == config.workspace_path:  # the config is part of the workspace's history
            from components.versioning import commit

            commit(config.workspace_path, "cliploop: configuration", [cfg_path.name])
    except Exception as exc:
        return _external_error(exc)
    for line in done or ["workspace already initialised"]:
        print(f"  {line}")
    print(f"workspace ready: {config.workspace_path}\n  drop tasks into: {config.location(config.drop_zone)}\n"
          f"  then run: cliploop ingest")
    return EXIT_OK


def _external_error(exc: Exception) -> int:
    print(f"cliploop: {exc}\n(nothing was lost; fix the cause and re-run the same command)", file=sys.stderr)
    return EXIT_EXTERNAL


def cmd_ingest(args: argparse.Namespace) -> int:
    from components import ingestion, tasks
    from components.storage import StorageError
    from components.versioning import VersioningError

    config = _config(args)
    location = config.location(args.location) if args.location else config.location(config.drop_zone)
    try:
        locations = _task_locations(location, config)
    except tasks.DropError as exc:
        print(f"cliploop: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not locations:
        print(f"no task drops found in {location}")
        return EXIT_OK
    worst = EXIT_OK
    outcomes = []
    for loc in locations:
        try:
            outcome = ingestion.ingest(loc, config)
        except ingestion.IngestRefused as exc:
            print(f"REFUSED {loc}: {exc}", file=sys.stderr)
            worst = max(worst, EXIT_REFUSED)
            outcomes.append({"location": loc, "status": "refused", "message": str(exc)})
            continue
        except (VersioningError, StorageError, OSError) as exc:
            worst = max(worst, _external_error(exc))
            outcomes.append({"location": loc, "status": "error", "message": str(exc)})
            continue
        outcomes.append({"location": loc, "task_id": outcome.task_id, "status": outcome.status,
                         "state": outcome.state, "report": outcome.report_path, "message": outcome.message})
        if not args.json:
            print(outcome.message if outcome.status != "quarantined" else
                  f"QUARANTINED {outcome.task_id}:\n{outcome.message}\n  report: {outcome.report_path}")
        if outcome.status == "quarantined":
            worst = max(worst, EXIT_INVALID)
    if args.json:
        print(json.dumps(outcomes, indent=2))
    return worst


def _task_locations(location: str, config) -> list[str]:
    from components.ingestion import drop_locations

    return drop_locations(location, config)


def cmd_validate(args: argparse.Namespace) -> int:
    from components import ingestion, storage

    config = _config(args)
    report_dir = Path(args.report_dir).resolve() if args.report_dir else None
    target = args.target
    try:
        if storage.is_s3(target) or Path(target).exists():
            report = ingestion.validate_location(target, config, report_dir)
        else:
            report = ingestion.validate_task(target, config, report_dir)
    except FileNotFoundError as exc:
        print(f"cliploop: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    if report_dir and not args.json:
        print(f"report: {report_dir / 'report.json'}")
    return EXIT_OK if report.success else EXIT_INVALID


def cmd_status(args: argparse.Namespace) -> int:
    from components import ingestion

    config = _config(args)
    rows = ingestion.status(config)
    if args.json:
        print(json.dumps({"workspace": str(config.workspace_path), "tasks": rows}, indent=2, default=str))
        return EXIT_OK
    if not rows:
        print(f"no tasks in {config.workspace_path} yet (cliploop ingest PATH)")
        return EXIT_OK
    print(_table([[r["task_id"], r["state"], r["scenario"] or "", str(len(r["classes"])),
                   f"{r['n_train'] or 0}/{r['n_test'] or 0}", (r["dvc_md5"] or "")[:12], r["updated_at"],
                   _short(r["report"], config.workspace_path)] for r in rows],
                 ["task", "state", "scenario", "classes", "train/test", "dvc", "updated", "report"]))
    return EXIT_OK


def _short(path: str | None, root: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def cmd_config(args: argparse.Namespace) -> int:
    print(_config(args).to_yaml(), end="")
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    from components import metrics

    return metrics.main([args.matrix] + (["--json"] if args.json else []))


def cmd_learn(args: argparse.Namespace) -> int:
    from components import learn

    if args.workspace:
        args.overrides = list(args.overrides) + [f"workspace={Path(args.workspace).resolve()}"]
    return learn.run_cli(args)


def cmd_methods(args: argparse.Namespace) -> int:
    from components.methods import available_methods

    from components.methods import MethodError, get_method

    if args.name:
        try:
            cls = get_method(args.name)
        except MethodError as exc:
            print(f"cliploop methods: {exc}", file=sys.stderr)
            return EXIT_USAGE
        defaults = cls.Settings().model_dump(mode="json")
        if args.json:
            print(json.dumps(defaults, indent=2))
            return EXIT_OK
        print(f"{args.name}: {cls.summary}\n\nsettings (method.settings.<key>; defaults from the official code where one exists):")
        for key, field in cls.Settings.model_fields.items():
            note = f"  # {field.description}" if field.description else ""
            print(f"  {key}: {json.dumps(defaults[key])}{note}")
        return EXIT_OK
    methods = available_methods()
    width = max(map(len, methods))
    for name, summary in methods.items():
        print(f"{name:<{width}}  {summary}")
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    from components.lineage import LineageError, build_lineage, format_lineage
    from components.registry import from_config

    config = _config(args)
    try:
        record = build_lineage(from_config(config), args.ref, config.workspace_path, verify=args.verify)
    except LineageError as exc:
        print(f"cliploop lineage: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return EXIT_INVALID if record["verified"] is False else EXIT_OK


def cmd_scenario(args: argparse.Namespace) -> int:
    from components import scenario

    return scenario.main(args.rest or ["--help"])


def _reviewer(args) -> str:
    import getpass

    return args.reviewer or getpass.getuser()


def _review(args: argparse.Namespace, decision: str, note: str) -> int:
    from components import pipeline
    from components.registry import RegistryError, from_config

    config = _config(args)
    registry = from_config(config)
    try:
        version = registry.resolve(args.version)
        was_pending = registry.version_tags(version).get("review") == "pending"
        result = pipeline.decide(config, version, decision, _reviewer(args), note,
                                 override_gate=getattr(args, "override_gate", False))
    except (RegistryError, pipeline.PipelineError) as exc:
        print(f"cliploop {decision}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    resumed: list[str] = []
    if was_pending:
        from flows.update import resume_waiting

        try:
            resumed = resume_waiting(version, decision, _reviewer(args), note)
        except Exception as exc:  # no Prefect API reachable: the decision stands; the paused run times out
            print(f"cliploop {decision}: decision recorded, but no paused flow run could be resumed ({exc})",
                  file=sys.stderr)
    verb = "promoted to champion" if decision == "approve" else "rejected"
    print(f"version {version} {verb}" + ("" if result["changed"] else " (already)") +
          (f"; previous champion v{result['previous']} kept as previous-champion" if result.get("previous") else "") +
          (f"; resumed flow run(s) {', '.join(resumed)}" if resumed else ""))
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _review(args, "approve", args.note)


def cmd_reject(args: argparse.Namespace) -> int:
    return _review(args, "reject", args.reason)


def cmd_rollback(args: argparse.Namespace) -> int:
    from components import pipeline
    from components.registry import RegistryError

    config = _config(args)
    try:
        result = pipeline.rollback(config, _reviewer(args), args.note)
    except RegistryError as exc:
        print(f"cliploop rollback: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"champion is v{result['restored']} again (v{result['demoted']} demoted)")
    for line in result["ledger"]:
        print(f"  ledger: {line}")
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    from components import pipeline

    try:
        pipeline.requeue(_config(args), args.task_id)
    except pipeline.PipelineError as exc:
        print(f"cliploop requeue: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"task {args.task_id} will be learned again next night")
    return EXIT_OK


def cmd_nightly(args: argparse.Namespace) -> int:
    from components import pipeline
    from flows.nightly import NightFailed, run_night

    config = _config(args)
    try:
        summary = run_night(config)
    except pipeline.ChainBusy as exc:
        print(f"cliploop nightly: {exc}", file=sys.stderr)
        return EXIT_OK
    except NightFailed as exc:
        summary, code = exc.summary, EXIT_EXTERNAL
    else:
        code = EXIT_OK
    print(json.dumps(summary, indent=2, default=str) if args.json else _night_text(summary))
    return code


def _night_text(summary: dict) -> str:
    lines = []
    for line in summary["reconciled"]:
        lines.append(f"reconciled  {line}")
    for item in summary["ingested"]:
        lines.append(f"{item['status']:>11} {item['task_id'] or item['location']}: {item['message'].splitlines()[0]}")
    rows = [[u["task_id"], str(u.get("version", "")), u.get("gate", ""), u["outcome"],
             _fmt((u.get("metrics") or {}).get("cl.last")), _fmt((u.get("metrics") or {}).get("cl.forgetting"))]
            for u in summary["updates"]]
    if rows:
        lines += ["", _table(rows, ["task", "version", "gate", "outcome", "cl.last", "forgetting"])]
        lines += [f"  gate of v{u.get('version')} ({u['task_id']}): " + "; ".join(u["reasons"])
                  for u in summary["updates"] if u.get("gate") == "fail" and u.get("reasons")]
    if summary.get("stopped"):
        lines.append(f"\nchain stopped: {summary['stopped']}")
    elif not rows:
        lines.append("nothing new to learn")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2f}"


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import DeployError, deploy

    config = _config(args)
    try:
        values = deploy(config, args.api_url)
    except DeployError as exc:
        print(f"cliploop deploy: {exc}", file=sys.stderr)
        return EXIT_EXTERNAL
    gpu = config.orchestration.gpu_pool
    print(f"deployed: cliploop-nightly/nightly on pool {values['CLIPLOOP_CPU_POOL']!r}, schedule "
          f"{values['CLIPLOOP_CRON']!r} ({values['CLIPLOOP_TIMEZONE']}); cliploop-build-pool/{values['CLIPLOOP_GPU_POOL']} "
          f"and cliploop-train-evaluate/{values['CLIPLOOP_GPU_POOL']} on pool {values['CLIPLOOP_GPU_POOL']!r}\n"
          f"config: {values['CLIPLOOP_CONFIG']}\n"
          f"start workers:  prefect worker start --pool {values['CLIPLOOP_CPU_POOL']}   and   "
          f"prefect worker start --pool {values['CLIPLOOP_GPU_POOL']} (on GPU machines)"
          + ("" if gpu else "\nnote: orchestration.gpu_pool is null, so the nightly flow runs GPU steps in-process; "
             "set it to use the GPU deployments"))
    return EXIT_OK


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.stack import Stack, StackError

    config = _config(args)
    stack = Stack(config.workspace_path / ".cliploop" / "stack")
    try:
        if args.action == "up":
            ports = {n: getattr(args, f"port_{n}") for n in ("s3", "mlflow", "prefect") if getattr(args, f"port_{n}")}
            state = stack.up(ports, progress=(lambda m: None) if args.json else print)
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                print(f"\nthe stack is up. Use it from a shell:  source {state['env_file']}\n"
                      f"  Prefect UI: {state['services']['prefect']['url']}   MLflow UI: {state['services']['mlflow']['url']}")
            return EXIT_OK
        if args.action == "down":
            stack.down()
            return EXIT_OK
    except StackError as exc:
        print(f"cliploop stack: {exc}", file=sys.stderr)
        return EXIT_EXTERNAL
    rows = stack.status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table([[r["service"], r["state"], str(r.get("pid", "")), r.get("url", ""), r.get("log", "")] for r in rows],
                     ["service", "state", "pid", "url", "log"]))
    return EXIT_OK if all(r["state"] == "healthy" for r in rows) else EXIT_INVALID


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo prints its own summary
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network calls from the temporary server
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the champion's download is instant here
    _quiet_library_logs()
    from components import demo, ingestion
    from components.config import load_config
    from components.models import cache_dir
    from flows.nightly import NightFailed, run_night

    from components.methods import MethodError, get_method

    try:
        get_method(args.method)
    except MethodError as exc:
        print(f"cliploop demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # A chain keeps one method: another method's demo gets its own workspace.
    root = Path(args.dir if args.method == "lvp" else f"{args.dir}-{args.method}").resolve()
    started = time.perf_counter()
    drop_zone = root / "incoming"
    demo.build_drop_zone(drop_zone, include_bad=not args.no_bad_task)
    print(f"demo drop zone: {drop_zone} (three digit tasks and one broken one)")
    print("base model: tiny image tower + pretrained MiniLM text tower (built once, then cached)")
    overrides = demo.model_overrides(cache_dir() / "demo", progress=print)
    schedule = demo_schedule(args.method, args.overrides)
    if schedule:
        default = get_method(args.method).Settings.model_fields["iterations"].default
        print(f"demo schedule: {DEMO_ITERATIONS} iterations per task instead of {args.method}'s {default} "
              f"(--set method.settings.iterations={default} for the full one)")
    # The nightly flow on the embedded default: Prefect without a server, MLflow on SQLite, DVC local remote.
    config = load_config(overrides=[f"workspace={root / 'workspace'}", f"drop_zone={drop_zone}", *overrides,
                                    *DEMO_POLICY, f"method.name={args.method}", *schedule, *args.overrides],
                         env={}, cwd=root)
    ingestion.ensure_workspace(config)
    print("\nnightly flow: reconcile -> ingest + validate -> build pools -> per task: train/evaluate -> register "
          "-> gate -> promote\n(the demo promotes by rule, approval.auto_promote=true; a reviewer uses "
          "`cliploop approve`)\n")
    night_started = time.perf_counter()
    try:
        summary = run_night(config)
    except NightFailed as exc:
        summary = exc.summary
    night = time.perf_counter() - night_started
    print(_night_text(summary))
    rows = ingestion.status(config)
    print("\ntask ledger:")
    print(_table([[r["task_id"], r["state"], r["scenario"] or "", f"{r['n_train'] or 0}/{r['n_test'] or 0}",
                   (r["dvc_md5"] or "")[:12], r.get("model_version") or ""] for r in rows],
                 ["task", "state", "scenario", "train/test", "dvc", "version"]))
    ingest_s = sum(float(i.get("seconds") or 0) for i in summary["ingested"])
    learn_s = sum(float(p.get("seconds") or 0) for p in summary["pools"] if not p.get("cached"))
    learn_s += sum(float((u.get("timings") or {}).get("total_s") or 0) for u in summary["updates"])
    register_s = sum(float(u.get("register_s") or 0) for u in summary["updates"])
    print(_registry_text(config))
    elapsed = time.perf_counter() - started
    ws = config.workspace_path
    print(f"\ndemo finished in {elapsed:.1f} s. The night took {night:.1f} s: ingestion + validation + DVC "
          f"{ingest_s:.1f} s, pools + training + evaluation {learn_s:.1f} s, MLflow run + model + version "
          f"{register_s:.1f} s, orchestration (Prefect's temporary server, flow and task runs) "
          f"{night - ingest_s - learn_s - register_s:.1f} s.\n"
          f"  .venv/bin/cliploop status -w {ws}\n"
          f"  .venv/bin/cliploop lineage champion -w {ws} --verify\n"
          f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{ws / '.cliploop' / 'mlflow.db'} "
          f"--port 5000   (then http://127.0.0.1:5000)\n"
          f"  Prefect UI: .venv/bin/prefect server start   (then http://127.0.0.1:4200; the demo's runs are there)\n"
          f"  reports of quarantined tasks: {ws / '.cliploop' / 'quarantine'}")
    return EXIT_OK if not summary.get("stopped") or "awaiting" in summary["stopped"] else EXIT_INVALID


def _quiet_library_logs() -> None:
    """The demo prints its own summary: INFO lines of GX (whose modules set INFO on their own loggers at
    import) and of MLflow's database setup would only bury it."""
    import logging

    import great_expectations  # noqa: F401  (its import sets those levels; override them after it)
    import mlflow  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("great_expectations", "mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


# The demo's promotion policy: gate rules a reviewer would set, and promotion by rule so the demo needs no one.
DEMO_POLICY = ["approval.auto_promote=true", "gate.max_forgetting=10", "gate.min_new_task_accuracy=25"]
# The official schedules (1000 iterations a task) take minutes per task on a CPU; the demo's tasks have
# 150-300 training images, which 60 iterations pass over many times.
DEMO_ITERATIONS = 60


def demo_schedule(method: str, user_overrides: list[str]) -> list[str]:
    """The demo's shorter schedule for methods trained for a fixed number of iterations, unless the user
    chose one (``--set method.settings.iterations=...`` or ``epochs``)."""
    from components.methods import get_method

    fields = get_method(method).Settings.model_fields
    default = fields["iterations"].default if "iterations" in fields else None
    chosen = any(o.split("=", 1)[0].strip() in ("method.settings.iterations", "method.settings.epochs")
                 for o in user_overrides)
    if default is None or default <= DEMO_ITERATIONS or chosen:
        return []
    return [f"method.settings.iterations={DEMO_ITERATIONS}"]


def _registry_text(config) -> str:
    from components.registry import from_config

    registry = from_config(config)
    try:
        versions = registry.client.search_model_versions(f"name = '{registry.model_name}'")
    except Exception:
        return ""
    aliases = {v: a for a in ("champion", "challenger", "previous-champion") if (v := registry.alias(a)) is not None}
    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        tags = registry.version_tags(int(mv.version))
        rows.append([mv.version, tags.get("task_id", ""), tags.get("parent_version", "") or "base",
                     tags.get("gate", ""), tags.get("review", ""), aliases.get(int(mv.version), "")])
    if not rows:
        return ""
    return f"\nMLflow registry, model {registry.model_name!r}:\n" + _table(
        rows, ["version", "task", "parent", "gate", "review", "alias"])


COMMANDS = {"init": cmd_init, "ingest": cmd_ingest, "validate": cmd_validate, "status": cmd_status,
            "config": cmd_config, "metrics": cmd_metrics, "learn": cmd_learn, "methods": cmd_methods, "scenario": cmd_scenario, "lineage": cmd_lineage,
            "demo": cmd_demo, "nightly": cmd_nightly, "approve": cmd_approve, "reject": cmd_reject,
            "rollback": cmd_rollback, "requeue": cmd_requeue, "deploy": cmd_deploy, "stack": cmd_stack}


if __name__ == "__main__":
    raise SystemExit(main())
