"""The last step of an update: its MLflow run and model version (alias challenger), idempotent by the update's
key. ``register_update`` finds the run and the version logged for the same key before logging another, and
finishes what a killed attempt left undone (the challenger alias, the lineage record); the version's tags name
the code (``code_version``) and the config it ran with."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from components.pipeline import step_io
from components.pipeline.chain import ledger_of, registry_of, task_record
from components.settings.config import Config


def code_version() -> str:
    """The cliploop version, plus the git commit of the code when it runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("cliploop")
    except PackageNotFoundError:
        release = "unknown"
    here = Path(__file__).resolve().parents[2]  # the checkout: components/pipeline/ is two folders down
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{release}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return release


def register_update(config: Config, update: dict[str, Any], flow_run_id: str | None = None) -> dict[str, Any]:
    """An MLflow run and a model version (alias challenger) for a finished update; idempotent by its key."""
    started = time.perf_counter()
    registry = registry_of(config)
    task_id, key = update["task_id"], update["run_key"]
    record = task_record(config, task_id)
    existing = registry.find_version(key)
    if existing is not None:  # registered by an earlier attempt; register() resumes what it left undone
        run_id = existing.run_id
        version = registry.register(run_id, key, {})
        if not registry.has_artifact(run_id, "lineage.json"):
            _log_lineage(config, registry, version, run_id)
    else:
        run = registry.find_run(key)
        tags = {
            "task_id": task_id,
            "method": config.method.name,
            "run_key": key,
            "parent_version": "" if update["parent_version"] is None else str(update["parent_version"]),
            "dvc_md5": record.dvc_md5 or "",
            "workspace_commit": record.workspace_commit or "",
            "config_sha256": config.sha256(),
            "code_version": code_version(),
            "flow_run_id": flow_run_id or "",
            "scenario": record.scenario or "",
            "content_digest": record.content_digest,
        }
        if run is None:
            registry.fail_abandoned_runs(key)  # we register this key now: a RUNNING run of it is a dead one
            out = step_io.local(step_io.store_of(config), update["out_dir"])  # fetched, checked, if remote
            extra = {}
            report = config.workspace_path / "data" / "reports" / task_id / "report.json"  # where ingest put it
            if report.exists():  # with the page that renders it offline (components/intake/report_page.py)
                extra["validation"] = [report, report.with_name("report.html")]
            params = _flatten(config.model_dump(mode="json"))
            params.update({f"timing.{k}": v for k, v in update.get("timings", {}).items()})
            metrics = dict(update["metrics"])
            timings = update.get("timings", {})
            if timings.get("pool_img_per_s"):
                metrics["perf.pool_img_per_s"] = timings["pool_img_per_s"]
            if timings.get("peak_mem_mb"):
                metrics["perf.peak_mem_mb"] = timings["peak_mem_mb"]
            if timings.get("train_step_ms"):
                metrics["perf.train_step_ms"] = timings["train_step_ms"]
            docs = report.parent / "data_docs"  # the task's GX Data Docs, beside its report
            run_id = registry.log_update(out, task_id, metrics, update["final_row"], params, tags, extra, docs)
            registry.log_task_dataset(
                run_id,
                task_id,
                record.dvc_md5 or record.content_digest,
                {  # where in the workspace's git + DVC history, not where the workspace happens to be
                    "dvc_md5": record.dvc_md5,
                    "path": f"data/tasks/{task_id}",
                    "commit": record.workspace_commit,
                },
            )
        else:
            run_id = run.info.run_id
        version = registry.register(
            run_id, key, {k: v for k, v in tags.items() if k != "run_key"} | {"review": "pending"}
        )
        _log_lineage(config, registry, version, run_id)
    with ledger_of(config) as ledger:
        current = ledger.get(task_id)
        if current.state == "learning":
            ledger.transition(task_id, "learned", expect=["learning"], model_version=str(version))
        elif current.model_version != str(version):
            ledger.update(task_id, model_version=str(version))
    return {
        "task_id": task_id,
        "version": version,
        "run_id": run_id,
        "run_key": key,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _log_lineage(config: Config, registry, version: int, run_id: str) -> None:
    """The version's lineage record as the run's ``lineage.json`` (what an auditor reads in the MLflow UI)."""
    from components.registry.lineage import build_lineage

    record = build_lineage(registry, version, config.workspace_path, verify=False)
    registry.log_json(run_id, record, "lineage.json")


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out
