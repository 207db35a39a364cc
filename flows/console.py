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


def night_text(summary: dict) -> str:
    """One night: what was reconciled and ingested, one row per learned task, gate reasons, where it stopped."""
    lines = []
    for line in summary["reconciled"]:
        lines.append(f"reconciled  {line}")
    for item in summary["ingested"]:
        lines.append(f"{item['status']:>11} {item['task_id'] or item['location']}: {item['message'].splitlines()[0]}")
    rows = [
        [
            u["task_id"],
            str(u.get("version", "")),
            u.get("gate", ""),
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
        lines.append(f"\nchain stopped: {summary['stopped']}")
    elif not rows:
        lines.append("nothing new to learn")
    return "\n".join(lines)


def registry_text(config) -> str:
    """Every version of the registered model with its task, parent, gate, review and alias ("" when none)."""
    from components.registry import from_config

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
    )


def stack_status_text(rows: list[dict]) -> str:
    return table(
        [[r["service"], r["state"], str(r.get("pid", "")), r.get("url", ""), r.get("log", "")] for r in rows],
        ["service", "state", "pid", "url", "log"],
    )


def demo_text(run) -> str:
    """The demo's closing report: the night, the ledger, the registry, where the time went, what to run next."""
    summary, ws = run.summary, run.config.workspace_path
    ingest_s = sum(float(i.get("seconds") or 0) for i in summary["ingested"])
    learn_s = sum(float(p.get("seconds") or 0) for p in summary["pools"] if not p.get("cached"))
    learn_s += sum(float((u.get("timings") or {}).get("total_s") or 0) for u in summary["updates"])
    register_s = sum(float(u.get("register_s") or 0) for u in summary["updates"])
    night = run.night_s
    return "\n".join(
        [
            night_text(summary),
            "\ntask ledger:",
            ledger_text(run.ledger),
            run.registry,
            (
                f"\ndemo finished in {run.elapsed_s:.1f} s. The night took {night:.1f} s: ingestion + validation + DVC "
                f"{ingest_s:.1f} s, pools + training + evaluation {learn_s:.1f} s, MLflow run + model + version "
                f"{register_s:.1f} s, orchestration (Prefect's temporary server, flow and task runs) "
                f"{night - ingest_s - learn_s - register_s:.1f} s.\n"
                f"  .venv/bin/cliploop status -w {ws}\n"
                f"  .venv/bin/cliploop lineage champion -w {ws} --verify\n"
                f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{ws / '.cliploop' / 'mlflow.db'} "
                f"--port 5000   (then http://127.0.0.1:5000)\n"
                f"  Prefect UI: .venv/bin/prefect server start   "
                f"(then http://127.0.0.1:4200; the demo's runs are there)\n"
                f"  reports of quarantined tasks: {ws / '.cliploop' / 'quarantine'}"
            ),
        ]
    )
