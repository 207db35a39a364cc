"""Review: every decision on a registered version (the gate's verdict, a reviewer's approve or reject, a
timed-out wait, a rollback, a re-queue) and the ledger move that follows it.

Kept apart from ``components/pipeline/chain.py`` (the chain's state: lock, reconcile, pending tasks, head, the
``learning`` moves) because review changes with promotion policy, not with how a night walks the ledger. It
builds on the chain's helpers; the chain never imports it. The champion alias is only ever moved here
(``decide``/``rollback``), under the registry lock, as a compare-and-set (``docs/contracts.md``, "A task's
life in the ledger").

A decision can also be taken in MLflow itself (``docs/pipeline.md``, "Reviewing in MLflow"):
``registry_decision`` reads it for a waiting run, which applies it with ``decide`` like any other; an alias
moved by hand when no one was waiting is recorded by ``record_manual_alias`` as ``review=manual-alias``.
"""

from __future__ import annotations

import json
from typing import Any

from components.pipeline.chain import (
    PipelineError,
    ledger_of,
    move_task,
    reconcile,
    registry_of,
    version_tags_or_none,
)
from components.registry.registry_runs import PROMOTED, UNDECIDED
from components.settings.config import Config

REVIEWER_GATE = "cliploop-gate"
REVIEWER_AUTO = "cliploop-auto-promote"
REVIEWER_UNKNOWN = "unknown"  # MLflow does not record who moved an alias or set a tag


def champion_row(registry, exclude: int | None = None) -> dict[str, float] | None:
    """The champion's accuracy per task (its run's ``acc.<task>`` metrics)."""
    champion = registry.alias("champion")
    if champion is None or champion == exclude:
        return None
    metrics = registry.run_metrics(champion)
    return {k[len("acc.") :]: v for k, v in metrics.items() if k.startswith("acc.")}


def apply_gate(config: Config, version: int, update: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict as version tags; a failing version is rejected (its task can be re-queued)."""
    from components.registry.gate import evaluate_gate

    registry = registry_of(config)
    verdict = evaluate_gate(
        config.gate, update["metrics"], update["final_row"], update["task_id"], champion_row(registry, exclude=version)
    )
    registry.set_tags(version, {"gate": verdict.verdict, "gate_reasons": json.dumps(verdict.reasons)})
    registry.write_review_page(version, verdict.to_dict())
    doc = verdict.to_dict() | {"version": version, "markdown": verdict.markdown(f"Promotion gate, version {version}")}
    if not verdict.passed:
        decide(config, version, "reject", REVIEWER_GATE, "; ".join(verdict.reasons))
    return doc


def decide(
    config: Config, version: int, decision: str, reviewer: str, note: str = "", override_gate: bool = False
) -> dict[str, Any]:
    """Apply a review decision (``approve`` or ``reject``) to a version and its task; a repeat is a no-op.

    The one place a decision is applied, wherever it was taken (``cliploop approve|reject``, the Prefect UI,
    MLflow: see ``registry_decision``). The decision is made on what is read here and applied as a
    compare-and-set under the registry lock: if another reviewer, the gate or a rollback changed the
    version's review or the champion in between, it raises ``PipelineError`` saying so and changes nothing
    (two reviewers racing never both "win")."""
    from components.registry.registry import DecisionConflict, RegistryError
    from components.support.faults import fault_point

    if decision not in ("approve", "reject"):
        raise PipelineError(f"unknown decision {decision!r} (approve or reject)")
    if not reviewer:
        raise PipelineError("a decision needs a reviewer name")
    registry = registry_of(config)
    tags = version_tags_or_none(registry, version)
    if tags is None:
        raise PipelineError(f"model {registry.model_name!r} has no version {version}")
    task_id, review = tags.get("task_id"), tags.get("review")
    champion = registry.alias("champion")
    expect = {"review": review, "champion": champion}
    recorded = bool(tags.get("review_at"))  # cliploop applied it (a review tag set by hand has no review_at)
    if decision == "approve":
        if champion == version and review in ("approved", "auto") and recorded:
            return {"version": version, "decision": "approve", "changed": False, "previous": None}
        if tags.get("gate") == "fail" and not override_gate:
            raise PipelineError(
                f"version {version} failed the gate ({tags.get('gate_reasons')}); "
                f"approve it anyway with --override-gate"
            )
        parent = tags.get("parent_version", "")
        if champion != version:  # else: the alias was moved to it by hand, and the record catches up
            gate_only = review == "rejected" and tags.get("reviewer") == REVIEWER_GATE and override_gate
            if review in ("rejected", "rolled-back", "superseded") and not gate_only:
                raise PipelineError(
                    f"version {version} was {review} by {tags.get('reviewer') or 'someone'}"
                    f"{': ' + tags['review_note'] if tags.get('review_note') else ''}; it cannot be "
                    f"approved. `cliploop requeue {task_id}` learns the task again on the champion."
                )
            if parent != (str(champion) if champion is not None else ""):
                raise PipelineError(
                    f"version {version} was learned on top of v{parent or ' (base model)'} but the "
                    f"champion is now {'v' + str(champion) if champion else 'unset'}: promoting it would "
                    f"drop what the champion learned since. The next night learns task {task_id} again "
                    f"on the champion (or run `cliploop requeue {task_id}`)."
                )
        fault_point("after_decision_read")
        value = "auto" if reviewer == REVIEWER_AUTO else "approved"
        try:
            previous = registry.promote(
                version, reviewer, note, expect=expect, review=value, parent=int(parent) if parent.isdigit() else None
            )
        except DecisionConflict as exc:
            raise PipelineError(f"approval of version {version} lost a race: {exc}") from None
        _ledger_after_review(config, task_id, version, "promoted", note)
        return {"version": version, "decision": "approve", "changed": True, "previous": previous}
    if review == "rejected" and recorded:
        return {"version": version, "decision": "reject", "changed": False}
    fault_point("after_decision_read")
    try:
        registry.reject(version, reviewer, note, expect=expect)
    except DecisionConflict as exc:
        raise PipelineError(f"rejection of version {version} lost a race: {exc}") from None
    except RegistryError as exc:
        raise PipelineError(str(exc)) from None
    _ledger_after_review(config, task_id, version, "rejected", note)
    return {"version": version, "decision": "reject", "changed": True}


def _ledger_after_review(config: Config, task_id: str | None, version: int, to_state: str, note: str) -> None:
    if not task_id:
        return
    with ledger_of(config) as ledger:
        record = ledger.get(task_id)
        # A gate-rejected version approved with --override-gate moves its task from rejected.
        sources = ["learned", "rejected"] if to_state == "promoted" else ["learned"]
        if record is not None and record.state in sources and record.model_version == str(version):
            ledger.transition(task_id, to_state, expect=sources, reason=note or None, detail={"version": version})


def pause_key(config: Config, version: int) -> str:
    """The key a flow run waiting for ``version``'s review pauses under. It names the registered model and its
    tracking store as well as the version: runs of several workspaces share one Prefect server, and each
    chain numbers its versions from 1, so a decision must find the run of its own registry only."""
    return f"{pause_prefix(config)}{version}"


def pause_prefix(config: Config) -> str:
    """What every pause key of this registry's reviews starts with (the version number follows)."""
    return f"review-{registry_of(config).identity}-v"


def review_requested(config: Config, version: int) -> None:
    """The version waits for a reviewer (tagged ``pending``: a wait resumed on a later night finds it)."""
    registry_of(config).set_review_if(version, "pending", (None, "pending", "timed-out"))


def review_outcome(config: Config, version: int) -> str:
    """promoted | rejected | awaiting-review, from the version's review tag."""
    review = registry_of(config).version_tags(version).get("review")
    return "promoted" if review in PROMOTED else {"rejected": "rejected"}.get(review, "awaiting-review")


def review_timed_out(config: Config, version: int) -> bool:
    """No decision came in time: the version stays challenger, tagged ``timed-out``. False if decided meanwhile."""
    return registry_of(config).set_review_if(version, "timed-out", (None, "pending"))


def rollback(config: Config, reviewer: str, note: str = "", expect_champion: int | None = None) -> dict[str, Any]:
    """previous-champion becomes champion again; the tasks only the demoted version knew become rejected."""
    from components.registry.registry import RegistryError

    registry = registry_of(config)
    try:
        restored, demoted = registry.rollback(reviewer, note, expect_champion=expect_champion)
    except RegistryError as exc:
        raise PipelineError(str(exc)) from None
    changes = reconcile(config)
    return {"restored": restored, "demoted": demoted, "ledger": changes}


def requeue(config: Config, task_id: str) -> dict[str, Any]:
    """A rejected task (or a learned one whose version went stale) is learned again next night."""
    move_task(
        config,
        task_id,
        ("rejected", "learned"),
        "validated",
        "only rejected or learned tasks can be re-queued",
        lambda r: {"reason": "re-queued by an operator"},
    )
    return {"task_id": task_id, "state": "validated"}


def registry_decision(config: Config, version: int) -> dict[str, str] | None:
    """A decision on a waiting version taken in MLflow (UI or client), as the answer a reviewer gives the
    paused run (decision, reviewer, note); None while there is none.

    ``champion`` moved to the version approves it; its ``cliploop.review`` tag set to ``approved`` or
    ``rejected`` decides it, with ``cliploop.reviewer`` and ``cliploop.review_note`` if set (else the
    reviewer is ``unknown``). A decision cliploop recorded already reads back the same way (``decide``
    then does nothing)."""
    registry = registry_of(config)
    tags = version_tags_or_none(registry, version)
    if tags is None:
        return None
    reviewer = tags.get("reviewer") or REVIEWER_UNKNOWN
    # The alias first: it is what serving loads, whatever a tag says.
    if registry.alias("champion") == version:
        note = tags.get("review_note") or "the champion alias was moved to it in MLflow"
        return {"decision": "approve", "reviewer": reviewer, "note": note}
    review = (tags.get("review") or "").strip().lower()
    decision = {"approved": "approve", "approve": "approve", "rejected": "reject", "reject": "reject"}.get(review)
    if decision is None:
        return None
    return {"decision": decision, "reviewer": reviewer, "note": tags.get("review_note") or ""}


def record_manual_alias(config: Config, waiting: bool = True) -> list[str]:
    """Versions that hold, or held, ``champion`` without a decision (the alias moved by hand in MLflow while
    no run waited for them) are tagged ``review=manual-alias``, reviewer ``unknown``, ``review_at`` when this
    noticed it; returns one line per version. Called at the start of a night and by ``cliploop lineage``.

    ``waiting``: a ``pending`` version may have a run waiting for it that will record the move as an
    approval; a night (holding the chain lock: no run of this chain waits) passes False."""
    registry = registry_of(config)
    version, seen, head, lines = registry.alias("champion"), set(), True, []
    while version is not None and version not in seen:
        seen.add(version)
        tags = version_tags_or_none(registry, version) or {}
        review = tags.get("review")
        # The champion itself had to be decided; an ancestor once held the alias (a night learned on it).
        undecided = review not in PROMOTED if head else review in UNDECIDED
        if undecided and not (waiting and review == "pending"):
            reviewer = (tags.get("reviewer") if review in UNDECIDED else None) or REVIEWER_UNKNOWN
            note = f"the champion alias was moved to it by hand, without a review (review was {review or 'unset'})"
            if registry.mark_manual_alias(version, review, reviewer, note):
                lines.append(f"v{version}: champion without a review (alias moved by hand): review=manual-alias")
        parent = tags.get("parent_version", "")
        version, head = (int(parent) if parent.isdigit() else None), False
    return lines


def record_registry_changes(config: Config) -> list[str]:
    """What was decided in MLflow while no run waited, recorded at the start of a night (under the chain lock:
    no run of this chain waits for a review now): a champion no one decided becomes ``manual-alias``, and a
    challenger whose ``cliploop.review`` tag was set to ``rejected`` by hand is rejected by ``decide`` (its
    alias, ``review_at``; ``reconcile`` has moved its task already). An ``approved`` tag is applied when the
    night asks for the challenger's review again."""
    lines = record_manual_alias(config, waiting=False)
    registry = registry_of(config)
    version = registry.alias("challenger")
    tags = version_tags_or_none(registry, version) if version is not None else None
    if tags is None or tags.get("review_at"):
        return lines
    answer = registry_decision(config, version)
    if answer is not None and answer["decision"] == "reject":
        try:
            decide(config, version, "reject", answer["reviewer"], answer["note"])
            lines.append(f"v{version}: rejected in MLflow by {answer['reviewer']}: recorded")
        except PipelineError as exc:  # e.g. a reviewer's race: reported, the night goes on
            lines.append(f"v{version}: its rejection in MLflow could not be recorded: {exc}")
    return lines
