"""The night's order (docs/architecture.md, "The nightly flow"): the pending tasks in arrival order, one at a time,
and the chain stopped at the first task that does not end promoted.

No server: ``chain.pending_tasks`` reads a real SQLite ledger, and ``chain.run_in_order``, the loop the nightly
flow runs its updates through, is given an update that returns what ``continual_update`` returns (its real runs,
with Prefect and MLflow, are tests/test_flows.py's).
"""

from __future__ import annotations

import pytest

from components.intake.ledger import Ledger
from components.pipeline import chain
from components.settings.config_loading import load_config


@pytest.fixture
def cfg(tmp_path):
    return load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)


PATHS = {
    "validated": ["ingested", "validated"],
    "failed": ["ingested", "validated", "learning", "failed"],
    "quarantined": ["ingested", "quarantined"],
    "learning": ["ingested", "validated", "learning"],
    "learned": ["ingested", "validated", "learning", "learned"],
    "promoted": ["ingested", "validated", "learning", "learned", "promoted"],
    "requeued": ["ingested", "validated", "learning", "learned", "rejected", "validated"],
    "rejected": ["ingested", "validated", "learning", "learned", "rejected"],
    "ingested": ["ingested"],
}


def test_pending_tasks_are_the_validated_and_failed_ones_in_arrival_order(cfg, monkeypatch):
    import itertools

    from components.intake import ledger as ledger_module

    ticks = itertools.count()  # a clock that moves at every write: last change and arrival differ in order
    monkeypatch.setattr(ledger_module, "now", lambda: f"2030-01-01T00:{next(ticks):05d}")
    arrivals = [  # (task id, where it ends): ids sort differently from arrival on purpose
        ("t-9", "validated"),
        ("t-z", "requeued"),  # arrived early, rejected, requeued: it keeps its place
        ("t-10", "failed"),  # tried again
        ("t-1", "quarantined"),
        ("t-0", "promoted"),
        ("t-2", "learned"),
        ("t-3", "rejected"),
        ("t-4", "ingested"),
        ("t-a", "validated"),
        ("t-5", "learning"),
        ("t-11", "failed"),
    ]
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        for task_id, _ in arrivals:  # every task arrives before any moves on
            ledger.transition(task_id, "ingested", content_digest=task_id)
        for task_id, end in reversed(arrivals):  # and they are learned in another order still
            for state in PATHS[end][1:]:
                ledger.transition(task_id, state)
    assert chain.pending_tasks(cfg) == ["t-9", "t-z", "t-10", "t-a", "t-11"]


def test_pending_tasks_of_an_empty_ledger(cfg):
    assert chain.pending_tasks(cfg) == []


class Updates:
    """An update per task id giving the outcome continual_update would end with; it records what it was asked."""

    def __init__(self, outcomes: dict[str, str]):
        self.outcomes, self.asked = outcomes, []

    def __call__(self, task_id: str) -> dict:
        self.asked.append(task_id)
        if self.outcomes[task_id] == "raise":
            raise RuntimeError(f"training {task_id} failed")
        return {"task_id": task_id, "version": len(self.asked) + 6, "outcome": self.outcomes[task_id]}


def test_every_task_promoted_runs_the_whole_chain_in_the_order_given():
    update = Updates({"t-b": "promoted", "t-a": "promoted", "t-c": "promoted"})
    results: list[dict] = []
    assert chain.run_in_order(["t-b", "t-a", "t-c"], update, results) is None
    assert update.asked == ["t-b", "t-a", "t-c"]
    assert [(r["task_id"], r["version"]) for r in results] == [("t-b", 7), ("t-a", 8), ("t-c", 9)]


@pytest.mark.parametrize("outcome", ["rejected", "awaiting-review", "timed-out"])
def test_the_chain_stops_after_the_first_version_not_promoted(outcome):
    update = Updates({"t-a": "promoted", "t-b": outcome, "t-c": "promoted", "t-d": "promoted"})
    results: list[dict] = [{"task_id": "earlier", "outcome": "promoted"}]  # what the night had already
    stopped = chain.run_in_order(["t-a", "t-b", "t-c", "t-d"], update, results)
    assert stopped == f"version 8 (t-b) is {outcome}"
    assert update.asked == ["t-a", "t-b"]  # t-c would build on a champion no one reviewed: next night
    assert [(r["task_id"], r["outcome"]) for r in results] == [
        ("earlier", "promoted"),
        ("t-a", "promoted"),
        ("t-b", outcome),
    ]


def test_a_first_task_not_promoted_stops_at_once_and_a_failure_stops_it_too():
    update = Updates({"t-a": "rejected", "t-b": "promoted"})
    results: list[dict] = []
    assert chain.run_in_order(["t-a", "t-b"], update, results) == "version 7 (t-a) is rejected"
    assert update.asked == ["t-a"] and len(results) == 1

    failing = Updates({"t-a": "promoted", "t-b": "raise", "t-c": "promoted"})
    results = []
    with pytest.raises(RuntimeError, match="training t-b failed"):
        chain.run_in_order(["t-a", "t-b", "t-c"], failing, results)
    assert failing.asked == ["t-a", "t-b"] and [r["task_id"] for r in results] == ["t-a"]
    assert chain.run_in_order([], failing, results) is None
