"""Does the registry hold what the ledger says was registered? Checked before anything reads one to change
the other.

The ledger is the durable record of a workspace: each learned, promoted or rejected task names the model
version it became. The registry a configuration points at can be another one (a typo in
``mlflow.tracking_uri``, a new tracking server, an empty database) and then answers "no such version" or
"no champion" for everything: read as the truth, that would reject every promoted task. So before a night
reconciles, and when ``cliploop lineage --verify`` runs, ``check`` compares the two: the registry the ledger
recorded (``Ledger.meta("registry")``) must be this one, and every version the ledger names must exist there
and be of the same task. A mismatch stops with the registry and the missing versions named; nothing is
changed. Moving a workspace to another registry is the explicit ``cliploop move-registry`` (``adopt``).
"""

from __future__ import annotations

from typing import Any

from components.intake.ledger import Ledger
from components.registry.registry import NotFound, Registry, RegistryError
from components.settings.credentials import redact

META_KEY = "registry"
# A task in these states names the registered version it became (the others name none, or an old one).
NAMES_A_VERSION = ("learned", "promoted", "rejected")
MOVING = 'docs/reliability.md, "Moving to another registry"'


class RegistryMismatch(RegistryError):
    """The configured registry does not hold the versions the ledger records. Nothing was changed."""


def describe(registry: Registry) -> dict[str, str]:
    """What the ledger records of a registry: its identity, and for a person the URI (no password) and model."""
    return {"identity": registry.identity, "uri": redact(registry.tracking_uri), "model": registry.model_name}


def _where(doc: dict[str, str]) -> str:
    return f"model {doc['model']!r} at {doc['uri']}"


def _unheld(ledger: Ledger, registry: Registry) -> list[tuple[Any, str | None]]:
    """Each ledger record naming a version the registry lacks (None) or holds as another task (that task)."""
    out = []
    for record in ledger.all():
        if record.state not in NAMES_A_VERSION or not record.model_version:
            continue
        try:
            task = registry.version_tags(int(record.model_version)).get("task_id") or ""
        except NotFound:
            task = None
        if task != record.task_id:
            out.append((record, task))
    return out


def problems(ledger: Ledger, registry: Registry) -> list[str]:
    """Each way the registry disagrees with the ledger, one line each; empty when they agree. Reads only."""
    recorded = ledger.meta(META_KEY)
    out = []
    if recorded is not None and recorded.get("identity") != registry.identity:
        out.append(
            f"this workspace's versions were registered in {_where(recorded)}, but the configuration points at "
            f"{_where(describe(registry))}"
        )
    for record, task in _unheld(ledger, registry):
        version = f"v{record.model_version}"
        if task is None:
            out.append(f"{version} (task {record.task_id}, {record.state}) is missing")
        else:
            out.append(f"{version} is task {task!r} there, not {record.task_id!r} as the ledger says")
    return out


def check(ledger: Ledger, registry: Registry) -> None:
    """Raise ``RegistryMismatch`` when the registry lacks what the ledger says was registered; on agreement,
    record this registry as the workspace's (a ledger from before this check, or a first registration)."""
    found = problems(ledger, registry)
    if found:
        raise RegistryMismatch(
            f"the registry {_where(describe(registry))} does not hold what this workspace's ledger says was "
            "registered; nothing was changed:\n  - "
            + "\n  - ".join(found)
            + f"\nPoint mlflow.tracking_uri / mlflow.registered_model back at the workspace's registry, or move "
            f"the workspace to this one on purpose: `cliploop move-registry` ({MOVING})."
        )
    if ledger.meta(META_KEY) != describe(registry):
        ledger.set_meta(META_KEY, describe(registry))


def plan_move(ledger: Ledger, registry: Registry) -> list[dict[str, Any]]:
    """What ``adopt`` would do: each task whose version this registry lacks (or holds as another task's)."""
    return [
        {
            "task_id": record.task_id,
            "version": record.model_version,
            "from": record.state,
            "to": "validated" if record.state in ("learned", "promoted") else record.state,
        }
        for record, _ in _unheld(ledger, registry)
    ]


def adopt(ledger: Ledger, registry: Registry) -> list[dict[str, Any]]:
    """Make this registry the workspace's. Tasks whose versions it lacks forget them: a learned or promoted
    one is learned again next night (``promoted -> rejected -> validated``, each move recorded with the
    reason); a rejected one stays rejected. Returns the moves made."""
    before = ledger.meta(META_KEY)
    reason = f"moved to the registry {_where(describe(registry))}" + (f" from {_where(before)}" if before else "")
    moves = plan_move(ledger, registry)
    for move in moves:
        detail = {"by": "move-registry", "old_version": move["version"], "registry": describe(registry)}
        if move["from"] == "promoted":
            ledger.transition(move["task_id"], "rejected", expect=["promoted"], reason=reason, detail=detail)
        if move["to"] == "validated":
            ledger.transition(
                move["task_id"],
                "validated",
                expect=["learned", "rejected"],
                reason=reason,
                detail=detail,
                model_version=None,
            )
    forgotten = {m["task_id"]: m for m in moves if m["to"] != "validated"}
    for task_id in forgotten:
        ledger.update(task_id, model_version=None)
    ledger.set_meta(
        META_KEY,
        describe(registry),
        events={t: {"by": "move-registry", "why": reason, "old_version": m["version"]} for t, m in forgotten.items()},
    )
    return moves
