"""The server setup on one machine: `cliploop stack up` starts a real Prefect server, a real MLflow server
(SQLite backend, artifacts in S3) and an S3-compatible store (moto's server) on 127.0.0.1; `cliploop deploy`
registers the deployments; two process workers serve the `gpu` pool; a night's two pool builds run on
different workers, training runs there too, and the registry and the lineage are checked at the end. Then a
worker is killed (with the step it runs) while its pool build is Running: the night marks that run Crashed and
the step runs again on another worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components import workspace
from components.config_loading import load_config
from components.lineage import build_lineage
from components.registry import from_config
from flows.cli import main
from tests.conftest import tiny_overrides as _overrides
from tests.drops import make_task

pytestmark = pytest.mark.stack


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.faults  # its second night is the fault suite's "worker killed while its run is Running" row
def test_a_night_on_the_local_stack(tmp_path, tiny_checkpoint, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy
    from flows.nightly import run_night
    from infra.stack import Stack

    ws = tmp_path / "ws"
    ports = {name: _free_port() for name in ("s3", "mlflow", "prefect")}
    flags = ["-w", str(ws)] + [x for name, port in ports.items() for x in (f"--port-{name}", str(port))]
    stack = Stack(ws / ".cliploop" / "stack")
    workers: list[subprocess.Popen] = []
    service_pids: list[int] = []
    try:
        assert main(["stack", "up", *flags]) == 0
        assert main(["stack", "up", *flags]) == 0  # a second `up` is harmless
        assert main(["stack", "status", "-w", str(ws)]) == 0
        service_pids = [row["pid"] for row in stack.status()]
        env = stack.env(ports)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        cfg = load_config(
            overrides=[
                f"workspace={ws}",
                f"drop_zone={tmp_path / 'incoming'}",
                *_overrides(
                    tiny_checkpoint,
                    "orchestration.gpu_pool=gpu",
                    "orchestration.retry_delay_s=0",
                    "approval.auto_promote=true",
                    f"mlflow.tracking_uri={env['MLFLOW_TRACKING_URI']}",
                ),
            ],
            env={},
            cwd=tmp_path,
        )
        workspace.ensure_workspace(cfg)
        deploy(cfg, env["PREFECT_API_URL"])

        for name in ("gpu-worker-1", "gpu-worker-2"):
            workers.append(_worker(tmp_path, name))
        time.sleep(3)
        assert all(w.poll() is None for w in workers), "a worker died at start"

        make_task(tmp_path / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
        make_task(tmp_path / "incoming", "t-b", ["emu", "owl"], train=3, test=2)
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            summary = run_night(cfg)

        assert [p["work_pool"] for p in summary["pools"]] == ["gpu", "gpu"]
        assert {p["parent_pid"] for p in summary["pools"]} == {w.pid for w in workers}, (
            "the two pool builds should run on the two workers"
        )
        assert [u["outcome"] for u in summary["updates"]] == ["promoted", "promoted"]
        registry = from_config(cfg)
        assert registry.tracking_uri.startswith("http://127.0.0.1")
        assert registry.alias("champion") == 2 and registry.version_tags(2)["parent_version"] == "1"
        record = build_lineage(registry, "champion", ws, verify=True)
        assert record["verified"] is True and [c["task"]["id"] for c in record["chain"]] == ["t-b", "t-a"]
        assert all(c["flow_run_id"] for c in record["chain"])

        # A worker dies (its process and the step it runs, as when its machine is lost) while a pool build is
        # Running: the night notices the worker's silence, marks that run Crashed and starts the step again on
        # the other worker; the night completes with exactly one new version.
        for w in workers:
            w.terminate()
            w.wait(timeout=30)
        mark = tmp_path / "pool-build-started"
        doomed = _worker(tmp_path, "gpu-worker-3", fault=f"during_pool_build:mark={mark},during_pool_build:sleep=600")
        workers = [doomed]
        make_task(tmp_path / "incoming", "t-c", ["fox", "yak"], train=3, test=2)
        killer = threading.Thread(target=_kill_when_marked, args=(doomed, mark, workers, tmp_path), daemon=True)
        killer.start()
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            summary = run_night(cfg)
        killer.join(timeout=60)
        assert doomed.poll() is not None and len(workers) == 2, "the doomed worker was never killed"
        assert [u["outcome"] for u in summary["updates"]] == ["promoted"]
        assert [p["parent_pid"] for p in summary["pools"]] == [workers[1].pid] and summary["pools"][0]["restarts"] == 1
        assert sorted(int(v.version) for v in registry.versions()) == [1, 2, 3] and registry.alias("champion") == 3
        crashed = _crashed_pool_runs(env["PREFECT_API_URL"])
        assert len(crashed) == 1 and "gpu-worker-3" in crashed[0], crashed
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
        stack.down(progress=lambda m: None)
    assert len(service_pids) == 3 and not any(_alive(pid) for pid in service_pids)
    assert main(["stack", "status", "-w", str(ws)]) == 1  # nothing healthy any more


def _worker(tmp_path: Path, name: str, fault: str | None = None) -> subprocess.Popen:
    """A real ``prefect worker`` on the ``gpu`` pool, polling and heartbeating every second or two."""
    env = {
        **os.environ,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "2",
        "PREFECT_HOME": str(tmp_path / "worker-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if fault:
        env["CLIPLOOP_FAULT"] = fault
    prefect = str(Path(sys.executable).parent / "prefect")
    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [prefect, "worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _kill_when_marked(doomed: subprocess.Popen, mark: Path, workers: list, tmp_path: Path) -> None:
    """SIGKILL the worker and everything below it once its step is under way, then start a healthy worker."""
    from flows.lifeline import descendants

    deadline = time.time() + 240
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.2)
    below = descendants(doomed.pid)
    doomed.kill()
    for pid, _ in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    workers.append(_worker(tmp_path, "gpu-worker-4"))


def _crashed_pool_runs(api_url: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])))
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [run.state.message or "" for run in client.read_flow_runs(flow_run_filter=flt)]


def _alive(pid: int) -> bool:
    from infra.stack import _alive as alive

    return alive(pid)
