"""The embedded default's Prefect server, started before the night needs it (flows/embedded_prefect.py): the night's
flow runs are recorded there (not on a second temporary server of Prefect's), and the server ends with the process
that started it, even when that process is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A command's life in small: start early, import and prepare, then a night (one flow with one task) on the API.
SCRIPT = """
import json, os, signal, sys, time
from flows import embedded_prefect
embedded_prefect.start_early()
from prefect import flow, task
from prefect.client.orchestration import get_client

@task(name="probe-step")
def probe_step():
    return 2

@flow(name="probe-night")
def probe_night():
    return probe_step() + 1

server = embedded_prefect._SERVER[0]
with embedded_prefect.api_for_night() as waited:
    assert probe_night() == 3
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        for _ in range(300):  # task runs reach the server as events, which it records on its own time
            tasks = client.read_task_runs()
            if tasks and all(t.state_name == "Completed" for t in tasks):
                break
            time.sleep(0.1)
        used = str(client.api_url)
print(json.dumps({
    "pid": server.process.pid, "api": server.api_url, "used": used, "waited": waited,
    "flow_runs": [r.state_name for r in runs], "task_runs": [r.state_name for r in tasks],
}), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.server
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_the_night_runs_on_the_early_server_and_the_server_ends_with_its_process(tmp_path, end):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # nothing configured: the embedded default
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # on 2 busy cores
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, end], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["used"].rstrip("/") == seen["api"]  # the night's client talked to the early server
    assert seen["flow_runs"] == ["Completed"] and seen["task_runs"] == ["Completed"]  # and it recorded the night
    assert done.returncode == (0 if end == "exit" else -9)
    deadline = time.monotonic() + 20  # killed: the reaper notices within a second and gives it 3 s to stop
    while _alive(seen["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(seen["pid"]), f"the server (pid {seen['pid']}) outlived its process ({end})"


def test_a_server_that_dies_while_starting_says_why(tmp_path, monkeypatch):
    """Its error output (kept in a file, not a pipe nobody reads) ends the wait, in one line with its last words;
    the night then runs on Prefect's own temporary server (``api_for_night``)."""
    from flows import embedded_prefect

    dying = tmp_path / "python"
    dying.write_text("#!/bin/sh\necho 'starting' >&2\necho 'no database here' >&2\nexit 2\n")
    dying.chmod(0o755)
    monkeypatch.setattr(embedded_prefect.sys, "executable", str(dying))
    server = embedded_prefect.TemporaryServer()
    with pytest.raises(RuntimeError, match=r"exited with code 2: starting \| no database here$"):
        server.ready()
