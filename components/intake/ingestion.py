"""Ingest a task drop into the workspace: stage → validate → accept (DVC + git) or quarantine.

The drop is read once: every listed image is hashed, probed and packed into shards in a staging
folder on the workspace's disk. Only a valid task moves into ``data/tasks/<task_id>/`` (one rename),
after which ``data/`` is re-added to DVC, ``data.dvc`` is committed and pushed. An invalid task is
moved to ``.cliploop/quarantine/<task_id>/`` with its report; ``data/``, ``data.dvc``, the git history
and the other ledger entries are untouched.

Re-running is safe at every point: the same payload is a no-op; a crash after the rename is finished
on the next run (the ledger still says ``ingested``); a changed payload under an accepted id is refused.

The workspace's layout and set-up are in :mod:`components.intake.workspace`; validating without ingesting
(``cliploop validate``) is in :mod:`components.intake.drop_check`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from components.intake import ledger as ledger_mod
from components.intake import tasks, versioning
from components.intake.images import SUFFIX
from components.intake.label_doubt import LabelScorer, check_labels
from components.intake.ledger import Ledger, TaskRecord
from components.intake.shards import ShardReader, ShardWriter, read_index, write_index
from components.intake.tasks import DropError, fallback_task_id, open_drop, read_metadata
from components.intake.validation import TaskContext, content_digest, scan_images, validate
from components.intake.validation_report import Report, report_for_drop_error
from components.intake.workspace import ensure_workspace, open_ledger, remote_spec, s3_settings, workspace_paths
from components.settings.config import Config
from components.support import storage


class IngestRefused(RuntimeError):
    """The drop conflicts with what the ledger already holds; nothing was changed."""


@dataclass
class Outcome:
    task_id: str
    status: str  # accepted | quarantined | unchanged | resumed
    state: str
    message: str
    report_path: str | None = None
    record: TaskRecord | None = None
    report: Report | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state not in ("quarantined",)


# ---- ingest --------------------------------------------------------------------------------------


def ingest(location: str, config: Config, scorer: LabelScorer | None = None) -> Outcome:
    """``scorer``: the model that scores the training labels (``validation.label_doubt``; none: not checked)."""
    paths = workspace_paths(config)
    if not (paths["ws"] / ".dvc").exists() or not (paths["ws"] / "data.dvc").exists():
        ensure_workspace(config)
    source = open_drop(config.location(location), s3_settings(config))
    checked_at = ledger_mod.now()
    paths["staging"].mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="stage-", dir=paths["staging"]))
    try:
        with open_ledger(config) as ledger:
            return _ingest(source, config, ledger, staging, paths, checked_at, scorer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ingest(
    source, config: Config, ledger: Ledger, staging: Path, paths: dict[str, Path], checked_at: str, scorer
) -> Outcome:
    try:
        spec, manifest, spec_bytes, manifest_bytes = read_metadata(source)
    except DropError as exc:
        task_id = fallback_task_id(source)
        report = report_for_drop_error(task_id, source.location, exc, checked_at)
        return _quarantine(
            task_id,
            None,
            source,
            report,
            staging,
            ledger,
            paths,
            config,
            digest=storage.sha256_bytes(str(exc).encode()),
        )

    task_id = spec.task_id
    shard_dir = staging / "task" / "shards"
    writer = ShardWriter(shard_dir, config.shards.target_mb * 1024 * 1024)
    facts = scan_images(source, manifest, config.validation, sink=writer.add)
    located = writer.close()
    digest = content_digest(spec_bytes, manifest_bytes, facts)

    existing = ledger.get(task_id)
    if existing is not None and existing.content_digest == digest:
        if existing.state == "ingested" and (paths["tasks"] / task_id / "index.csv").exists():
            return _resume(existing, config, ledger, paths)  # a crash interrupted the last run: finish it
        if existing.state != "ingested":
            return Outcome(
                task_id,
                "unchanged",
                existing.state,
                f"task {task_id} was already ingested with this exact content (state: {existing.state}); nothing to do",
                existing.report,
                existing,
            )
    elif existing is not None and existing.state != "quarantined":
        raise IngestRefused(
            f"task {task_id} is already in the ledger (state {existing.state}) with different content "
            f"(recorded digest {existing.content_digest[:12]}…, this drop {digest[:12]}…). A task's data is never "
            f"overwritten: drop the new data under a new task id."
        )

    ctx = TaskContext.from_ledger(ledger, spec.dataset, task_id, facts)
    task_dir = staging / "task"
    reports_dir = staging / "reports"
    with ShardReader(shard_dir) as shards:  # the accepted images, read back from the staged shards
        doubts = check_labels(
            spec,
            facts,
            lambda f: shards.read(located[f"{f.sha256}{SUFFIX[f.format]}"], f.sha256),
            scorer,
            config.validation,
        )
    report = validate(
        spec,
        manifest,
        facts,
        config.validation,
        ctx,
        source=source.location,
        checked_at=checked_at,
        digest=digest,
        docs_dir=reports_dir / "data_docs",
        doubts=doubts,
    )
    fields = dict(
        content_digest=digest,
        source=source.location,
        scenario=spec.scenario,
        dataset=spec.dataset,
        domain=spec.domain,
        classes=spec.class_names,
        n_train=report.stats.get("train"),
        n_test=report.stats.get("test"),
    )
    if not report.success:
        return _quarantine(
            task_id,
            spec_bytes,
            source,
            report,
            staging,
            ledger,
            paths,
            config,
            digest=digest,
            manifest_bytes=manifest_bytes,
            fields=fields,
        )

    # Valid. data/tasks/<id>/ holds only the task's content, so its DVC hash depends on nothing else;
    # the report, data docs and resolved config go to data/reports/<id>/, versioned in the same commit.
    storage.atomic_write_bytes(task_dir / "task.yaml", spec_bytes)
    storage.atomic_write_bytes(task_dir / "manifest.csv", manifest_bytes)
    write_index(task_dir / "index.csv", _index_rows(facts, located))
    config.write_resolved(reports_dir)
    final_dir, final_reports = paths["tasks"] / task_id, paths["reports"] / task_id
    report.data_docs = _relocate(report.data_docs, reports_dir, final_reports)
    report.save(reports_dir / "report.json")

    # Reports first, task last: the task folder's presence means "complete". Leftovers of a crash before
    # the ledger entry was written are replaced, never trusted.
    for staged, final in ((reports_dir, final_reports), (task_dir, final_dir)):
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
    if existing is not None and existing.state == "ingested":
        # Recorded, but its folder vanished (removed by hand after a crash): laid out again from the drop.
        record = ledger.update(task_id, report=str(final_reports / "report.json"), **fields)
    else:
        record = ledger.transition(
            task_id,
            "ingested",
            expect=[None] if existing is None else ["quarantined"],
            detail={"source": source.location},
            report=str(final_reports / "report.json"),
            attempts=(existing.attempts + 1) if existing else 1,
            **fields,
        )
    return _warned(_finish_accept(record, config, ledger, paths, facts), report)


def _page(report_json: str | None) -> str | None:
    """The report a reviewer opens: report.html beside report.json (it renders offline)."""
    return str(Path(report_json).with_name("report.html")) if report_json else None


def _warned(outcome: Outcome, report: Report) -> Outcome:
    """An accepted task's warnings (label-doubt) in its message: named on the first line, which the night's
    summary shows, and said in full after it."""
    warned = [r for r in report.rules if r.warning]
    if warned:
        first, _, rest = outcome.message.partition("\n")
        names = ", ".join(r.rule for r in warned)
        lines = [
            f"{first}; WARNING {names} (report: {_page(outcome.report_path)})",
            *[f"  ! [{r.rule}] {r.warning}" for r in warned],
        ]
        outcome.message = "\n".join([*lines, rest] if rest else lines)
    return outcome


def _resume(record: TaskRecord, config: Config, ledger: Ledger, paths: dict[str, Path]) -> Outcome:
    final_dir = paths["tasks"] / record.task_id
    digests = [(row["sha256"], row["split"]) for row in read_index(final_dir / "index.csv")]
    outcome = _finish_accept(record, config, ledger, paths, None, digests=digests)
    outcome.status = "resumed"
    return outcome


def _finish_accept(
    record: TaskRecord,
    config: Config,
    ledger: Ledger,
    paths: dict[str, Path],
    facts,
    digests: list[tuple[str, str]] | None = None,
) -> Outcome:
    ws = paths["ws"]
    versioning.configure_remote(ws, remote_spec(config))
    data_md5 = versioning.track_data(ws)
    task_md5 = versioning.task_md5(ws, record.task_id, data_md5)
    commit = versioning.commit(
        ws, f"cliploop: ingest task {record.task_id} (dvc {task_md5})", ["data.dvc", ".gitignore", ".dvc/config"]
    )
    if config.dvc.push:
        versioning.push(ws, s3_settings(config), config.dvc.transfer_timeout_s)
    if digests is None:
        digests = [(f.sha256, f.split) for f in facts if f.sha256 and f.split]
    ledger.record_images(record.task_id, digests)
    record = ledger.transition(
        record.task_id,
        "validated",
        expect=["ingested"],
        detail={"dvc_md5": task_md5, "workspace_commit": commit, "data_md5": data_md5},
        dvc_md5=task_md5,
        workspace_commit=commit,
    )
    return Outcome(
        record.task_id,
        "accepted",
        record.state,
        f"task {record.task_id} accepted: {record.n_train} train / {record.n_test} test images, "
        f"{len(record.classes)} classes; DVC hash {task_md5}; commit {commit[:12] if commit else '?'}"
        + ("; pushed to the DVC remote" if config.dvc.push else ""),
        record.report,
        record,
    )


def _quarantine(
    task_id: str,
    spec_bytes: bytes | None,
    source,
    report: Report,
    staging: Path,
    ledger: Ledger,
    paths: dict[str, Path],
    config: Config,
    digest: str,
    manifest_bytes: bytes | None = None,
    fields: dict | None = None,
) -> Outcome:
    existing = ledger.get(task_id)
    if existing is not None and existing.state != "quarantined":
        raise IngestRefused(
            f"task {task_id} is already in the ledger (state {existing.state}); this drop under the same id is invalid "
            f"and was not ingested:\n{report.summary()}"
        )
    if existing is not None and existing.content_digest == digest:
        return Outcome(
            task_id,
            "unchanged",
            "quarantined",
            f"task {task_id} was already quarantined with this exact content; report: {existing.report}",
            existing.report,
            existing,
        )
    target = paths["quarantine"] / task_id
    kept = staging / "quarantined"
    kept.mkdir(parents=True, exist_ok=True)
    if spec_bytes is not None:
        storage.atomic_write_bytes(kept / "task.yaml", spec_bytes)
    if manifest_bytes is not None:
        storage.atomic_write_bytes(kept / "manifest.csv", manifest_bytes)
    reports_dir = staging / "reports"  # where validation left the data docs
    reports_dir.mkdir(parents=True, exist_ok=True)
    os.replace(reports_dir, kept / "validation")
    config.write_resolved(kept / "validation")
    report.data_docs = _relocate(report.data_docs, reports_dir, target / "validation")
    report.save(kept / "validation" / "report.json")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(kept, target)
    report_path = str(target / "validation" / "report.json")
    fields = dict(fields or {}, content_digest=digest, source=source.location)
    failed = ", ".join(r.rule for r in report.failed_rules)
    if existing is None:
        ledger.transition(
            task_id, "ingested", expect=[None], detail={"source": source.location}, report=report_path, **fields
        )
    else:
        ledger.transition(
            task_id,
            "ingested",
            expect=["quarantined"],
            detail={"source": source.location},
            report=report_path,
            attempts=existing.attempts + 1,
            **fields,
        )
    record = ledger.transition(
        task_id, "quarantined", expect=["ingested"], detail={"failed_rules": failed}, reason=f"failed: {failed}"
    )
    return Outcome(task_id, "quarantined", "quarantined", report.summary(), report_path, record, report)


def _relocate(path: str | None, old_root: Path, new_root: Path) -> str | None:
    if not path:
        return None
    try:
        return str(new_root / Path(path).relative_to(old_root))
    except ValueError:
        return path


def _index_rows(facts, located) -> list[dict]:
    rows = []
    for f in facts:
        where = located[f"{f.sha256}{SUFFIX[f.format]}"]
        rows.append(
            {
                "path": f.path,
                "label": f.label,
                "split": f.split,
                "domain": f.domain,
                "sha256": f.sha256,
                "shard": where.shard,
                "offset": where.offset,
                "size": where.size,
                "format": f.format,
                "width": f.width,
                "height": f.height,
            }
        )
    return rows


# ---- the drops a location holds ----------------------------------------------------------------


def drop_locations(location: str, config: Config, warn: Callable[[str], None] | None = None) -> list[str]:
    """A task drop is itself; a drop zone (no task.yaml at its root) yields its task drops, in name order.

    ``warn`` hears about entries that are not followed (symbolic links; see :func:`tasks.discover`)."""
    if storage.is_s3(location):
        source = tasks.S3Drop(location, s3_settings(config))
        if source.exists("task.yaml"):
            return [location]
        return tasks.discover(location, s3_settings(config))
    path = Path(location)
    if not path.is_dir():
        raise tasks.DropError("drop-exists", f"{location}: no such folder")
    if (path / "task.yaml").exists() or (path / "manifest.csv").exists():
        return [str(path)]
    return tasks.discover(str(path), warn=warn)
