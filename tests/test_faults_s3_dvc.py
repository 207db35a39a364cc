"""The storage rows of the fault suite, DVC's part: ``dvc push`` to an S3 remote under resets, 503 SlowDown and
latency, and a push killed (SIGKILL, SIGTERM) half-way, through the fault proxy (``tests/s3_fault_proxy.py``).
What must hold: the remote holds every object of the workspace byte for byte, or the step ends clearly (exit 4,
"safe to re-run") with nothing half-published, and a rerun without faults completes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.intake import versioning
from flows.cli import main
from tests import s3_fault_kit as kit
from tests.conftest import REPO
from tests.drops import make_task

pytestmark = pytest.mark.faults

proxy, direct, workspace = kit.proxy, kit.direct, kit.workspace  # fixtures
ws_template = kit.ws_template


# ---- dvc push to an S3 remote --------------------------------------------------------------------


@pytest.fixture
def dvc_ws(workspace) -> Path:
    """A workspace whose data/ (16 random files of 2-10 KiB) is DVC-tracked and committed, not yet pushed."""
    rng = random.Random(5)
    for i in range(16):
        path = workspace / "data" / "tasks" / "t" / f"shard-{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(2048 + 512 * i))
    versioning.track_data(workspace)
    versioning.commit(workspace, "data", ["data.dvc"])
    return workspace


@pytest.mark.parametrize("rate", kit.RATES)
def test_dvc_push_to_s3_remote_under_faults(rate, dvc_ws, direct, proxy):
    ws, s3_bucket = dvc_ws, kit.DVC_BUCKET

    proxy.faults(rate)
    error = None
    try:
        versioning.push(ws)
    except versioning.VersioningError as exc:
        error = exc
    injected = proxy.injected

    assert injected == 0 if rate == 0 else injected > 0
    assert rate > 0 or error is None
    assert kit.dvc_remote_problems(kit.stored_objects(direct, s3_bucket, "dvc/"), "dvc/") == []
    if error is not None:
        assert "dvc push" in str(error) and ("SlowDown" in str(error) or "reset" in str(error)), str(error)
        proxy.faults(0.0)
        versioning.push(ws)
    kit.assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    kit.row(f"dvc push @{rate:.0%}", proxy, first_error=bool(error), remote_md5_equal=True)


def test_ingest_whose_push_fails_ends_with_exit_4_and_the_rerun_finishes(
    workspace, tmp_path, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the outage outlasts the retries sooner
    drop = make_task(tmp_path / "drops", "push-f", ["cat"])
    ws, s3_bucket = workspace, kit.DVC_BUCKET
    args = ["ingest", str(drop), "-w", str(ws), "--set", f"dvc.remote={kit.DVC_REMOTE}"]
    proxy.set(slowdown=1.0, match=r"^PUT .*\.dir")  # the files go up; the manifest, last, is refused

    code = main(args)
    err = capsys.readouterr().err
    state = kit.ledger(ws)["push-f"]["state"]
    objects = kit.stored_objects(direct, s3_bucket, "dvc/")

    assert code == 4 and "dvc push" in err and "SlowDown" in err and "re-run" in err, err
    assert "Traceback" not in err and len(err.splitlines()) < 15
    assert state == "ingested"  # committed, not yet validated: accepting a task includes its push
    assert objects and not any(k.endswith(".dir") for k in objects)  # files without a manifest: unpublished
    proxy.set(slowdown=0.0)
    assert main(args) == 0
    assert kit.ledger(ws)["push-f"]["state"] == "validated"
    kit.assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    kit.row("ingest, every DVC upload throttled", proxy, exit=code, ledger=state, rerun=0)


# ---- kill -9 and SIGTERM during a DVC push -------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


PUSH = (
    "import sys; from pathlib import Path; from components.intake import versioning; versioning.push(Path(sys.argv[1]))"
)


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_killed_during_dvc_push_publishes_nothing_half_and_rerun_completes(how, dvc_ws, direct, proxy):
    ws, s3_bucket = dvc_ws, kit.DVC_BUCKET
    proxy.set(latency=1.0)  # each request to the store takes 1 s: the push lasts long enough to be hit

    child = subprocess.Popen(
        [sys.executable, "-c", PUSH, str(ws)],
        cwd=REPO,
        env=dict(os.environ),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    published: list[str] = []
    while time.monotonic() < deadline and child.poll() is None and not published:
        published = kit.keys(direct, s3_bucket, "dvc/")
        time.sleep(0.02)
    assert child.poll() is None, f"the push ended before it could be killed: {child.communicate()}"
    assert published, "nothing reached the remote in time"
    helpers = _descendants(child.pid)  # the `dvc push` process
    assert helpers
    if how == "kill-9":
        os.killpg(child.pid, signal.SIGKILL)  # the machine or the container goes: every process at once
    else:
        child.send_signal(signal.SIGTERM)  # a scheduler stopping the command
    started = time.monotonic()
    child.communicate(timeout=30)
    ended_in = time.monotonic() - started
    gone_by = time.monotonic() + 1.5  # the push would need several seconds more: an orphan is still there
    while _alive(helpers) and time.monotonic() < gone_by:
        time.sleep(0.05)
    left_behind = _alive(helpers)
    time.sleep(0.5)  # requests in flight when it died land now, or never
    at_kill = kit.stored_objects(direct, s3_bucket, "dvc/")

    assert kit.dvc_remote_problems(at_kill, "dvc/") == []
    assert ended_in < 5 and left_behind == [], f"{how}: ended in {ended_in:.1f} s, left {left_behind} running"
    proxy.set(latency=0.0)
    versioning.push(ws)
    kit.assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    kit.row(
        f"{how} during dvc push",
        proxy,
        objects_at_kill=len(at_kill),
        of=17,
        dir_at_kill=sum(k.endswith(".dir") for k in at_kill),
        ended_in_s=round(ended_in, 1),
        left_behind=left_behind,
        rerun="complete",
    )
