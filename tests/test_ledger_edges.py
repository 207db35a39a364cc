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


def test_a_write_waits_for_another_writers_lock_beyond_sqlites_five_second_default(tmp_path):
    """The nightly flow, `cliploop approve` and a second night may write one workspace's ledger at once: a write
    waits for the other writer's lock (up to a minute), where sqlite3's default wait of 5 s would end it with
    "database is locked". The other writer here holds its lock for 6.5 s."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO meta (key, value) VALUES ('held', '1')")
        release = threading.Timer(6.5, lambda: other.execute("COMMIT"))
        release.start()
        started = time.monotonic()
        try:
            ledger.transition("t1", "ingested", content_digest="d1")
        finally:
            release.join()
            other.close()
        waited = time.monotonic() - started
        assert ledger.get("t1").state == "ingested" and ledger.meta("held") == 1
    assert waited >= 6.0  # it did wait for the other writer, past sqlite3's default
