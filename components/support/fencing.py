"""Fencing tokens for a step's key in the artifact store: one attempt at a time writes under it.

Two processes can work on one step key at once: the night takes a silent worker for dead, marks its flow run
Crashed and starts the step again on another worker, while the first flow-run process (its worker hung, not the
process) trains on. So every start of a step is an *attempt* with an id of its own, and each key has an owner log
in the store, ``owners/<kind>/<key>/<n>.json``, whose records are created and never changed:

- record 1 names the first attempt; an attempt that takes the key over creates the record after the last one;
- the owner of record n completes the step by creating record n+1 as ``done`` (with the step's result);
- a record is created with a create-only write (``If-None-Match: *`` on S3, ``link(2)`` in a folder), so of two
  writers of record n+1 exactly one succeeds.

An attempt therefore owns its key while no record follows its own, which one HEAD (or one stat) tells before
every write it makes under the key. Completion and takeover race for the same record: a superseded attempt can
never mark the step complete, however late it wakes up, and an attempt that loses to a completion finds the
step done. The log also keeps who superseded whom, for whoever looks into a night.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from components.support import storage

OWNERS = "owners"  # the owner logs' folder (or prefix) at the top of the artifact store
ATTEMPT_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")  # an id names folders and prefixes: nothing else


class Superseded(RuntimeError):
    """This attempt no longer owns its step's key: another attempt took the key over (or completed the step)."""

    def __init__(self, attempt: str, step: str, by: str, outcome: str = "nothing written"):
        super().__init__(f"Superseded: attempt {attempt} of step {step} was superseded by {by}; {outcome}")
        self.attempt, self.step, self.by = attempt, step, by


def new_attempt_id() -> str:
    """Sortable by start time for a reader of the log; the random part keeps two starts in one second apart."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def _record(attempt: str, state: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = {"attempt": attempt, "state": state, "at": time.time(), "host": os.uname().nodename, "pid": os.getpid()}
    return doc | ({"result": result} if result is not None else {})


class OwnerLog(Protocol):
    def numbers(self) -> list[int]: ...
    def read(self, n: int) -> dict[str, Any] | None: ...
    def create(self, n: int, doc: dict[str, Any]) -> bool: ...


def _name(n: int) -> str:
    return f"{n:08d}.json"


def _numbers(names) -> list[int]:
    return sorted(int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit())


class FolderLog:
    """An owner log in a folder (an artifact store that is a folder, shared by the workers that use it)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def numbers(self) -> list[int]:
        try:
            return _numbers(os.listdir(self.folder))
        except FileNotFoundError:
            return []

    def read(self, n: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / _name(n)).read_text())
        except FileNotFoundError:
            return None

    def create(self, n: int, doc: dict[str, Any]) -> bool:
        # Written whole under a temporary name, then linked: link(2) fails if the record exists, and a reader
        # never sees a record half written.
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(doc, indent=2, default=str))
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, self.folder / _name(n))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)


class S3Log:
    """An owner log under an S3 prefix; creation is a conditional put (``If-None-Match: *``)."""

    def __init__(self, client, prefix: storage.S3Uri):
        self.client, self.prefix = client, prefix

    def numbers(self) -> list[int]:
        return _numbers(key.rsplit("/", 1)[-1] for key, _ in storage.list_keys(self.prefix.as_prefix(), self.client))

    def read(self, n: int) -> dict[str, Any] | None:
        try:
            return json.loads(storage.get_bytes(self.prefix.join(_name(n)), self.client, max_bytes=16 << 20))
        except storage.StorageUnavailable:
            raise  # an unreachable store says nothing about the owner
        except storage.StorageError:
            return None

    def create(self, n: int, doc: dict[str, Any]) -> bool:
        uri = self.prefix.join(_name(n))
        body = json.dumps(doc, indent=2, default=str).encode()
        try:
            self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body, IfNoneMatch="*")
            return True
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            # 409 ConditionalRequestConflict: another conditional write of it was under way (AWS); both lost
            # or one won, which the caller finds out by reading the record.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise storage.storage_error(exc, f"cannot write {uri}") from exc


def _created(log: OwnerLog, n: int, doc: dict[str, Any]) -> bool:
    """Create record n; a refusal whose record is ours anyway (the answer to a retried write was lost) counts."""
    if log.create(n, doc):
        return True
    found = log.read(n)
    return found is not None and (found.get("attempt"), found.get("state")) == (doc["attempt"], doc["state"])


class Attempt:
    """One attempt's hold on a step key: record ``number`` of the key's owner log names it."""

    def __init__(self, log: OwnerLog, step: str, attempt_id: str, number: int):
        self.log, self.step, self.id, self.number = log, step, attempt_id, number

    def check(self) -> None:
        """Raise :class:`Superseded` unless this attempt still owns the key (called before each write under it)."""
        following = self.log.read(self.number + 1)
        if following is not None and following.get("attempt") != self.id:
            raise Superseded(self.id, self.step, str(following.get("attempt")))

    def finish(self, result: dict[str, Any], outcome: str) -> None:
        """Mark the step complete by this attempt: the one write a superseded attempt cannot make, even after its
        last check (``outcome`` says what became of its files then)."""
        if not _created(self.log, self.number + 1, _record(self.id, "done", result)):
            following = self.log.read(self.number + 1) or {}
            raise Superseded(self.id, self.step, str(following.get("attempt")), outcome)


def claim(log: OwnerLog, step: str) -> Attempt | dict[str, Any]:
    """A new attempt as the key's owner (the attempt before it is superseded), or the ``done`` record when the
    step is complete."""
    attempt = new_attempt_id()
    for _ in range(20):
        numbers = log.numbers()
        last = numbers[-1] if numbers else 0
        current = log.read(last) if last else None
        if current is not None and current.get("state") == "done":
            return current
        if _created(log, last + 1, _record(attempt, "running")):
            return Attempt(log, step, attempt, last + 1)
        # another attempt (or a completion) created that record first: look again
    raise storage.StorageError(f"cannot take step {step} over: its owner log kept changing under 20 tries")


def hold(log: OwnerLog, step: str, attempt_id: str) -> Attempt | dict[str, Any]:
    """The attempt handed to a worker by whoever claimed it, checked to still own the key; or its own ``done``
    record when it completed the step already (a process that died after completing, retried)."""
    if not ATTEMPT_ID.match(attempt_id):
        raise ValueError(f"{attempt_id!r} is not an attempt id")
    numbers = log.numbers()
    for n in reversed(numbers):
        doc = log.read(n) or {}
        if doc.get("attempt") == attempt_id and doc.get("state") == "done":
            return doc
        if doc.get("attempt") == attempt_id and doc.get("state") == "running":
            attempt = Attempt(log, step, attempt_id, n)
            attempt.check()
            return attempt
    latest = (log.read(numbers[-1]) or {}).get("attempt") if numbers else None
    raise Superseded(attempt_id, step, latest or "nobody (the key has no owner record of it)")
