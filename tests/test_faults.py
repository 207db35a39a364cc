"""The fault suite (``pytest -m faults``): each test injects one fault for real and checks what must hold.

Faults are real: a second process racing on the registry (its timing widened with ``CLIPLOOP_FAULT``, see
``components/support/faults.py`` and ``tests/README.md``), a tracking server that refuses connections or answers 503,
a bit flipped in a stored shard on disk. Nothing of cliploop, MLflow or the ledger is mocked. The pipeline's
steps are called directly (as the flows call them) where Prefect adds nothing to what is checked.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.intake.ledger import Ledger
from components.pipeline import chain, registration, review, steps
from components.registry.registry import NotFound, from_config
from flows import retry
from tests.conftest import REPO, pipeline_config
from tests.drops import make_task
from tests.fault_steps import learn_steps

pytestmark = pytest.mark.faults


def _cfg(tmp_path, ckpt, *extra, start: Path | None = None):
    """The test's config; with ``start``, its workspace begins as a copy of that one (see ``ingested``)."""
    if start is not None:
        shutil.copytree(start, tmp_path / "ws", symlinks=True)
    return pipeline_config(tmp_path, ckpt, "gate.max_forgetting=100", *extra)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_checkpoint) -> Path:
    """A workspace with task ``t-a`` (cat, dog; JPEG images) ingested for real, made once per module: ingestion
    (git, DVC, Great Expectations) takes seconds, and most rows start from exactly this state."""
    root = tmp_path_factory.mktemp("ingested")
    _ingest(_cfg(root, tiny_checkpoint), root, "t-a", ["cat", "dog"], image_format="jpg")
    return root / "ws"


def _cli_args(cfg, ckpt) -> list[str]:
    path, sha = ckpt
    return [
        "-w",
        str(cfg.workspace_path),
        "--set",
        f"model.checkpoint={path}",
        "--set",
        f"model.sha256={sha}",
        "--set",
        "model.name=cliploop-tiny",
        "--set",
        "model.pretrained=null",
    ]


def _ingest(cfg, tmp_path, task_id, classes, **kw) -> None:
    make_task(tmp_path / "incoming", task_id, classes, train=3, test=2, **kw)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)


def _learn(cfg, task_id: str = "t-a") -> int:
    """Learn one ingested task with the pipeline's own steps; returns its version (gate passed)."""
    version, update = learn_steps(cfg, task_id)
    assert review.apply_gate(cfg, version, update)["verdict"] == "pass"
    return version


def _steps_in_child(cfg, task_id: str, fault: str) -> subprocess.CompletedProcess:
    """``learn_steps`` in a child process with ``CLIPLOOP_FAULT`` set (the fault kills it for real)."""
    import json

    return subprocess.run(
        [sys.executable, "-m", "tests.fault_steps", json.dumps(cfg.portable()), task_id],
        cwd=REPO,
        text=True,
        env=os.environ | {"CLIPLOOP_FAULT": fault},
        capture_output=True,
        timeout=300,
    )


def _states(cfg) -> dict[str, str]:
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        return {r.task_id: r.state for r in ledger.all()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _with_tracking(cfg, uri: str):
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


@contextlib.contextmanager
def _overloaded_gateway():
    """An HTTP server on 127.0.0.1 that answers every request ``503 Service Unavailable`` with an HTML body,
    as a load balancer in front of an overloaded or restarting MLflow server does. Yields (url, hit counter)."""
    hits = {"n": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _unavailable(self):
            hits["n"] += 1
            body = b"<html><body>503 Service Unavailable</body></html>"
            self.send_response(503)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _unavailable

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


# ---- defect 1: a reviewer's reject overridden by a concurrent approve ---------------------------------------


def test_a_reject_while_an_approve_waits_wins_and_the_approve_says_it_lost(tmp_path, tiny_checkpoint, ingested):
    """An approver is delayed between reading the version's review and taking the registry lock; a reject lands
    in that window. The approve must fail (non-zero, "lost a race"), never promote the rejected version."""
    cfg = _cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = _learn(cfg)
    review.review_requested(cfg, version)
    mark = tmp_path / "approver-read-the-state"
    env = os.environ | {"CLIPLOOP_FAULT": f"after_decision_read:mark={mark},after_decision_read:sleep=4"}
    approver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "approve",
            str(version),
            "--reviewer",
            "rita",
            *_cli_args(cfg, tiny_checkpoint),
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not mark.exists() and approver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert mark.exists(), approver.communicate()[0]

    assert review.decide(cfg, version, "reject", "sam", "forgets cats")["changed"] is True
    out, _ = approver.communicate(timeout=120)

    assert approver.returncode != 0 and "lost a race" in out, out
    registry = from_config(cfg)
    assert registry.alias("champion") is None and registry.alias("challenger") is None
    tags = registry.version_tags(version)
    assert tags["review"] == "rejected" and tags["reviewer"] == "sam"
    assert _states(cfg) == {"t-a": "rejected"}
    # And a later approve of the rejected version is refused, naming the way back (requeue).
    with pytest.raises(chain.PipelineError, match="requeue t-a"):
        review.decide(cfg, version, "approve", "rita")


def test_a_timeout_never_overwrites_a_decision_made_a_moment_before(tmp_path, tiny_checkpoint, ingested):
    cfg = _cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = _learn(cfg)
    review.review_requested(cfg, version)
    review.decide(cfg, version, "approve", "rita")
    assert review.review_timed_out(cfg, version) is False
    review.review_requested(cfg, version)  # a resumed wait on a later night
    assert from_config(cfg).version_tags(version)["review"] == "approved"


# ---- defect 4: a crash between "version registered" and "alias set" -----------------------------------------


def test_a_kill_between_register_and_alias_is_resumed_by_the_rerun(tmp_path, tiny_checkpoint, ingested, prefect_api):
    from flows.cli import main

    cfg = _cfg(tmp_path, tiny_checkpoint, start=ingested)
    child = _steps_in_child(cfg, "t-a", "after_register:kill")
    assert child.returncode == -9, child.stderr[-2000:]
    registry = from_config(cfg)
    versions = registry.client.search_model_versions("name = 'cliploop'")
    assert [int(v.version) for v in versions] == [1] and registry.alias("challenger") is None  # the fault's state

    version, update = learn_steps(cfg, "t-a")  # the rerun
    assert version == 1 and len(registry.client.search_model_versions("name = 'cliploop'")) == 1
    assert registry.alias("challenger") == 1 and _states(cfg) == {"t-a": "learned"}
    assert review.apply_gate(cfg, version, update)["verdict"] == "pass"
    assert main(["lineage", "challenger", *_cli_args(cfg, tiny_checkpoint)]) == 0
    assert main(["approve", "challenger", "--reviewer", "rita", *_cli_args(cfg, tiny_checkpoint)]) == 0
    assert registry.alias("champion") == 1 and _states(cfg) == {"t-a": "promoted"}
    artifacts = {a.path for a in registry.client.list_artifacts(registry.model_version(1).run_id)}
    assert "lineage.json" in artifacts


# ---- kill -9 of a training step after a checkpoint --------------------------------------------------------


def test_a_kill_after_a_training_checkpoint_resumes_there_and_registers_one_version(
    tmp_path, tiny_checkpoint, ingested
):
    import json

    cfg = _cfg(
        tmp_path,
        tiny_checkpoint,
        "method.name=finetune",
        "method.settings.iterations=4",
        "method.settings.batch_size=2",
        "method.settings.checkpoint_every=2",
        "method.settings.warmup_steps=0",
        start=ingested,
    )
    assert _steps_in_child(cfg, "t-a", "after_checkpoint:kill").returncode == -9
    assert list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("checkpoint.json"))

    version, update = learn_steps(cfg, "t-a")
    training = json.loads((Path(update["out_dir"]) / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    registry = from_config(cfg)
    assert version == 1 and [int(v.version) for v in registry.versions()] == [1]


# ---- kill -9 / SIGTERM during the MLflow artifact upload --------------------------------------------------


def _runs(registry) -> list[tuple[str, str]]:
    return sorted(
        (r.info.status, r.data.tags.get("cliploop.abandoned", ""))
        for r in registry.client.search_runs([registry.experiment_id()])
    )


@pytest.mark.parametrize("signal_name", ["kill", "term"])
def test_a_kill_during_the_mlflow_upload_publishes_nothing_and_the_rerun_completes(
    tmp_path, tiny_checkpoint, ingested, signal_name, prefect_api
):
    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=0", start=ingested)
    fault = f"during_artifact_upload:{signal_name}"
    if signal_name == "kill":
        assert _steps_in_child(cfg, "t-a", fault).returncode == -9
        left = ("RUNNING", "")  # no code of ours ran after the kill
    else:  # a whole night in a child, stopped by SIGTERM mid-upload: it unwinds and says so
        night = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "nightly",
                *_cli_args(cfg, tiny_checkpoint),
                "--set",
                f"drop_zone={tmp_path / 'incoming'}",
                "--set",
                "approval.timeout_s=0",
            ],
            cwd=REPO,
            env=_env_with_prefect_api() | {"CLIPLOOP_FAULT": fault},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert night.returncode != 0, night.stdout[-2000:] + night.stderr[-2000:]
        left = ("FAILED", "")
        assert _states(cfg) == {"t-a": "failed"}
    registry = from_config(cfg)
    assert registry.versions() == [] and _runs(registry) == [left]  # nothing published

    version, _ = learn_steps(cfg, "t-a")
    assert version == 1 and [int(v.version) for v in registry.versions()] == [1]
    assert _runs(registry) == sorted([("FINISHED", ""), ("FAILED", "true" if signal_name == "kill" else "")])
    assert registry.alias("challenger") == 1 and _states(cfg) == {"t-a": "learned"}


# ---- defect 5: SIGTERM does not end a night; SIGKILL leaves Prefect's temporary server behind ------------


def _alive(processes) -> set:
    from flows.lifeline import running

    return running(processes)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _night_until_learning(cfg, ckpt, settings: list[str], env: dict | None = None) -> tuple[subprocess.Popen, set]:
    """``cliploop nightly`` in a child process, once its task is being learned: (process, its descendants)."""
    from flows.lifeline import descendants

    sets = [a for s in settings for a in ("--set", s)]
    log = cfg.workspace_path.parent / f"night-{time.time_ns()}.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "nightly", *_cli_args(cfg, ckpt), *sets],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 240
    while _states(cfg).get("t-a") != "learning" and child.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert _states(cfg).get("t-a") == "learning", f"never learning (exit {child.poll()}): {log.read_text()[-3000:]}"
    time.sleep(2)  # into the training loop
    return child, descendants(child.pid)


def test_sigterm_ends_a_night_within_seconds_and_sigkill_leaves_no_process_behind(tmp_path, tiny_checkpoint, ingested):
    settings = [
        f"drop_zone={tmp_path / 'incoming'}",
        "method.name=finetune",
        "method.settings.iterations=1000000",
        "method.settings.batch_size=2",
        "method.settings.warmup_steps=0",
        "approval.timeout_s=0",
    ]
    cfg = _cfg(tmp_path, tiny_checkpoint, *settings[1:], start=ingested)

    # The SIGTERM'd night talks to the module's Prefect server (starting a temporary one costs seconds here);
    # the SIGKILL'd one below starts its own, the process that must not outlive it.
    child, below = _night_until_learning(cfg, tiny_checkpoint, settings, _env_with_prefect_api())
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    assert time.monotonic() - started < 30 and child.returncode == 128 + signal.SIGTERM
    time.sleep(1)
    assert not _alive(below), [_cmdline(p) for p, _ in _alive(below)]
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        record = ledger.get("t-a")
    assert record.state == "failed" and "SIGTERM" in record.reason

    child, below = _night_until_learning(cfg, tiny_checkpoint, settings)  # the failed task is tried again
    assert any("uvicorn" in _cmdline(pid) for pid, _ in below)
    child.kill()
    child.wait(timeout=30)
    deadline = time.time() + 20
    while _alive(below) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(below), [_cmdline(p) for p, _ in _alive(below)]
    assert _states(cfg) == {"t-a": "learning"}  # no code of ours ran; the next night's reconcile says why

    # The next night is not blocked: the killed night's flow runs, left Running in Prefect's database, are
    # marked Crashed, the ledger entry is reclaimed, and the task is learned.
    import json

    quick = [*settings, "method.settings.iterations=2"]
    night = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "nightly",
            "--json",
            *_cli_args(cfg, tiny_checkpoint),
            *[a for s in quick for a in ("--set", s)],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = json.loads(night.stdout[night.stdout.index("{") :])
    assert len(summary["swept"]) == 2, summary  # the nightly flow run and its continual-update subflow run
    assert any("interrupted" in line for line in summary["reconciled"])
    assert [u["outcome"] for u in summary["updates"]] == ["awaiting-review"] and _states(cfg) == {"t-a": "learned"}


# ---- the MLflow server killed during registration and restarted ---------------------------------------------


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts served from a local folder)."""
    import urllib.request

    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            (root / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError("mlflow server did not start")


def _kill_group(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, all at once
    server.wait(timeout=30)


def test_the_mlflow_server_killed_during_registration_and_restarted_gives_one_version(
    tmp_path, tiny_checkpoint, ingested, monkeypatch
):
    port = _free_port()
    server = _mlflow_server(tmp_path, port)
    try:
        cfg = _cfg(tmp_path, tiny_checkpoint, f"mlflow.tracking_uri=http://127.0.0.1:{port}", start=ingested)
        chain.start_learning(cfg, "t-a")
        pools = {"t-a": steps.build_pool(cfg, "t-a")["pool_dir"]}
        update = steps.run_update(cfg, "t-a", None, pools)

        # The version is created, then the server dies before the alias is set.
        mark = tmp_path / "registered"
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("CLIPLOOP_FAULT", f"after_register:mark={mark},after_register:sleep=3")
        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(_try(registration.register_update, cfg, update)))
        worker.start()
        deadline = time.time() + 120
        while not mark.exists() and worker.is_alive() and time.time() < deadline:
            time.sleep(0.1)
        assert mark.exists(), outcome
        _kill_group(server)
        worker.join(120)
        assert retry.is_transient(outcome["error"])  # a step retry, not a failed task
        monkeypatch.delenv("CLIPLOOP_FAULT")

        server = _mlflow_server(tmp_path, port)  # back, on the same database
        registry = from_config(cfg)
        assert [int(v.version) for v in registry.versions()] == [1] and registry.alias("challenger") is None
        assert registration.register_update(cfg, update)["version"] == 1  # the retry
        assert [int(v.version) for v in registry.versions()] == [1] and registry.alias("challenger") == 1
        assert _states(cfg) == {"t-a": "learned"}
    finally:
        _kill_group(server)


def test_a_lost_answer_to_create_model_version_leaves_exactly_one_version(tmp_path, tiny_checkpoint, ingested):
    """The tracking server creates the version and the connection is reset before its answer arrives (the fault
    proxy, ``reset_at="response"``, once). MLflow's HTTP client retries the POST and the server creates a
    second version of the same run key. One version must survive, and the alias, the ledger and the step's
    result must all name it; the duplicate's number is recorded on the survivor."""
    from tests.s3_fault_proxy import S3FaultProxy

    port = _free_port()
    server = _mlflow_server(tmp_path, port)
    try:
        direct = f"http://127.0.0.1:{port}"
        with S3FaultProxy(
            direct, reset=1.0, reset_at="response", match=r"^POST .*/model-versions/create", limit=1
        ) as proxy:
            cfg = _cfg(tmp_path, tiny_checkpoint, f"mlflow.tracking_uri={proxy.url}", start=ingested)
            chain.start_learning(cfg, "t-a")
            pools = {"t-a": steps.build_pool(cfg, "t-a")["pool_dir"]}
            update = steps.run_update(cfg, "t-a", None, pools)
            result = registration.register_update(cfg, update)
            assert proxy.counts["reset"] == 1  # the fault happened
            creates = [a for k, a in proxy.log if "model-versions/create" in k]
            assert creates == ["reset", "forward"]  # and MLflow's client did send the request twice
        cfg = _with_tracking(cfg, direct)
        registry = from_config(cfg)
        assert [int(v.version) for v in registry.versions()] == [1] and result["version"] == 1
        assert registry.alias("challenger") == 1 and registry.version_tags(1)["duplicates_removed"] == "2"
        with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
            assert (ledger.get("t-a").state, ledger.get("t-a").model_version) == ("learned", "1")
        # The step run again (a retry after the answer was lost for good) finds the same one version.
        assert registration.register_update(cfg, update)["version"] == 1
    finally:
        _kill_group(server)


def _try(fn, *args) -> dict:
    try:
        return {"value": fn(*args)}
    except Exception as exc:  # handed to the test
        return {"error": exc}


# ---- defect 2: a transient MLflow error read as "absent" -----------------------------------------------------


def test_registry_reads_tell_absent_from_unreachable(tmp_path, tiny_checkpoint, ingested, monkeypatch):
    cfg = _cfg(tmp_path, tiny_checkpoint, start=ingested)
    registry = from_config(cfg)
    assert registry.alias("champion") is None  # no model registered yet: absent, not an error
    version = _learn(cfg)
    assert registry.alias("previous-champion") is None
    with pytest.raises(NotFound):
        registry.version_tags(version + 10)
    with pytest.raises(chain.PipelineError, match="no version 99"):
        review.decide(cfg, 99, "approve", "rita")

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = from_config(_with_tracking(cfg, f"http://127.0.0.1:{_free_port()}"))  # nobody listens there
    with pytest.raises(Exception) as refused:
        down.alias("champion")
    assert not isinstance(refused.value, NotFound) and retry.is_transient(refused.value)


def _env_with_prefect_api() -> dict[str, str]:
    """This process's environment, pointing a child's Prefect client at the module's server (``prefect_api``)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_an_mlflow_outage_is_retried_and_never_rewrites_the_ledger(
    tmp_path, tiny_checkpoint, ingested, monkeypatch, prefect_api
):
    """During an outage the nightly reconcile must not read "no champion" and reject every promoted task: the
    error propagates, the step's retries fire, and the ledger is exactly as it was."""
    from prefect import flow

    from flows.retry import step

    cfg = _cfg(tmp_path, tiny_checkpoint, "orchestration.retries=2", start=ingested)
    version = _learn(cfg)
    review.decide(cfg, version, "approve", "rita")
    before = _states(cfg)
    assert before == {"t-a": "promoted"}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own HTTP retries would take minutes

    refused = _with_tracking(cfg, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(Exception) as failed:
        chain.reconcile(refused)
    assert retry.is_transient(failed.value)
    assert _states(cfg) == before

    with _overloaded_gateway() as (url, hits):
        overloaded = _with_tracking(cfg, url)

        @flow
        def night_start():
            return step(chain.reconcile, overloaded)(overloaded)

        with pytest.raises(Exception) as failed:
            night_start()
    assert retry.is_transient(failed.value)
    assert hits["n"] == 3  # the first read of each of the three attempts (1 + 2 retries) got a 503
    assert _states(cfg) == before

    assert chain.reconcile(cfg) == [] and _states(cfg) == before  # MLflow back: nothing to change


def _paused_run(cfg, version: int, timeout: float = 240):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.time() + timeout
    while time.time() < deadline:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=flt):
                if run.state.state_details.pause_key == review.pause_key(cfg, version):
                    return run
        time.sleep(0.5)
    raise AssertionError(f"no flow run paused for version {version}")


def test_a_decision_given_after_the_night_died_is_applied_by_the_next_night(
    tmp_path, tiny_checkpoint, ingested, prefect_api
):
    """The night is SIGKILLed while its run waits for a review; a reviewer then resumes that run from the Prefect
    UI with an approval (the API call the UI makes): Prefect stores the input and marks the run Running, with
    no process to read it. The next night must apply the approval (not tag the version timed-out) and mark the
    dead run Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.nightly import run_night

    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=600", start=ingested)
    log = tmp_path / "night.log"
    with open(log, "w") as out:
        night = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "nightly", *_cli_args(cfg, tiny_checkpoint)]
            + ["--set", "approval.timeout_s=600", "--set", f"drop_zone={tmp_path / 'incoming'}"],
            cwd=REPO,
            env=_env_with_prefect_api(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run = _paused_run(cfg, 1)
    finally:
        _kill_group(night)
    assert from_config(cfg).version_tags(1)["review"] == "pending", log.read_text()[-2000:]
    resume_flow_run(run.id, run_input={"decision": "approve", "reviewer": "rita", "note": "looks right"})

    summary = run_night(cfg)
    assert any(line.startswith("v1: approve by rita") and "applied" in line for line in summary["reconciled"])
    assert str(run.id) in summary["swept"]
    registry = from_config(cfg)
    tags = registry.version_tags(1)
    assert registry.alias("champion") == 1 and (tags["review"], tags["reviewer"]) == ("approved", "rita")
    assert _states(cfg) == {"t-a": "promoted"}
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.type.value == "CRASHED"


def _events(cfg) -> list[dict]:
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        return ledger.events()


def test_an_empty_registry_changes_nothing_and_names_what_it_lacks(
    tmp_path, tiny_checkpoint, ingested, prefect_api, capsys
):
    """A night pointed at a reachable but empty registry (``--set mlflow.tracking_uri=sqlite:///empty.db``, as an
    operator moving to the stack's new server would) must stop before reconciling, name that registry and the
    versions it lacks, and change nothing; back on the workspace's registry the night goes on as before; a
    deliberate move is ``cliploop move-registry`` (a dry run first); ``lineage --verify`` fails while the
    registry lacks a version the ledger names."""
    from flows.cli import main

    cfg = _cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = _learn(cfg)
    review.decide(cfg, version, "approve", "rita")
    assert chain.reconcile(cfg) == [] and _states(cfg) == {"t-a": "promoted"}
    args, events = _cli_args(cfg, tiny_checkpoint), _events(cfg)
    empty = ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'empty.db'}"]

    capsys.readouterr()
    assert main(["nightly", *args, *empty]) == 3
    err = capsys.readouterr().err
    assert "empty.db" in err and "v1 (task t-a, promoted) is missing" in err and "move-registry" in err
    assert _states(cfg) == {"t-a": "promoted"} and _events(cfg) == events

    assert main(["nightly", *args]) == 0  # the workspace's own registry: nothing to do, nothing changed
    assert _states(cfg) == {"t-a": "promoted"} and from_config(cfg).alias("champion") == version

    assert main(["move-registry", *args, *empty]) == 0  # a dry run
    assert "t-a: v1 is not there; promoted -> validated" in capsys.readouterr().out
    assert _states(cfg) == {"t-a": "promoted"}

    # A version the ledger names, deleted from the registry by hand: lineage --verify says so (exit 1).
    registry = from_config(cfg)
    _ingest(cfg, tmp_path, "t-b", ["emu", "owl"])
    rejected = _learn(cfg, "t-b")
    review.decide(cfg, rejected, "reject", "sam", "not yet")
    assert main(["lineage", "champion", "--verify", *args]) == 0
    registry.client.delete_model_version(registry.model_name, str(rejected))
    capsys.readouterr()
    assert main(["lineage", "champion", "--verify", *args]) == 1
    assert f"v{rejected} (task t-b, rejected) is missing" in capsys.readouterr().out

    assert main(["move-registry", "--yes", *args, *empty]) == 0
    assert _states(cfg) == {"t-a": "validated", "t-b": "rejected"}
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        assert ledger.get("t-a").model_version is None and ledger.get("t-b").model_version is None
        assert [e["to_state"] for e in ledger.events("t-a")][-2:] == ["rejected", "validated"]
    capsys.readouterr()
    assert main(["nightly", *args]) == 3  # the old registry is not the workspace's any more
    assert "empty.db" in capsys.readouterr().err


# ---- defect 3: shard bytes trained on without a check -------------------------------------------------------


def _flip_a_bit_inside_an_image(cfg, task_id: str) -> dict:
    from components.intake.shards import read_index

    folder = cfg.workspace_path / "data" / "tasks" / task_id
    row = next(r for r in read_index(folder / "index.csv") if r["split"] == "train")
    shard = folder / "shards" / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + row["size"] - 8] ^= 0x10  # in the JPEG's entropy-coded data, before its end marker
    os.chmod(shard, 0o644)
    shard.write_bytes(bytes(data))
    return row | {"damaged": bytes(data[row["offset"] : row["offset"] + row["size"]])}


@pytest.mark.parametrize("method", ["finetune", "lvp"])
def test_a_flipped_bit_in_a_stored_shard_stops_the_step_naming_shard_and_row(
    tmp_path, tiny_checkpoint, ingested, method, capsys
):
    from components.intake.shards import CorruptShard
    from components.model.data import decode_rgb

    extra = (
        ["method.settings.iterations=2", "method.settings.batch_size=2", "method.settings.warmup_steps=0"]
        if method == "finetune"
        else []
    )
    cfg = _cfg(tmp_path, tiny_checkpoint, f"method.name={method}", *extra, start=ingested)
    row = _flip_a_bit_inside_an_image(cfg, "t-a")
    decode_rgb(row["damaged"])  # the damaged JPEG still decodes: only the checksum can tell

    chain.start_learning(cfg, "t-a")
    with pytest.raises(CorruptShard) as corrupt:
        pools = {"t-a": steps.build_pool(cfg, "t-a")["pool_dir"]} if steps.builds_pools(cfg) else {}
        steps.run_update(cfg, "t-a", None, pools)
    message = str(corrupt.value)
    assert row["shard"] in message and row["path"] in message and "SHA-256" in message
    assert not retry.is_transient(corrupt.value)  # retrying cannot fix damaged data
    assert not list((cfg.workspace_path / ".cliploop" / "runs").glob("*/result.json"))

    # `cliploop learn` on the stored task says the same in one line (exit 1), no traceback.
    from flows.cli import main

    capsys.readouterr()
    stored = str(cfg.workspace_path / "data" / "tasks" / "t-a")
    argv = ["learn", "--method", method, stored, *_cli_args(cfg, tiny_checkpoint)]
    assert main([*argv, *[a for s in extra for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err
    assert "stored task data damaged" in err and row["path"] in err and "Traceback" not in err


def test_the_sweep_recognises_this_chain_by_config_or_by_config_path(tmp_path, tiny_checkpoint):
    """The deployed nightly is started with ``config_path``, its subflows with the portable ``config``: a zombie
    of either kind is this chain's; another workspace's is not."""
    from flows.nightly import _chain_of

    cfg = _cfg(tmp_path, tiny_checkpoint)
    path = tmp_path / "cliploop.yaml"
    path.write_text(f"workspace: {cfg.workspace_path}\n")
    ours = {str(cfg.workspace_path), cfg.mlflow.registered_model}
    assert _chain_of({"config": cfg.portable()}) == ours
    assert _chain_of({"config_path": str(path), "overrides": None}) == ours
    assert _chain_of({"config_path": str(tmp_path / "gone.yaml")}) != ours
    other = cfg.portable() | {"workspace": str(tmp_path / "elsewhere")}
    assert _chain_of({"config": other}) != ours
