"""The ledger's edges (components/intake/ledger.py): a ledger in a folder that does not exist yet, its
records read by another connection, stamped in UTC, a record without classes read back with none, and a new
entry without its content digest refused in one line."""

from __future__ import annotations

import pytest

from components.intake.ledger import Ledger, LedgerError


def test_a_new_ledger_in_a_new_folder_is_read_by_another_connection_in_utc(tmp_path):
    path = tmp_path / "ws" / "state" / "deep" / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.transition("t1", "ingested", content_digest="d1")
    with Ledger(path) as other:
        record = other.get("t1")
    assert record.state == "ingested" and record.classes == []  # no classes recorded yet
    assert record.created_at.endswith("+00:00") and record.updated_at.endswith("+00:00")


def test_a_new_entry_without_its_content_digest_is_refused(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(LedgerError, match="^a new ledger entry needs its content digest$"):
            ledger.transition("t1", "ingested")
