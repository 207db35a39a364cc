"""Lineage: from any model version back through its parents to the first task (docs/contracts.md, "Lineage record").

Every link comes from what was recorded when the version was made (its ``cliploop.*`` tags and MLflow
run) and from the task ledger (validation result and report). ``verify`` re-hashes each task's
DVC-tracked files on disk and compares them with the DVC hash the version recorded: any changed,
missing or extra byte makes the record ``verified: false`` with the file named; so does a link no one
decided on (review ``pending``, ``timed-out`` or unset), and a configuration its run keeps that is not the
one pinned for it (``lineage_config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.registry.lineage_config import config_problems
from components.registry.model_pins import CONFIG_PIN_TAG
from components.registry.registry import Registry, RegistryError
from components.registry.registry_runs import UNDECIDED


class LineageError(RuntimeError):
    pass


def _validation(ledger_record, workspace: Path, task_id: str | None) -> dict[str, Any]:
    if ledger_record is None:
        # No ledger (an auditor's clone: it lives in the git-ignored .cliploop/), but the accepted task's report
        # is part of the DVC-tracked data/, pulled with it.
        stored = Path("data", "reports", str(task_id), "report.json")
        if not task_id or not (workspace / stored).is_file():
            return {"success": None, "report": None}
        return {"success": _success(workspace / stored), "report": stored.as_posix(), "state": None}
    report = ledger_record.report
    success = _success(_report_in(workspace, Path(report))) if report else None
    return {"success": success, "report": report, "state": ledger_record.state}


def _success(path: Path) -> bool | None:
    try:
        return bool(json.loads(path.read_text()).get("success"))
    except (OSError, json.JSONDecodeError):
        return None


def _report_in(workspace: Path, report: Path) -> Path:
    """The report's file in this workspace: the ledger records absolute paths, and a workspace may have been
    moved since (its reports moved with it, under ``data/reports/``)."""
    if not report.is_absolute():
        return workspace / report
    if report.exists():
        return report
    parts = report.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i : i + 2] == ("data", "reports"):
            return workspace.joinpath(*parts[i:])
    return report


def build_lineage(registry: Registry, ref: str | int, workspace: Path, verify: bool = False) -> dict[str, Any]:
    """The lineage record of ``ref`` (a version number or an alias)."""
    from components.intake.ledger import Ledger
    from components.intake.versioning import verify_task

    try:
        version = registry.resolve(ref)
    except RegistryError as exc:  # NotFound; an outage propagates as it is
        raise LineageError(str(exc)) from None
    aliases = {name: registry.alias(name) for name in ("champion", "challenger", "previous-champion")}
    ledger_path = Path(workspace) / ".cliploop" / "ledger.sqlite"
    ledger = Ledger(ledger_path) if ledger_path.is_file() else None
    chain: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[int] = set()
    current: int | None = version
    base = None
    try:
        while current is not None:
            if current in seen:
                raise LineageError(f"version {current} is its own ancestor: the parent tags form a cycle")
            seen.add(current)
            tags = registry.version_tags(current)
            mv = registry.model_version(current)
            task_id = tags.get("task_id")
            record = ledger.get(task_id) if ledger and task_id else None
            parent = int(tags["parent_version"]) if tags.get("parent_version", "").isdigit() else None
            entry = {
                "version": current,
                "parent_version": parent,
                "method": tags.get("method"),
                "task": {
                    "id": task_id,
                    "scenario": record.scenario if record else tags.get("scenario"),
                    "content_digest": tags.get("content_digest") or (record.content_digest if record else None),
                    "dvc_md5": tags.get("dvc_md5"),
                    "workspace_commit": tags.get("workspace_commit"),
                    "validation": _validation(record, Path(workspace), task_id),
                },
                "config_sha256": tags.get("config_sha256"),
                "config_file_sha256": tags.get(CONFIG_PIN_TAG),
                "code_version": tags.get("code_version"),
                "flow_run_id": tags.get("flow_run_id"),
                "mlflow_run_id": mv.run_id,
                "gate": {
                    "verdict": tags.get("gate"),
                    "reasons": json.loads(tags["gate_reasons"]) if tags.get("gate_reasons") else [],
                },
                "review": {
                    "decision": tags.get("review"),
                    "reviewer": tags.get("reviewer"),
                    "note": tags.get("review_note"),
                    "at": tags.get("review_at"),
                    "decided": tags.get("review") not in UNDECIDED,
                },
            }
            if verify and tags.get("review") in UNDECIDED:
                problems.append(f"version {current}: never reviewed (review {tags.get('review') or 'unset'})")
            if verify:
                found = config_problems(registry, current, mv.run_id, tags)
                entry["config_verified"] = not found
                problems.extend(found)
                if not task_id or not tags.get("dvc_md5"):
                    problems.append(f"version {current}: no task id or DVC hash recorded")
                else:
                    check = verify_task(Path(workspace), task_id, tags["dvc_md5"])
                    entry["task"]["verified"] = check.ok
                    problems.extend(check.problems)
            if base is None and tags.get("backbone"):
                base = json.loads(tags["backbone"])
            chain.append(entry)
            current = parent
    finally:
        if ledger is not None:
            ledger.close()
    if verify:
        problems.extend(_remote_problems(Path(workspace), chain))
    return {
        "model": {
            "name": registry.model_name,
            "version": version,
            "aliases": sorted(a for a, v in aliases.items() if v == version),
        },
        "base": base,
        "chain": chain,
        "verified": (not problems) if verify else None,
        "problems": problems,
    }


def _remote_problems(workspace: Path, chain: list[dict[str, Any]]) -> list[str]:
    """The DVC remote still holds every link's data (its commit's data listing and its task's files): files on
    disk that re-hash right prove nothing about the copy a fresh clone would pull (``dvc gc -w -c`` deleted a
    champion's listing). Lines naming what is missing, or none."""
    from components.registry.data_gc import remote_problems

    links = [(f"version {link['version']}", link["task"]["id"], link["task"]["workspace_commit"]) for link in chain]
    return remote_problems(workspace, links)


def format_lineage(record: dict[str, Any]) -> str:
    m = record["model"]
    lines = [f"{m['name']} version {m['version']}" + (f" ({', '.join(m['aliases'])})" if m["aliases"] else "")]
    for link in record["chain"]:
        task = link["task"]
        ok = {True: "verified", False: "MISMATCH", None: ""}[task.get("verified")]
        lines.append(
            f"  v{link['version']} <- parent {link['parent_version'] or '-'}: task {task['id']} "
            f"dvc {str(task['dvc_md5'])[:12]} commit {str(task['workspace_commit'])[:10]} "
            f"config {str(link.get('config_file_sha256'))[:12]} method {link['method']} "
            f"gate {link['gate']['verdict'] or '-'} "
            f"review {_review_text(link['review'])} {ok}".rstrip()
        )
    if record["verified"] is not None:
        lines.append("verified: yes" if record["verified"] else "verified: NO\n  " + "\n  ".join(record["problems"]))
    return "\n".join(lines)


def _review_text(review: dict[str, Any]) -> str:
    if not review["decision"]:
        return "- (never reviewed)"
    by = f" by {review['reviewer']}" if review.get("reviewer") else ""
    return f"{review['decision']}{by}" + ("" if review.get("decided", True) else " (not decided)")
