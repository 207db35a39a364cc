"""The durable task ledger: one row per task id, an append-only event history, and an image index.

SQLite (WAL mode) gives atomic, crash-safe state transitions and safe use by several processes.
States and allowed transitions follow docs/contracts.md ("A task's life in the ledger")::

    ingested ─► validated ─► learning ─► learned ─► promoted
       │                        │           └─────► rejected (a reviewer or the gate said no; can be re-queued)
       └─► quarantined          └─► failed (after retries; tried again next night)

A quarantined task may come back as ``ingested`` when a corrected payload is dropped under its id.
A promoted task becomes ``rejected`` when a rollback removes it from the champion's chain; ``cliploop
requeue`` sends a rejected (or stale learned) task back to ``validated`` for the next night.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATES = ("ingested", "validated", "quarantined", "learning", "learned", "promoted", "rejected", "failed")
TRANSITIONS: dict[str | None, set[str]] = {
    None: {"ingested"},
    "ingested": {"validated", "quarantined"},
    "quarantined": {"ingested"},
    "validated": {"learning"},
    "learning": {"learned", "failed"},
    "failed": {"learning"},
    "learned": {"promoted", "rejected", "learning", "validated"},
    "rejected": {"learning", "validated", "promoted"},  # promoted: a gate-rejected version approved by override
    "promoted": {"learning", "rejected"},
}
ACCEPTED_STATES = ("validated", "learning", "learned", "promoted", "rejected", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  content_digest TEXT NOT NULL,
  source TEXT,
  scenario TEXT,
  dataset TEXT,
  domain TEXT,
  classes TEXT NOT NULL DEFAULT '[]',
  n_train INTEGER, n_test INTEGER,
  dvc_md5 TEXT,
  workspace_commit TEXT,
  report TEXT,
  model_version TEXT,
  reason TEXT,
  attempts INTEGER NOT NULL DEFAULT 1,
  seq INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  task_id TEXT NOT NULL,
  at TEXT NOT NULL,
  from_state TEXT,
  to_state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS images (
  sha256 TEXT NOT NULL,
  task_id TEXT NOT NULL,
  split TEXT NOT NULL,
  PRIMARY KEY (sha256, task_id, split)
);
CREATE INDEX IF NOT EXISTS images_by_sha ON images (sha256);
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
"""


class LedgerError(RuntimeError):
    pass


class IllegalTransition(LedgerError):
    pass


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class TaskRecord:
    task_id: str
    state: str
    content_digest: str
    source: str | None = None
    scenario: str | None = None
    dataset: str | None = None
    domain: str | None = None
    classes: list[str] = field(default_factory=list)
    n_train: int | None = None
    n_test: int | None = None
    dvc_md5: str | None = None
    workspace_commit: str | None = None
    report: str | None = None
    model_version: str | None = None
    reason: str | None = None
    attempts: int = 1
    seq: int = 0
    created_at: str = ""
    updated_at: str = ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TaskRecord:
        data = dict(row)
        data["classes"] = json.loads(data["classes"] or "[]")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (
    "content_digest",
    "source",
    "scenario",
    "dataset",
    "domain",
    "classes",
    "n_train",
    "n_test",
    "dvc_md5",
    "workspace_commit",
    "report",
    "model_version",
    "reason",
    "attempts",
)


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so read-check-write is atomic across processes.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return TaskRecord.from_row(row) if row else None

    def all(self) -> list[TaskRecord]:
        rows = self._conn.execute("SELECT * FROM tasks ORDER BY seq").fetchall()
        return [TaskRecord.from_row(r) for r in rows]

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        if task_id is None:
            rows = self._conn.execute("SELECT * FROM events ORDER BY id").fetchall()
        else:
            rows = self._conn.execute("SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,)).fetchall()
        return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]

    def transition(
        self,
        task_id: str,
        to_state: str,
        expect: Iterable[str | None] | None = None,
        detail: dict[str, Any] | None = None,
        **fields: Any,
    ) -> TaskRecord:
        """Move a task to ``to_state`` and update fields, atomically, recording an event.

        ``expect`` (optional) lists the states the caller believes the task is in; anything else is a
        concurrent change and raises instead of overwriting it.
        """
        if to_state not in STATES:
            raise LedgerError(f"unknown state {to_state!r}")
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise LedgerError(f"unknown ledger fields: {sorted(unknown)}")
        if "classes" in fields:
            fields["classes"] = json.dumps(list(fields["classes"]))
        stamp = now()
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            current = row["state"] if row else None
            if expect is not None and current not in set(expect):
                raise IllegalTransition(
                    f"task {task_id}: expected state in {sorted(map(str, expect))}, found {current}"
                )
            if to_state not in TRANSITIONS.get(current, set()):
                raise IllegalTransition(f"task {task_id}: cannot go from {current} to {to_state}")
            if current is None:
                if "content_digest" not in fields:
                    raise LedgerError("a new ledger entry needs its content digest")
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks").fetchone()[0]
                cols = ["task_id", "state", "seq", "created_at", "updated_at", *fields]
                conn.execute(
                    f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    (task_id, to_state, seq, stamp, stamp, *fields.values()),
                )
            else:
                sets = ", ".join(f"{k} = ?" for k in ["state", "updated_at", *fields])
                conn.execute(f"UPDATE tasks SET {sets} WHERE task_id = ?", (to_state, stamp, *fields.values(), task_id))
            conn.execute(
                "INSERT INTO events (task_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                (task_id, stamp, current, to_state, json.dumps(detail or {}, default=str)),
            )
        return self.get(task_id)

    def meta(self, key: str) -> Any:
        """A workspace-wide fact the ledger keeps (JSON), e.g. which registry its versions live in; None if unset."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else None

    def set_meta(self, key: str, value: Any, events: dict[str, dict[str, Any]] | None = None) -> None:
        """Set a fact; ``events``: per task id, a record of why (the task keeps its state), in the same
        transaction, so the fact and its history never disagree."""
        stamp = now()
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            for task_id, detail in (events or {}).items():
                row = conn.execute("SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
                conn.execute(
                    "INSERT INTO events (task_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                    (task_id, stamp, row["state"], row["state"], json.dumps(detail, default=str)),
                )

    def update(self, task_id: str, **fields: Any) -> TaskRecord:
        """Change fields without a state change (e.g. the DVC hash once the push is done)."""
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise LedgerError(f"unknown ledger fields: {sorted(unknown)}")
        if "classes" in fields:
            fields["classes"] = json.dumps(list(fields["classes"]))
        with self._tx() as conn:
            sets = ", ".join(f"{k} = ?" for k in ["updated_at", *fields])
            cur = conn.execute(f"UPDATE tasks SET {sets} WHERE task_id = ?", (now(), *fields.values(), task_id))
            if cur.rowcount != 1:
                raise LedgerError(f"no ledger entry for task {task_id}")
        return self.get(task_id)

    # ---- image index for cross-task duplicate detection --------------------------------------------

    def record_images(self, task_id: str, digests: Iterable[tuple[str, str]]) -> None:
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO images (sha256, task_id, split) VALUES (?, ?, ?)",
                [(sha, task_id, split) for sha, split in digests],
            )

    def tasks_holding(self, digests: Iterable[str], exclude_task: str | None = None) -> dict[str, str]:
        """For each digest already ingested by an accepted task (other than ``exclude_task``), that task's id."""
        wanted = list(set(digests))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self._conn.execute(
                f"SELECT sha256, task_id FROM images WHERE sha256 IN ({', '.join('?' * len(chunk))})", chunk
            ).fetchall()
            for row in rows:
                if row["task_id"] != exclude_task:
                    found.setdefault(row["sha256"], row["task_id"])
        return found

    def known_classes(self, dataset: str, exclude_task: str | None = None) -> dict[str, str]:
        """Classes of the accepted tasks of a dataset: normalised name -> id of the task that declared it."""
        from components.intake.tasks import normalise_class_name

        out: dict[str, str] = {}
        for record in self.all():
            if record.dataset == dataset and record.state in ACCEPTED_STATES and record.task_id != exclude_task:
                for name in record.classes:
                    out.setdefault(normalise_class_name(name), record.task_id)
        return out
