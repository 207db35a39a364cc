"""The server setup on one machine, run as a cluster would run it: `cliploop stack up` starts a real Prefect
server, a real MLflow server (SQLite backend, artifacts in S3) and an S3-compatible store (moto's server) on
127.0.0.1; `cliploop deploy` registers the deployments; two process workers serve the `gpu` pool, each started
in its own empty folder with its own HOME, in a mount namespace where the test's folders (the orchestrator's
workspace, the drop zone, the model's file) are an empty tmpfs, so they get the model, the task data and the
pools from S3 only (without the right to make a mount namespace, as a non-root user, workers would see those
folders but are never handed a path in them: the test checks that too). A night's two pool builds run on
different workers, and the registry and the lineage are checked. Then, in a second workspace whose method
trains, a worker is killed (with the step it runs) right after a training checkpoint reached the artifact
store: the night marks that run Crashed, the step runs again on the other worker, resumes from that
checkpoint, and exactly one version is registered."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from components.intake import workspace
from components.pipeline import step_io
from components.registry.lineage import build_lineage
from components.registry.registry import from_config
from components.settings.config_loading import load_config
from flows.cli import main
from tests.drops import make_task

pytestmark = pytest.mark.stack


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.faults  # its second part is the fault suite's "worker killed while its run is Running" row
def test_a_night_on_the_local_stack(tmp_path, tiny_checkpoint, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy
    from flows.gpu import chain_tag
    from flows.nightly import run_night
    from infra.stack import BUCKET, Stack

    ws = tmp_path / "ws"
    ports = {name: _free_port() for name in ("s3", "mlflow", "prefect")}
    flags = ["-w", str(ws)] + [x for name, port in ports.items() for x in (f"--port-{name}", str(port))]
    stack = Stack(ws / ".cliploop" / "stack")
    workers: list[subprocess.Popen] = []
    homes: list[Path] = []
    service_pids: list[int] = []
    try:
        assert main(["stack", "up", *flags]) == 0
        assert main(["stack", "up", *flags]) == 0  # a second `up` is harmless
        assert main(["stack", "status", "-w", str(ws)]) == 0
        service_pids = [row["pid"] for row in stack.status()]
        assert not [c for c in _commands_below(service_pids) if "mlflow.server.jobs" in c or "huey" in c], (
            "MLflow's job runner started: cliploop runs no MLflow job, and it is three processes"
        )
        env = stack.env(ports)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        model = _model_on_s3(tiny_checkpoint, env, BUCKET)
        cfg = _config(tmp_path, ws, model, env, BUCKET, "lvp")
        workspace.ensure_workspace(cfg)
        deploy(cfg, env["PREFECT_API_URL"])

        for name in ("gpu-worker-1", "gpu-worker-2"):
            workers.append(_worker(tmp_path, homes, name))
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
        assert {u["train_parent_pid"] for u in summary["updates"]} <= {w.pid for w in workers}
        registry = from_config(cfg)
        assert registry.tracking_uri.startswith("http://127.0.0.1")
        assert registry.alias("champion") == 2 and registry.version_tags(2)["parent_version"] == "1"
        record = build_lineage(registry, "champion", ws, verify=True)
        assert record["verified"] is True and [c["task"]["id"] for c in record["chain"]] == ["t-b", "t-a"]
        assert all(c["flow_run_id"] for c in record["chain"])
        assert main(["lineage", "champion", "-w", str(ws), "--verify"]) == 0
        handed = _gpu_runs(env["PREFECT_API_URL"])
        assert len(handed) == 4 and not any(str(tmp_path) in p for p, _ in handed), "a worker was handed a path"
        assert all(chain_tag(cfg) in tags for _, tags in handed)  # found by the next night's sweep all the same
        for home in homes:  # what a worker kept: its own cache, fetched from S3; nothing of the orchestrator's
            assert (home / ".cache" / "cliploop").is_dir() and not (home / "ws").exists()

        # A worker dies (its process and the step it runs, as when its machine is lost) while its training step
        # is Running, right after a checkpoint reached the artifact store. The night notices the worker's
        # silence, marks that run Crashed and starts the step again; the other worker, with an empty cache,
        # resumes from the stored checkpoint; exactly one version is registered.
        for w in workers:
            w.terminate()
        for w in workers:  # a Prefect worker on loaded cores may take longer than that to shut down gracefully
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(timeout=30)
        ws2 = tmp_path / "ws-train"
        cfg2 = _config(tmp_path, ws2, model, env, BUCKET, "finetune", drops="incoming-train")
        workspace.ensure_workspace(cfg2)
        mark = Path(tempfile.mkdtemp(prefix="cliploop-mark-")) / "checkpointed"
        doomed = _worker(
            tmp_path, homes, "gpu-worker-3", fault=f"after_checkpoint:mark={mark},after_checkpoint:sleep=600"
        )
        workers = [doomed]
        make_task(tmp_path / "incoming-train", "t-c", ["fox", "yak"], train=3, test=2)
        killer = threading.Thread(target=_kill_when_marked, args=(doomed, mark, workers, tmp_path, homes), daemon=True)
        killer.start()
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            summary = run_night(cfg2)
        killer.join(timeout=60)
        shutil.rmtree(mark.parent, ignore_errors=True)
        assert doomed.poll() is not None and len(workers) == 2, "the doomed worker was never killed"
        [update] = summary["updates"]
        assert update["outcome"] == "promoted" and update["train_restarts"] == 1
        assert update["train_parent_pid"] == workers[1].pid, "the rerun should run on the other worker"
        training = json.loads(
            (step_io.local(step_io.store_of(cfg2), update["out_dir"]) / "eval" / "training.json").read_text()
        )
        assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
        registry2 = from_config(cfg2)
        assert [int(v.version) for v in registry2.versions()] == [1] and registry2.alias("champion") == 1
        crashed = _crashed_runs(env["PREFECT_API_URL"])
        assert len(crashed) == 1 and "gpu-worker-3" in crashed[0], crashed
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(timeout=30)
        stack.down(progress=lambda m: None)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    assert len(service_pids) == 3 and not any(_alive(pid) for pid in service_pids)
    assert main(["stack", "status", "-w", str(ws)]) == 1  # nothing healthy any more


def _model_on_s3(tiny_checkpoint, env: dict[str, str], bucket: str) -> tuple[str, str]:
    """The tiny model's weights in the object store: workers load the model from there, as a cluster's would."""
    import boto3

    path, sha = tiny_checkpoint
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).upload_file(str(path), bucket, "models/tiny.safetensors")
    return f"s3://{bucket}/models/tiny.safetensors", sha


def _config(
    tmp_path: Path, ws: Path, model: tuple[str, str], env: dict[str, str], bucket: str, method: str, drops="incoming"
):
    from tests.conftest import tiny_overrides

    trains = [
        "method.settings.iterations=4",
        "method.settings.batch_size=2",
        "method.settings.checkpoint_every=2",
        "method.settings.warmup_steps=0",
    ]
    return load_config(
        overrides=[
            f"workspace={ws}",
            f"drop_zone={tmp_path / drops}",
            *tiny_overrides(
                model,
                "orchestration.gpu_pool=gpu",
                "orchestration.retry_delay_s=0",
                "approval.auto_promote=true",
                f"mlflow.tracking_uri={env['MLFLOW_TRACKING_URI']}",
                f"mlflow.registered_model={'cliploop' if ws.name == 'ws' else f'cliploop-{ws.name}'}",
                f"dvc.remote=s3://{bucket}/dvc/{ws.name}",
                f"artifacts.root=s3://{bucket}/artifacts/{ws.name}",
                f"method.name={method}",
                *(trains if method != "lvp" else []),
            ),
        ],
        env={},
        cwd=tmp_path,
    )


def _can_hide(folder: Path) -> bool:
    """Whether workers can be started in a mount namespace of their own where ``folder`` is an empty tmpfs
    (needs root, or the right to make namespaces, and util-linux's ``unshare``)."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(_hiding(folder, ["true"]), capture_output=True).returncode == 0


def _hiding(folder: Path, argv: list[str]) -> list[str]:
    """``argv`` run where ``folder`` (the orchestrator's files) is an empty tmpfs: for that process it is gone."""
    script = 'mount -t tmpfs -o size=1m cliploop-hidden "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder), *argv]


def _worker(tmp_path: Path, homes: list[Path], name: str, fault: str | None = None) -> subprocess.Popen:
    """A real ``prefect worker`` on the ``gpu`` pool, polling and heartbeating every second or two, started in an
    empty folder of its own (its HOME too) outside the test's folders, in a mount namespace where those folders
    are empty (where one can be made; else it is merely never handed a path in them)."""
    home = Path(tempfile.mkdtemp(prefix=f"cliploop-{name}-"))
    homes.append(home)
    hidden = tmp_path.parent  # this test process's pytest folder: the test's files and the model's file
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPLOOP_CACHE", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    env |= {
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if fault:
        env["CLIPLOOP_FAULT"] = fault
    prefect = str(Path(sys.executable).parent / "prefect")
    argv = [prefect, "worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"]
    with open(tmp_path / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            _hiding(hidden, argv) if _can_hide(hidden) else argv,
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _kill_when_marked(doomed: subprocess.Popen, mark: Path, workers: list, tmp_path: Path, homes: list) -> None:
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
    workers.append(_worker(tmp_path, homes, "gpu-worker-4"))


def _gpu_runs(api_url: str) -> list[tuple[str, list[str]]]:
    """The parameters (as JSON text) and tags every GPU step's flow run was started with."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        return [(json.dumps(r.parameters), r.tags) for r in runs if r.work_pool_name == "gpu"]


def _crashed_runs(api_url: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])))
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [run.state.message or "" for run in client.read_flow_runs(flow_run_filter=flt)]


def _commands_below(pids: list[int]) -> list[str]:
    """The command lines of every process below ``pids``."""
    from flows.lifeline import descendants

    found = []
    for child, _ in set().union(*(descendants(pid) for pid in pids)):
        with contextlib.suppress(OSError):
            found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def _alive(pid: int) -> bool:
    from infra.processes import alive

    return alive(pid)
