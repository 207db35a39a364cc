"""The ledger's returned and recorded values (components/intake/ledger.py; docs/contracts.md, "A task's life in
the ledger"): ``update`` hands back the row as it now is, and a workspace fact's events keep a detail that
is not plain JSON (a path) as its text, as a transition's events do, instead of failing the fact."""

from __future__ import annotations

from pathlib import Path

from components.intake.ledger import Ledger


def test_update_returns_the_row_as_it_now_is(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.transition("t1", "ingested", content_digest="d1")
        record = ledger.update("t1", dvc_md5="abc", classes=["owl", "yak"])
        assert (record.task_id, record.state, record.dvc_md5, record.classes) == (
            "t1",
            "ingested",
            "abc",
            ["owl", "yak"],
        )


def test_a_facts_event_keeps_a_path_in_its_detail_as_text(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.transition("t1", "ingested", content_digest="d1", detail={"from": Path("/drops/t1")})
        ledger.set_meta("registry", {"uri": "file:///r"}, events={"t1": {"moved_from": Path("/old/registry")}})
        assert ledger.meta("registry") == {"uri": "file:///r"}
        first, second = ledger.events("t1")
        assert first["detail"] == {"from": "/drops/t1"}
        assert (second["from_state"], second["to_state"]) == ("ingested", "ingested")  # the task kept its state
        assert second["detail"] == {"moved_from": "/old/registry"}
