"""The fault suite, the registry's part (``pytest -m faults``): the MLflow server killed during registration, a
lost answer to a create, an outage read as "absent", a decision given after the night died, an empty registry.
Each test injects its fault for real (see ``tests/test_faults.py`` and ``tests/README.md``); nothing is mocked."""

from __future__ import annotations

import contextlib
import os
import signal
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
from tests.conftest import REPO
from tests.fault_kit import (
    cli_args,
    env_with_prefect_api,
    fault_cfg,
    free_port,
    ingest,
    learn,
    overloaded_gateway,
    states,
    with_tracking,
)

pytestmark = pytest.mark.faults


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
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as the stack runs it (infra/stack.py)
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
    port = free_port()
    server = _mlflow_server(tmp_path, port)
    try:
        cfg = fault_cfg(tmp_path, tiny_checkpoint, f"mlflow.tracking_uri=http://127.0.0.1:{port}", start=ingested)
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
        assert states(cfg) == {"t-a": "learned"}
    finally:
        _kill_group(server)


def test_a_lost_answer_to_create_model_version_leaves_exactly_one_version(tmp_path, tiny_checkpoint, ingested):
    """The tracking server creates the version and the connection is reset before its answer arrives (the fault
    proxy, ``reset_at="response"``, once). MLflow's HTTP client retries the POST and the server creates a
    second version of the same run key. One version must survive, and the alias, the ledger and the step's
    result must all name it; the duplicate's number is recorded on the survivor."""
    from tests.s3_fault_proxy import S3FaultProxy

    port = free_port()
    server = _mlflow_server(tmp_path, port)
    try:
        direct = f"http://127.0.0.1:{port}"
        with S3FaultProxy(
            direct, reset=1.0, reset_at="response", match=r"^POST .*/model-versions/create", limit=1
        ) as proxy:
            cfg = fault_cfg(tmp_path, tiny_checkpoint, f"mlflow.tracking_uri={proxy.url}", start=ingested)
            chain.start_learning(cfg, "t-a")
            pools = {"t-a": steps.build_pool(cfg, "t-a")["pool_dir"]}
            update = steps.run_update(cfg, "t-a", None, pools)
            result = registration.register_update(cfg, update)
            assert proxy.counts["reset"] == 1  # the fault happened
            creates = [a for k, a in proxy.log if "model-versions/create" in k]
            assert creates == ["reset", "forward"]  # and MLflow's client did send the request twice
        cfg = with_tracking(cfg, direct)
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
    cfg = fault_cfg(tmp_path, tiny_checkpoint, start=ingested)
    registry = from_config(cfg)
    assert registry.alias("champion") is None  # no model registered yet: absent, not an error
    version = learn(cfg)
    assert registry.alias("previous-champion") is None
    with pytest.raises(NotFound):
        registry.version_tags(version + 10)
    with pytest.raises(chain.PipelineError, match="no version 99"):
        review.decide(cfg, 99, "approve", "rita")

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = from_config(with_tracking(cfg, f"http://127.0.0.1:{free_port()}"))  # nobody listens there
    with pytest.raises(Exception) as refused:
        down.alias("champion")
    assert not isinstance(refused.value, NotFound) and retry.is_transient(refused.value)


def test_an_mlflow_outage_is_retried_and_never_rewrites_the_ledger(
    tmp_path, tiny_checkpoint, ingested, monkeypatch, prefect_api
):
    """During an outage the nightly reconcile must not read "no champion" and reject every promoted task: the
    error propagates, the step's retries fire, and the ledger is exactly as it was."""
    from prefect import flow

    from flows.retry import step

    cfg = fault_cfg(tmp_path, tiny_checkpoint, "orchestration.retries=2", start=ingested)
    version = learn(cfg)
    review.decide(cfg, version, "approve", "rita")
    before = states(cfg)
    assert before == {"t-a": "promoted"}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own HTTP retries would take minutes

    refused = with_tracking(cfg, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Exception) as failed:
        chain.reconcile(refused)
    assert retry.is_transient(failed.value)
    assert states(cfg) == before

    with overloaded_gateway() as (url, hits):
        overloaded = with_tracking(cfg, url)

        @flow
        def night_start():
            return step(chain.reconcile, overloaded)(overloaded)

        with pytest.raises(Exception) as failed:
            night_start()
    assert retry.is_transient(failed.value)
    assert hits["n"] == 3  # the first read of each of the three attempts (1 + 2 retries) got a 503
    assert states(cfg) == before

    assert chain.reconcile(cfg) == [] and states(cfg) == before  # MLflow back: nothing to change


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

    cfg = fault_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=600", start=ingested)
    log = tmp_path / "night.log"
    with open(log, "w") as out:
        night = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "nightly", *cli_args(cfg, tiny_checkpoint)]
            + ["--set", "approval.timeout_s=600", "--set", f"drop_zone={tmp_path / 'incoming'}"],
            cwd=REPO,
            env=env_with_prefect_api(),
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
    assert states(cfg) == {"t-a": "promoted"}
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

    cfg = fault_cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = learn(cfg)
    review.decide(cfg, version, "approve", "rita")
    assert chain.reconcile(cfg) == [] and states(cfg) == {"t-a": "promoted"}
    args, events = cli_args(cfg, tiny_checkpoint), _events(cfg)
    empty = ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'empty.db'}"]

    capsys.readouterr()
    assert main(["nightly", *args, *empty]) == 3
    err = capsys.readouterr().err
    assert "empty.db" in err and "v1 (task t-a, promoted) is missing" in err and "move-registry" in err
    assert states(cfg) == {"t-a": "promoted"} and _events(cfg) == events

    assert main(["nightly", *args]) == 0  # the workspace's own registry: nothing to do, nothing changed
    assert states(cfg) == {"t-a": "promoted"} and from_config(cfg).alias("champion") == version

    assert main(["move-registry", *args, *empty]) == 0  # a dry run
    assert "t-a: v1 is not there; promoted -> validated" in capsys.readouterr().out
    assert states(cfg) == {"t-a": "promoted"}

    # A version the ledger names, deleted from the registry by hand: lineage --verify says so (exit 1).
    registry = from_config(cfg)
    ingest(cfg, tmp_path, "t-b", ["emu", "owl"])
    rejected = learn(cfg, "t-b")
    review.decide(cfg, rejected, "reject", "sam", "not yet")
    assert main(["lineage", "champion", "--verify", *args]) == 0
    registry.client.delete_model_version(registry.model_name, str(rejected))
    capsys.readouterr()
    assert main(["lineage", "champion", "--verify", *args]) == 1
    assert f"v{rejected} (task t-b, rejected) is missing" in capsys.readouterr().out

    assert main(["move-registry", "--yes", *args, *empty]) == 0
    assert states(cfg) == {"t-a": "validated", "t-b": "rejected"}
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        assert ledger.get("t-a").model_version is None and ledger.get("t-b").model_version is None
        assert [e["to_state"] for e in ledger.events("t-a")][-2:] == ["rejected", "validated"]
    capsys.readouterr()
    assert main(["nightly", *args]) == 3  # the old registry is not the workspace's any more
    assert "empty.db" in capsys.readouterr().err
