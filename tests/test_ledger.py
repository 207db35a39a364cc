"""The task ledger (``components/intake/ledger.py``) against its documented contract: docs/contracts.md, "A task's
life in the ledger". Every (from, to) pair of states goes through a real SQLite ledger: the documented moves are
made, every other one is refused and changes nothing."""

from __future__ import annotations

import pytest

from components.intake.ledger import IllegalTransition, Ledger, LedgerError

# The table of docs/contracts.md, transcribed by hand (None: a task the ledger does not know yet, "(new)").
DOCUMENTED = {
    None: {"ingested"},
    "ingested": {"validated", "quarantined"},
    "quarantined": {"ingested"},  # a corrected payload under the same id
    "validated": {"learning"},
    "failed": {"learning"},
    "learning": {"learned", "failed"},
    # promoted, rejected: the review; validated: supersede or requeue; learning: allowed, no code path today
    "learned": {"promoted", "rejected", "validated", "learning"},
    "promoted": {"rejected", "learning"},  # rejected: a rollback
    "rejected": {"validated", "promoted", "learning"},  # validated: requeue; promoted: --override-gate
}
STATES = ["ingested", "validated", "quarantined", "learning", "learned", "promoted", "rejected", "failed"]

# A documented way to bring a new task to each state.
PATH_TO = {
    None: [],
    "ingested": ["ingested"],
    "quarantined": ["ingested", "quarantined"],
    "validated": ["ingested", "validated"],
    "learning": ["ingested", "validated", "learning"],
    "failed": ["ingested", "validated", "learning", "failed"],
    "learned": ["ingested", "validated", "learning", "learned"],
    "promoted": ["ingested", "validated", "learning", "learned", "promoted"],
    "rejected": ["ingested", "validated", "learning", "learned", "rejected"],
}


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as opened:
        yield opened


def _bring(ledger: Ledger, task_id: str, state: str | None) -> None:
    for step in PATH_TO[state]:
        ledger.transition(task_id, step, **({"content_digest": "d"} if step == "ingested" else {}))


def test_the_documented_states_are_the_ledgers():
    from components.intake import ledger as module

    assert sorted(module.STATES) == sorted(STATES)
    assert set(DOCUMENTED) == {None, *STATES}


@pytest.mark.parametrize("source", list(DOCUMENTED), ids=lambda s: str(s))
def test_every_move_from_a_state_is_made_or_refused_as_documented(ledger, source):
    made = set()
    for target in STATES:
        task = f"{source}-to-{target}"
        _bring(ledger, task, source)
        before = ledger.events(task)
        fields = {"content_digest": "d"} if source is None else {}
        try:
            record = ledger.transition(task, target, **fields)
        except IllegalTransition as exc:
            assert str(exc) == f"task {task}: cannot go from {source} to {target}"
            after = ledger.get(task)
            assert (after.state if after else None) == source  # refused: nothing changed
            assert ledger.events(task) == before
            continue
        made.add(target)
        assert record.state == target == ledger.get(task).state
        event = ledger.events(task)[-1]
        assert (event["from_state"], event["to_state"]) == (source, target)
        assert len(ledger.events(task)) == len(before) + 1
    assert made == DOCUMENTED[source]


def test_expect_refuses_a_state_changed_by_someone_else(ledger):
    _bring(ledger, "t", "ingested")
    with pytest.raises(IllegalTransition) as refused:
        ledger.transition("t", "validated", expect=["quarantined", None])  # a legal move, from a state not believed
    assert str(refused.value) == "task t: expected state in ['None', 'quarantined'], found ingested"
    assert ledger.get("t").state == "ingested" and len(ledger.events("t")) == 1
    with pytest.raises(IllegalTransition, match=r"expected state in \[\], found ingested"):
        ledger.transition("t", "validated", expect=[])  # believing no state at all is never a match
    ledger.transition("t", "validated", expect=["ingested"], dvc_md5="m")
    assert ledger.get("t").state == "validated" and ledger.get("t").dvc_md5 == "m"
    with pytest.raises(IllegalTransition, match="expected state in \\['None'\\], found validated"):
        ledger.transition("t", "ingested", expect=[None], content_digest="d")  # "new" but it exists
    ledger.transition("u", "ingested", expect=[None], content_digest="d")  # None: a task not in the ledger yet


def test_bad_moves_say_what_is_wrong(ledger):
    with pytest.raises(LedgerError, match="unknown state 'done'"):
        ledger.transition("t", "done", content_digest="d")
    with pytest.raises(LedgerError, match=r"unknown ledger fields: \['colour', 'size'\]"):
        ledger.transition("t", "ingested", content_digest="d", colour="red", size=1)
    with pytest.raises(LedgerError, match="a new ledger entry needs its content digest"):
        ledger.transition("t", "ingested")
    assert ledger.get("t") is None and ledger.events() == []
    with pytest.raises(LedgerError, match="no ledger entry for task t"):
        ledger.update("t", reason="x")
    _bring(ledger, "t", "ingested")
    with pytest.raises(LedgerError, match=r"unknown ledger fields: \['colour'\]"):
        ledger.update("t", colour="red")


def test_rows_keep_their_fields_arrival_order_and_history(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        for task in ("t-z", "t-a", "t-m"):  # arrival order is not id order
            ledger.transition(task, "ingested", content_digest=f"d-{task}", classes=["cat", "dog"], n_train=3)
        ledger.transition("t-a", "quarantined", detail={"report": "r.json"})
        ledger.transition("t-a", "ingested", attempts=2)  # a corrected payload: the row keeps its place
        ledger.update("t-z", dvc_md5="m1", classes=["owl"])
    with Ledger(path) as reopened:  # durable
        records = reopened.all()
        assert [(r.task_id, r.seq) for r in records] == [("t-z", 1), ("t-a", 2), ("t-m", 3)]
        z, a = reopened.get("t-z"), reopened.get("t-a")
        assert (z.state, z.content_digest, z.dvc_md5, z.classes, z.n_train) == ("ingested", "d-t-z", "m1", ["owl"], 3)
        assert (a.state, a.attempts, a.classes) == ("ingested", 2, ["cat", "dog"])
        assert z.created_at and z.updated_at >= z.created_at
        history = [(e["from_state"], e["to_state"], e["detail"]) for e in reopened.events("t-a")]
        assert history == [
            (None, "ingested", {}),
            ("ingested", "quarantined", {"report": "r.json"}),
            ("quarantined", "ingested", {}),
        ]
        assert [e["task_id"] for e in reopened.events()] == ["t-z", "t-a", "t-m", "t-a", "t-a"]
        assert reopened.get("nobody") is None


def test_meta_facts_and_their_events(ledger):
    assert ledger.meta("registry") is None
    _bring(ledger, "t", "validated")
    ledger.set_meta("registry", {"uri": "sqlite:///x"}, events={"t": {"why": "moved"}})
    ledger.set_meta("registry", {"uri": "sqlite:///y"})
    assert ledger.meta("registry") == {"uri": "sqlite:///y"}
    last = ledger.events("t")[-1]
    assert (last["from_state"], last["to_state"], last["detail"]) == ("validated", "validated", {"why": "moved"})
    assert len(ledger.events("t")) == 3 and ledger.get("t").state == "validated"


def test_image_index_and_known_classes_count_accepted_tasks_only(ledger):
    for task, state in (("a", "validated"), ("q", "quarantined"), ("i", "ingested"), ("r", "rejected")):
        _bring(ledger, task, state)
        ledger.update(task, dataset="toy", classes=[f"Class {task.upper()}", "shared"])
    ledger.update("a", dataset="other")
    ledger.update("r", dataset="toy")
    # Normalised names, the accepted tasks (validated .. rejected, failed) of the dataset, not the excluded one.
    assert ledger.known_classes("toy") == {"class r": "r", "shared": "r"}
    assert ledger.known_classes("other") == {"class a": "a", "shared": "a"}
    assert ledger.known_classes("other", exclude_task="a") == {}

    many = [f"{n:064x}" for n in range(1203)]  # more than one query's worth of digests
    ledger.record_images("a", [(d, "train") for d in many])
    ledger.record_images("r", [(many[0], "test"), (many[1200], "train")])
    ledger.record_images("a", [(many[0], "train")])  # a repeat is kept once
    found = ledger.tasks_holding(many + ["f" * 64])
    assert len(found) == 1203 and found[many[0]] in {"a", "r"} and found[many[700]] == "a"
    assert ledger.tasks_holding([many[0], many[5]], exclude_task="a") == {many[0]: "r"}
    assert ledger.tasks_holding([]) == {}
