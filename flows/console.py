"""What the ``cliploop`` command prints: tables and summaries, built from the data the components return.

Rendering only: nothing here decides an outcome or an exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def short(path: str | None, root: Path) -> str:
    """A path relative to the workspace when it lies inside it."""
    if not path:
        return ""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def number(value) -> str:
    return "" if value is None else f"{value:.2f}"


def status_text(rows: list[dict], workspace: Path) -> str:
    return table(
        [
            [
                r["task_id"],
                r["state"],
                r["scenario"] or "",
                str(len(r["classes"])),
                f"{r['n_train'] or 0}/{r['n_test'] or 0}",
                (r["dvc_md5"] or "")[:12],
                r["updated_at"],
                short(r["report"], workspace),
            ]
            for r in rows
        ],
        ["task", "state", "scenario", "classes", "train/test", "dvc", "updated", "report"],
    )


def ledger_text(rows: list[dict]) -> str:
    """The task ledger as the demo shows it: state, sizes, DVC hash and the model version of each task."""
    return table(
        [
            [
                r["task_id"],
                r["state"],
                r["scenario"] or "",
                f"{r['n_train'] or 0}/{r['n_test'] or 0}",
                (r["dvc_md5"] or "")[:12],
                r.get("model_version") or "",
            ]
            for r in rows
        ],
        ["task", "state", "scenario", "train/test", "dvc", "version"],
    )


def ingest_line(outcome) -> str:
    if outcome.status != "quarantined":
        return outcome.message
    return f"QUARANTINED {outcome.task_id}:\n{outcome.message}\n  report: {outcome.report_path}"


MAX_RULES = 3  # failed rules named per quarantined task in the night's summary; the rest are counted


def night_text(summary: dict, config=None) -> str:
    """One night: what was reconciled and ingested, one row per learned task, gate reasons, where it stopped, and
    where its reports, Data Docs and plots are. Each thing is said once. ``config`` (the night's) locates the
    plots of each version; without it they are left out."""
    lines = []
    for line in summary["reconciled"]:
        lines.append(f"reconciled  {line}")
    known = [i["task_id"] for i in summary["ingested"] if i["status"] == "unchanged"]
    if known:  # earlier nights' news: one line, however full the drop zone
        lines.append(f"{'unchanged':>11} {len(known)} task(s) already known: {', '.join(known)}")
    for item in summary["ingested"]:
        if item["status"] == "unchanged":
            continue
        name = item["task_id"] or item["location"]
        lines.append(f"{item['status']:>11} {name}: {_ingest_detail(item)}")
        if item["status"] == "quarantined":
            lines += [f"{'':>12}{rule}" for rule in failed_rules_text(item)]
    rows = [
        [
            u["task_id"],
            str(u.get("version", "")),
            "unchecked" if u.get("gate_checked") is False else u.get("gate", ""),
            u["outcome"],
            number((u.get("metrics") or {}).get("cl.last")),
            number((u.get("metrics") or {}).get("cl.forgetting")),
        ]
        for u in summary["updates"]
    ]
    if rows:
        lines += ["", table(rows, ["task", "version", "gate", "outcome", "cl.last", "forgetting"])]
        lines += [
            f"  gate of v{u.get('version')} ({u['task_id']}): " + "; ".join(u["reasons"])
            for u in summary["updates"]
            if u.get("gate") == "fail" and u.get("reasons")
        ]
    if summary.get("stopped"):
        lines.append(f"\nchain stopped: {summary['stopped']}; the tasks after it wait for the next night")
    elif not rows:
        lines.append("nothing new to learn")
    places = night_places(summary, config)
    if places:
        lines += ["", *places]
    return "\n".join(lines)


def _ingest_detail(item: dict) -> str:
    """The ingestion message without what the line says already ("task X accepted: ..." after "accepted X:")."""
    if item["status"] == "quarantined" and item.get("report"):
        count = len(_failed_rules(item))
        if count:
            return f"{count} validation rule{'s' if count != 1 else ''} failed"
    first = item["message"].splitlines()[0] if item["message"] else ""
    tid = item["task_id"]
    for lead in (f"task {tid} {item['status']}: ", f"task {tid}: ", f"task {tid} "):
        if tid and first.startswith(lead):
            return first[len(lead) :]
    return first


def _failed_rules(item: dict) -> list[dict]:
    """The failed rules of an ingested task's validation report (report.json, beside its Data Docs)."""
    try:
        report = json.loads(Path(item["report"]).read_text())
    except (OSError, ValueError, TypeError):
        return []
    return [r for r in report.get("rules", []) if not r.get("success", True)]


def failed_rules_text(item: dict, limit: int = MAX_RULES) -> list[str]:
    """One line per failed rule of a quarantined task (its first problem), the first ``limit``, then the count."""
    rules = _failed_rules(item)
    if not rules:  # no readable report: the message's own lines name the rules
        return [line.strip() for line in item["message"].splitlines() if line.strip().startswith("✗")][:limit]
    out = []
    for rule in rules[:limit]:
        first = (rule.get("failures") or [{}])[0].get("message") or rule.get("description", "")
        first = first if len(first) <= 100 else first[:99] + "…"
        more = rule.get("count", 1) - 1
        out.append(f"✗ [{rule['rule']}] {first}" + (f" (+{more} more)" if more > 0 else ""))
    if len(rules) > limit:
        out.append(f"and {len(rules) - limit} more: {', '.join(r['rule'] for r in rules[limit:])}")
    return out


def night_places(summary: dict, config=None) -> list[str]:
    """Where the night's validation reports, Data Docs and plots are: a heading naming the workspace (the working
    folder without ``config``), then one line per task and one per version, paths relative to it."""
    root = config.workspace_path if config is not None else Path.cwd()
    rows = []
    for item in summary["ingested"]:
        if item.get("report") and item["status"] != "unchanged":  # this night's ingestions only
            folder = Path(item["report"]).parent
            docs = ", Data Docs: data_docs/index.html" if (folder / "data_docs" / "index.html").is_file() else ""
            page = "report.html, " if (folder / "report.html").is_file() else ""  # the one that opens offline
            rows.append((item["task_id"] or item["location"], f"{_near(folder, root)}/ ({page}report.json{docs})"))
    for u in summary["updates"]:
        run_dir = _run_dir(u, config)
        if run_dir is not None and (run_dir / "eval").is_dir():
            plots = ", ".join(p.name for p in sorted((run_dir / "eval").glob("*.png")))
            rows.append((f"v{u['version']} {u['task_id']}", f"{_near(run_dir / 'eval', root)}/ ({plots})"))
    if not rows:
        return []
    width = max(len(name) for name, _ in rows)
    return [f"where to look, in {root}:"] + [f"  {name:<{width}}  {where}" for name, where in rows]


def _run_dir(update: dict, config) -> Path | None:
    """Where a version's training and evaluation outputs are: the step's folder, keyed by its inputs."""
    if update.get("out_dir"):  # an object store's URI is no folder here: the plots are in the MLflow run
        return None if "://" in update["out_dir"] else Path(update["out_dir"])
    if config is None or "parent_version" not in update or update.get("version") is None:
        return None
    from components.pipeline import step_io
    from components.pipeline.steps import update_key

    try:
        place = step_io.place(
            step_io.store_of(config), "runs", update_key(config, update["task_id"], update["parent_version"])
        )
    except Exception:  # a task no longer in the ledger: its plots are in its MLflow run
        return None
    return None if "://" in place else Path(place)


def _near(path: Path, root: Path) -> str:
    """A path relative to ``root`` when it lies inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def registry_text(config) -> str:
    """Every version of the registered model with its task, parent, gate, review and alias ("" when none)."""
    from components.registry.registry import from_config

    registry = from_config(config)
    try:
        versions = registry.versions()
        aliases = {
            v: a for a in ("champion", "challenger", "previous-champion") if (v := registry.alias(a)) is not None
        }
    except Exception:  # an unreachable registry: the view is simply left out
        return ""
    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        tags = registry.version_tags(int(mv.version))
        rows.append(
            [
                mv.version,
                tags.get("task_id", ""),
                tags.get("parent_version", "") or "base",
                tags.get("gate", ""),
                tags.get("review", ""),
                aliases.get(int(mv.version), ""),
            ]
        )
    if not rows:
        return ""
    return f"\nMLflow registry, model {registry.model_name!r}:\n" + table(
        rows, ["version", "task", "parent", "gate", "review", "alias"]
    )


def review_text(version: int, decision: str, result: dict, resumed: list[str]) -> str:
    verb = "promoted to champion" if decision == "approve" else "rejected"
    return (
        f"version {version} {verb}"
        + ("" if result["changed"] else " (already)")
        + (f"; previous champion v{result['previous']} kept as previous-champion" if result.get("previous") else "")
        + (f"; resumed flow run(s) {', '.join(resumed)}" if resumed else "")
    )


def review_wait_text(version: int, task_id: str, model: str, timeout_s: float) -> str:
    """What a night says when it starts waiting for a reviewer: which version, for how long at most, and the three
    ways to decide (the command line, the MLflow tag, the MLflow alias)."""
    from flows.progress import duration_text

    return "\n".join(
        [
            f"version {version} (task {task_id}) waits for a review, for at most {duration_text(timeout_s)} "
            "(approval.timeout_s); decide in one of three ways:",
            f"  cliploop approve {version} --reviewer NAME"
            f"  (or: cliploop reject {version} --reviewer NAME --reason '...')",
            f"  in MLflow, model {model!r} version {version}: set the tag cliploop.review to approved (or rejected)",
            f"  in MLflow, model {model!r}: move the alias champion to version {version} (approves it)",
            f"the night goes on as soon as one is taken; with none, version {version} stays challenger and the next "
            "night asks again",
        ]
    )


def rollback_text(result: dict) -> str:
    return "\n".join(
        [
            f"champion is v{result['restored']} again (v{result['demoted']} demoted)",
            *(f"  ledger: {line}" for line in result["ledger"]),
        ]
    )


def methods_text(methods: dict[str, type]) -> str:
    """One line per method: its name, summary and what it trains (``Method.trained``)."""
    width = max(map(len, methods))
    return "\n".join(
        f"{name:<{width}}  {cls.summary}\n{'':<{width}}  trains: {cls.trained_text()}" for name, cls in methods.items()
    )


def method_settings_text(name: str, cls) -> str:
    """A method's summary and every setting with its default and meaning."""
    defaults = cls.Settings().model_dump(mode="json")
    lines = [
        (
            f"{name}: {cls.summary}\n\nsettings (method.settings.<key>; defaults from the official code where "
            "one exists):"
        )
    ]
    for key, field in cls.Settings.model_fields.items():
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"  {key}: {json.dumps(defaults[key])}{note}")
    return "\n".join(lines)


def scenarios_text(scenarios: dict[str, str]) -> str:
    return "\n".join(f"{name:<20} {description}" for name, description in scenarios.items())


def scenario_tasks_text(scenario) -> str:
    lines = []
    for t in scenario.tasks:
        classes = "all" if t.classes == "all" else f"{len(t.classes)} classes"
        lines.append(f"{t.task_id:<28} {t.scenario:<19} {t.dataset:<13} {classes:<11} split={t.split.kind}")
    return "\n".join(lines)


def deploy_text(values: dict[str, str], gpu_pool: str | None) -> str:
    return (
        f"deployed: cliploop-nightly/nightly on pool {values['CLIPLOOP_CPU_POOL']!r}, schedule "
        f"{values['CLIPLOOP_CRON']!r} ({values['CLIPLOOP_TIMEZONE']}); "
        f"cliploop-build-pool/{values['CLIPLOOP_GPU_POOL']} "
        f"and cliploop-train-evaluate/{values['CLIPLOOP_GPU_POOL']} on pool {values['CLIPLOOP_GPU_POOL']!r}\n"
        f"config: {values['CLIPLOOP_CONFIG']}\n"
        f"start workers:  prefect worker start --pool {values['CLIPLOOP_CPU_POOL']}   and   "
        f"prefect worker start --pool {values['CLIPLOOP_GPU_POOL']} (on GPU machines)"
        + (
            ""
            if gpu_pool
            else "\nnote: orchestration.gpu_pool is null, so the nightly flow runs GPU steps "
            "in-process; set it to use the GPU deployments"
        )
    )


def stack_up_text(state: dict[str, Any]) -> str:
    return (
        f"\nthe stack is up. Use it from a shell:  source {state['env_file']}\n"
        f"  Prefect UI: {state['services']['prefect']['url']}   "
        f"MLflow UI: {state['services']['mlflow']['url']}"
        + (
            f"\n  both store in PostgreSQL at {state['services']['postgres']['url']} (databases mlflow, prefect)"
            if state.get("db") == "postgres"
            else ""
        )
    )


def stack_status_text(rows: list[dict]) -> str:
    return table(
        [[r["service"], r["state"], str(r.get("pid", "")), r.get("url", ""), r.get("log", "")] for r in rows],
        ["service", "state", "pid", "url", "log"],
    )
