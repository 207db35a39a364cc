"""The GPU steps (pool building; training + evaluation) as flows of their own, so they can be deployments
on the ``gpu`` work pool while the orchestrating flow stays on ``cpu`` (Prefect routes flow runs, not
tasks, to work pools).

``dispatch`` runs a step in-process when ``orchestration.gpu_pool`` is null (the embedded default) and as
a deployment run otherwise. Either way the arguments are plain data (the portable config, ids, the step's key,
the DVC content addresses of the tasks it reads) and the result is read back from the step's content-keyed
prefix in the artifact store (``artifacts.root``): artifacts cross as storage locations, never as Python
objects, and a worker never opens the orchestrator's ledger or folder. Each start of a deployment run is an
attempt that the dispatcher makes the step key's owner first (``components/support/fencing.py``): when a silent worker's
run is started again, the first run's process, if it still lives, can no longer write under the key.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from components.pipeline import chain, step_io, steps
from components.settings.config import Config
from components.settings.config_loading import config_from_doc
from components.support import progress
from flows import night_clock
from flows.progress import PrefectProgress

BUILD_POOL = "cliploop-build-pool"
TRAIN_EVALUATE = "cliploop-train-evaluate"
KINDS = {BUILD_POOL: "pools", TRAIN_EVALUATE: "runs"}  # where each step publishes in the artifact store


@flow(name=BUILD_POOL, flow_run_name="pool-{task_id}", persist_result=False)
def build_pool_flow(
    config: dict[str, Any],
    task_id: str,
    key: str | None = None,
    address: dict | None = None,
    attempt: str | None = None,
) -> dict[str, Any]:
    """One task's label-vector pool from the frozen encoder (independent of every other task)."""
    with progress.reporting(PrefectProgress()):  # on a worker: this run's progress artifacts
        return steps.build_pool(config_from_doc(config), task_id, key, address, attempt)


@flow(name=TRAIN_EVALUATE, flow_run_name="train-{task_id}", persist_result=False)
def train_evaluate_flow(
    config: dict[str, Any],
    task_id: str,
    parent_version: int | None = None,
    pools: dict[str, str] | None = None,
    key: str | None = None,
    addresses: dict[str, dict] | None = None,
    attempt: str | None = None,
) -> dict[str, Any]:
    """One continual step (train + evaluate) on top of ``parent_version``."""
    with progress.reporting(PrefectProgress()):
        return steps.run_update(config_from_doc(config), task_id, parent_version, pools, key, addresses, attempt)


def deployment_name(flow_name: str, config: Config) -> str:
    return f"{flow_name}/{config.orchestration.gpu_pool}"


def dispatch_many(config: Config, flow_name: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run several calls of one GPU step, concurrently on the pool's workers when there is a pool."""
    local = {BUILD_POOL: steps.build_pool, TRAIN_EVALUATE: steps.run_update}[flow_name]
    if not config.orchestration.gpu_pool:
        return [local(config, **call) for call in calls]
    calls = _handed(config, flow_name, calls)
    with night_clock.prefect_call():  # run and timed on the pool's workers; here, waiting on Prefect's API
        started = [_start(config, flow_name, call) for call in calls]
        return [_wait_and_read(config, flow_name, run, call) for run, call in zip(started, calls)]


def dispatch(config: Config, flow_name: str, **call: Any) -> dict[str, Any]:
    return dispatch_many(config, flow_name, [call])[0]


def _handed(config: Config, flow_name: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a worker needs besides the config, worked out here: each step's key and the DVC content addresses
    of the tasks it reads, so that it opens neither the ledger nor the workspace's data."""
    ids = {c["task_id"] for c in calls}
    if flow_name == BUILD_POOL:
        found = step_io.addresses(config, sorted(ids))
        return [c | {"key": steps.task_pool_key(config, c["task_id"]), "address": found[c["task_id"]]} for c in calls]
    # Training evaluates every learned task too: it is handed them all.
    found = step_io.addresses(config, sorted(ids | {r.task_id for r in chain.stored_tasks(config)}))
    keys = [steps.update_key(config, c["task_id"], c.get("parent_version")) for c in calls]
    return [c | {"key": key, "addresses": found} for c, key in zip(calls, keys)]


def _start(config: Config, flow_name: str, call: dict[str, Any]):
    from prefect.deployments import run_deployment

    # A new attempt owns the step's key from now on: a run started before (a silent worker's, marked Crashed)
    # whose process still lives can no longer write under it. None: the step is complete, the run returns it.
    held = step_io.store_of(config).claim(KINDS[flow_name], call["key"])
    return run_deployment(
        deployment_name(flow_name, config),
        parameters={"config": step_io.handed_config(config), **call, "attempt": held.id if held else None},
        timeout=0,
        tags=["cliploop", flow_name, chain_tag(config)],
    )


def chain_tag(config: Config) -> str:
    """Names a step's chain (workspace + registered model) on its flow run, without a path: a step handed no
    workspace is still found by the next night's sweep of runs that a dead worker left Running."""
    import hashlib

    chain_id = hashlib.sha256(f"{config.workspace_path}\n{config.mlflow.registered_model}".encode()).hexdigest()
    return f"cliploop-chain:{chain_id[:16]}"


WORKER_SILENCE_MIN_S = 15.0  # a worker quiet for longer than this (and 3 heartbeat intervals) is taken for dead


def _wait_and_read(config: Config, flow_name: str, run, call: dict[str, Any]) -> dict[str, Any]:
    """Wait for a step's flow run. A run whose worker died is marked Crashed; a Crashed run (its worker, pod or
    node failed, not its code) is started again, at most ``orchestration.retries`` times: another worker picks it
    up and resumes from the step's checkpoints."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + config.orchestration.gpu_timeout_s
    restarts = 0
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(run.id)
        while True:
            if finished.state and finished.state.is_crashed() and restarts < config.orchestration.retries:
                # Its infrastructure failed (a Kubernetes worker reports a Job whose pod or node died as
                # Crashed), not its code: started again, it resumes from its checkpoints.
                restarts += 1
                run = _start(config, flow_name, call)
                finished = client.read_flow_run(run.id)
            if finished.state and finished.state.is_final():
                break
            if time.monotonic() > deadline:
                raise chain.PipelineError(
                    f"{flow_name} run {run.id} ({call.get('task_id')}) did not finish within "
                    f"{config.orchestration.gpu_timeout_s} s (is a worker serving pool "
                    f"{config.orchestration.gpu_pool!r}?)"
                )
            dead = _dead_worker(client, finished)
            if dead:  # marked Crashed: the loop starts it again, or ends with that state
                _mark_crashed(client, finished, dead)
            else:
                time.sleep(1)
            finished = client.read_flow_run(run.id)
    if not finished.state.is_completed():
        state = finished.state.name if finished.state else "unknown"
        message = finished.state.message if finished.state else ""
        raise chain.PipelineError(f"{flow_name} run {run.id} ({call.get('task_id')}) ended {state}: {message}")
    store, kind = step_io.store_of(config), KINDS[flow_name]
    result = store.result(kind, call["key"])
    if result is None:
        raise chain.PipelineError(
            f"{flow_name} run {run.id} completed but published no result at {store.uri(kind, call['key'])} "
            "(does the worker reach the artifact store, artifacts.root?)"
        )
    where = {"pool_dir" if kind == "pools" else "out_dir": step_io.place(store, kind, call["key"])}
    return (
        result
        | where
        | {
            "flow_run_id": str(run.id),
            "work_pool": finished.work_pool_name,
            "restarts": restarts,
        }
    )


def _dead_worker(client, run) -> str | None:
    """The name of the worker that took ``run`` if it stopped sending heartbeats (its process or machine died).

    Prefect labels a run with the worker that submitted it; workers heartbeat every
    ``PREFECT_WORKER_HEARTBEAT_SECONDS``. A run whose worker fell silent stays Running for good otherwise."""
    from datetime import UTC, datetime

    if not (run.state and (run.state.is_running() or run.state.is_pending())):
        return None
    name = (run.labels or {}).get("prefect.worker.name")
    if not name or not run.work_pool_name:
        return None
    worker = next((w for w in client.read_workers_for_work_pool(run.work_pool_name) if w.name == name), None)
    if worker is None or worker.last_heartbeat_time is None:
        return None  # unknown to the server: not evidence of death
    silent = (datetime.now(UTC) - worker.last_heartbeat_time).total_seconds()
    return name if silent > max(3 * (worker.heartbeat_interval_seconds or 30), WORKER_SILENCE_MIN_S) else None


def _mark_crashed(client, run, worker: str) -> None:
    from prefect.states import Crashed

    client.set_flow_run_state(
        run.id,
        Crashed(message=f"its worker {worker!r} stopped sending heartbeats; the step is started again (cliploop)"),
        force=True,
    )
