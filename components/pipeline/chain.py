"""The chain's state: which tasks wait, which version is the champion, and the ledger moves a night makes
(the chain lock, reconcile, pending tasks, head, start/fail learning). Decisions on a version (gate, review,
rollback, requeue) live in ``components/pipeline/review.py``, which builds on the helpers here.

Consistency rules (``docs/contracts.md``, "A task's life in the ledger"):

- the ledger moves ``validated|failed -> learning -> learned -> promoted|rejected``; a failure anywhere
  moves ``learning -> failed`` with the reason, and the champion alias is only ever moved by
  ``review.decide``/``review.rollback`` under the registry lock, as a compare-and-set;
- ``reconcile`` runs first every night and makes the ledger agree with the registry: an alias moved by
  hand in the MLflow UI is honoured (the champion's chain is the truth), a rollback rejects the tasks it
  removed, a ``learning`` entry left by a dead process (we hold the chain lock, so nobody else is
  learning) becomes ``failed``; an unreachable registry raises (retried), it never reads as "absent";
- one nightly run per chain at a time: ``chain_lock`` is an OS file lock, released by the kernel when its
  process dies, so a crashed or killed run never blocks the next night (no zombie locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.intake.ledger import Ledger, TaskRecord
from components.settings.config import Config


class PipelineError(RuntimeError):
    pass


class ChainBusy(PipelineError):
    """Another run holds this chain (one nightly run per registered model at a time)."""


def ledger_of(config: Config) -> Ledger:
    from components.intake.workspace import open_ledger

    return open_ledger(config)


def registry_of(config: Config):
    from components.registry.registry import from_config

    return from_config(config)


def runtime_dir(config: Config) -> Path:
    path = config.workspace_path / ".cliploop"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def chain_lock(config: Config) -> Iterator[None]:
    """Hold the chain of ``mlflow.registered_model`` for one run; raises ChainBusy when another run holds it."""
    locks = runtime_dir(config) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"chain-{config.mlflow.registered_model}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ChainBusy(
                f"the chain {config.mlflow.registered_model!r} is being updated by {holder}; "
                f"this run leaves it alone (lock: {path})"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def chain_tasks(registry, version: int | None) -> list[str]:
    """Task ids learned along a version's chain (its parent tags), oldest first."""
    out, seen = [], set()
    while version is not None and version not in seen:
        seen.add(version)
        tags = registry.version_tags(version)
        out.append(tags.get("task_id"))
        parent = tags.get("parent_version", "")
        version = int(parent) if str(parent).isdigit() else None
    return [t for t in reversed(out) if t]


def reconcile(config: Config) -> list[str]:
    """Make the ledger agree with the registry before a night starts; returns what changed, one line each.

    First the registry must be the one the ledger's versions live in (``registry_check``): another or an
    empty one would read as "every version gone" and reject every promoted task. It raises, changing nothing."""
    from components.registry import registry_check

    registry = registry_of(config)
    with ledger_of(config) as ledger:
        registry_check.check(ledger, registry)
    champion = registry.alias("champion")
    in_chain = set(chain_tasks(registry, champion))
    changes = []
    with ledger_of(config) as ledger:
        for record in ledger.all():
            if record.state == "learning":
                _fail_learning(
                    ledger,
                    record,
                    "interrupted: the run learning it stopped without finishing (process or machine died)",
                    detail={"by": "reconcile"},
                )
                changes.append(f"{record.task_id}: learning -> failed (interrupted run)")
            elif record.state == "learned" and record.task_id in in_chain:
                ledger.transition(
                    record.task_id,
                    "promoted",
                    expect=["learned"],
                    detail={"by": "reconcile", "why": f"champion v{champion} contains it"},
                )
                changes.append(f"{record.task_id}: learned -> promoted (champion v{champion} was set in the registry)")
            elif record.state == "learned" and record.model_version:
                tags = version_tags_or_none(registry, record.model_version)
                review = (tags or {}).get("review")
                parent = (tags or {}).get("parent_version", "")
                if review in ("rejected", "rolled-back"):
                    ledger.transition(
                        record.task_id,
                        "rejected",
                        expect=["learned"],
                        reason=tags.get("review_note"),
                        detail={"by": "reconcile"},
                    )
                    changes.append(f"{record.task_id}: learned -> rejected (review of v{record.model_version})")
                elif tags is None or parent != (str(champion) if champion is not None else ""):
                    # Learned on top of a model that is no longer the champion: learn it again on the new one,
                    # unless a reviewer decided on it (or the champion moved) since we read it.
                    if (
                        tags is not None
                        and review in ("pending", "timed-out")
                        and not registry.supersede(int(record.model_version), {"review": review, "champion": champion})
                    ):
                        continue
                    ledger.transition(
                        record.task_id,
                        "validated",
                        expect=["learned"],
                        reason=f"re-queued: v{record.model_version} was learned on v{parent or 'base'}, "
                        f"the champion is now v{champion}",
                        detail={"by": "reconcile"},
                    )
                    changes.append(f"{record.task_id}: learned -> validated (champion moved; learn it again)")
            elif record.state == "promoted" and record.task_id not in in_chain:
                ledger.transition(
                    record.task_id,
                    "rejected",
                    expect=["promoted"],
                    reason=f"rolled back: champion v{champion} does not contain it",
                    detail={"by": "reconcile"},
                )
                changes.append(f"{record.task_id}: promoted -> rejected (not in champion v{champion}'s chain)")
    return changes


def version_tags_or_none(registry, version) -> dict[str, str] | None:
    """The version's tags; None only when it does not exist (deleted by hand). An outage raises: a night
    must never read "the registry did not answer" as "the version is gone"."""
    from components.registry.registry import NotFound

    try:
        return registry.version_tags(int(version))
    except NotFound:
        return None


def awaiting_review(config: Config) -> list[dict[str, Any]]:
    """Learned tasks whose version still waits for a reviewer and still extends the champion."""
    registry = registry_of(config)
    champion = registry.alias("champion")
    out = []
    with ledger_of(config) as ledger:
        for record in ledger.all():
            if record.state != "learned" or not record.model_version:
                continue
            tags = version_tags_or_none(registry, record.model_version) or {}
            if tags.get("parent_version", "") == (str(champion) if champion is not None else ""):
                out.append(
                    {
                        "task_id": record.task_id,
                        "version": int(record.model_version),
                        "gate": tags.get("gate"),
                        "review": tags.get("review"),
                    }
                )
    return out


def stored_tasks(config: Config) -> list[TaskRecord]:
    """Every task whose data the workspace holds under a DVC hash (accepted, in any state since)."""
    with ledger_of(config) as ledger:
        return [r for r in ledger.all() if r.dvc_md5 and r.state != "quarantined"]


def pending_tasks(config: Config) -> list[str]:
    """Tasks to learn tonight, in arrival order: validated ones, and failed ones (tried again)."""
    with ledger_of(config) as ledger:
        return [r.task_id for r in sorted(ledger.all(), key=lambda r: r.seq) if r.state in ("validated", "failed")]


def run_in_order(
    task_ids: list[str], update: Callable[[str], dict[str, Any]], updates: list[dict[str, Any]]
) -> str | None:
    """Take ``task_ids`` one at a time with ``update`` (a task id -> its result: ``version``, ``outcome``), adding
    each result to ``updates``, and stop at the first that does not end ``promoted``: the next task must build on
    a reviewed champion. Returns why it stopped (None: every one was promoted); an exception from ``update``
    stops it too, and is the caller's."""
    for task_id in task_ids:
        result = update(task_id)
        updates.append(result)
        if result["outcome"] != "promoted":
            return f"version {result['version']} ({task_id}) is {result['outcome']}"
    return None


def head(config: Config) -> dict[str, Any]:
    """The version the next update starts from (the champion, whoever set it) and its tasks."""
    registry = registry_of(config)
    champion = registry.alias("champion")
    return {"version": champion, "tasks": chain_tasks(registry, champion)}


def task_record(config: Config, task_id: str) -> TaskRecord:
    with ledger_of(config) as ledger:
        record = ledger.get(task_id)
    if record is None:
        raise PipelineError(f"task {task_id!r} is not in the ledger (ingest it first)")
    return record


def move_task(
    config: Config, task_id: str, allowed: tuple[str, ...], target: str, refusal: str, fields=lambda record: {}
) -> dict[str, Any]:
    """Move a task from one of ``allowed`` states to ``target`` atomically, or say why it cannot.

    ``fields``: the record -> the ledger fields to set with the transition (returned too)."""
    with ledger_of(config) as ledger:
        record = ledger.get(task_id)
        if record is None:
            raise PipelineError(f"task {task_id!r} is not in the ledger")
        if record.state not in allowed:
            raise PipelineError(f"task {task_id} is {record.state}; {refusal}")
        values = fields(record)
        ledger.transition(task_id, target, expect=[record.state], **values)
    return values


def start_learning(config: Config, task_id: str) -> dict[str, Any]:
    values = move_task(
        config,
        task_id,
        ("validated", "failed"),
        "learning",
        "it is not waiting to be learned",
        lambda r: {"attempts": r.attempts + 1 if r.state == "failed" else r.attempts, "reason": None},
    )
    return {"task_id": task_id, "attempts": values["attempts"]}


def mark_failed(config: Config, task_id: str, reason: str) -> None:
    with ledger_of(config) as ledger:
        record = ledger.get(task_id)
        if record is not None and record.state == "learning":
            ledger.transition(task_id, "failed", expect=["learning"], reason=reason[:2000])


def interrupted(config: Config, signum: int) -> list[str]:
    """The night was stopped by a signal and did not unwind: its ``learning`` tasks become ``failed``."""
    import signal

    reason = f"interrupted by {signal.Signals(signum).name}: the night was stopped before this task finished"
    with ledger_of(config) as ledger:
        learning = [r for r in ledger.all() if r.state == "learning"]
        for record in learning:
            _fail_learning(ledger, record, reason)
    return [r.task_id for r in learning]


def _fail_learning(ledger: Ledger, record: TaskRecord, reason: str, detail: dict | None = None) -> None:
    """A task left ``learning`` by a run that will not finish it becomes ``failed`` (tried again next night)."""
    ledger.transition(record.task_id, "failed", expect=["learning"], reason=reason, detail=detail)
