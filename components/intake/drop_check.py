"""``cliploop validate``: a drop (folder or s3:// prefix), or a task the ledger knows, checked against the
workspace's ledger without changing anything.

Separate from :mod:`components.intake.ingestion` because it only reads: it runs the same checks as an ingest (earlier
tasks' classes and images come from the ledger) and writes nothing but the report, where it is asked to.
"""

from __future__ import annotations

from pathlib import Path

from components.intake import ledger as ledger_mod
from components.intake.shards import StoredTask
from components.intake.tasks import DropError, fallback_task_id, open_drop, read_metadata
from components.intake.validation import TaskContext, content_digest, scan_images, validate
from components.intake.validation_report import Report, report_for_drop_error
from components.intake.workspace import open_ledger, s3_settings, workspace_paths
from components.settings.config import Config


def validate_location(location: str, config: Config, report_dir: Path | None = None) -> Report:
    """Validate a drop (folder or s3:// prefix) against the workspace's ledger without changing anything."""
    return _validate_source(open_drop(config.location(location), s3_settings(config)), config, report_dir)


def validate_task(task_id: str, config: Config, report_dir: Path | None = None) -> Report:
    """Re-validate a known task: an accepted one from its stored shards, a quarantined one from its drop."""
    with open_ledger(config) as ledger:
        record = ledger.get(task_id)
    if record is None:
        raise FileNotFoundError(f"no task {task_id!r} in the ledger of {config.workspace_path} (see `cliploop status`)")
    stored = workspace_paths(config)["tasks"] / task_id
    if record.state != "quarantined" and (stored / "index.csv").exists():
        source = StoredTask(stored)
        try:
            return _validate_source(source, config, report_dir)
        finally:
            source.close()
    if not record.source:
        raise FileNotFoundError(f"task {task_id}: the ledger has no source location to re-read")
    return _validate_source(open_drop(record.source, s3_settings(config)), config, report_dir)


def _validate_source(source, config: Config, report_dir: Path | None) -> Report:
    checked_at = ledger_mod.now()
    try:
        spec, manifest, spec_bytes, manifest_bytes = read_metadata(source)
    except DropError as exc:
        report = report_for_drop_error(fallback_task_id(source), source.location, exc, checked_at)
    else:
        facts = scan_images(source, manifest, config.validation)
        digest = content_digest(spec_bytes, manifest_bytes, facts)
        ctx = TaskContext()
        if workspace_paths(config)["ledger"].exists():
            with open_ledger(config) as ledger:
                ctx = TaskContext.from_ledger(ledger, spec.dataset, spec.task_id, facts)
        docs = (report_dir / "data_docs") if report_dir else None
        report = validate(
            spec,
            manifest,
            facts,
            config.validation,
            ctx,
            source=source.location,
            checked_at=checked_at,
            digest=digest,
            docs_dir=docs,
        )
    if report_dir:
        config.write_resolved(report_dir)
        report.save(report_dir / "report.json")
    return report
