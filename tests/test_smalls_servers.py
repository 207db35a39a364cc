"""Issue 24, item 6: the smaller things that need a real server to show (the others: tests/test_smalls.py)."""

from __future__ import annotations

import json
import os
import socket

import pytest

pytestmark = pytest.mark.server


def _listening(port: int = 0) -> socket.socket:
    """A program listening on a port of 127.0.0.1 (the caller closes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _free_port() -> int:
    with _listening() as sock:
        return sock.getsockname()[1]


def test_stack_up_stops_the_store_it_started_when_a_later_port_is_taken_meanwhile(tmp_path):
    """The real object store starts; while it does, another program takes MLflow's port. `up` fails on it, and
    the store it had started is stopped again: the stack is left as it was, empty."""
    from flows.lifeline import descendants, running, terminate
    from infra.stack import Stack, StackError

    ports = {"s3": _free_port(), "mlflow": _free_port(), "prefect": _free_port()}
    taken: list[socket.socket] = []

    def progress(line: str) -> None:
        if line.startswith("s3: started"):  # the store is up: now MLflow's port goes to someone else
            taken.append(_listening(ports["mlflow"]))

    stack = Stack(tmp_path / "stack")
    before = descendants(os.getpid())
    try:
        with pytest.raises(StackError) as caught:
            stack.up(ports, progress=progress)
        left = running(descendants(os.getpid()) - before)
    finally:
        terminate(running(descendants(os.getpid()) - before))  # whatever the old code left
        for sock in taken:
            sock.close()
    assert taken, "the store never started"
    assert left == set(), "stack up left the object store running"
    assert f"mlflow: port {ports['mlflow']} on 127.0.0.1 is taken" in str(caught.value)
    assert str(caught.value).endswith("; stopped what this `up` had started: s3")
    assert json.loads((tmp_path / "stack" / "stack.json").read_text())["services"] == {}
