"""``nightly``: the scheduled deployment. Reconcile the ledger with the registry, ingest what arrived in
the drop zone, build the new tasks' pools (in parallel on the ``gpu`` pool when there is one), then learn
the tasks one at a time in arrival order, each on top of the champion the previous one left.

The chain stops at the first task that does not end promoted (awaiting review, rejected or failed): the
next task must build on a reviewed champion, so it waits for the next night. Quarantined tasks never
enter the chain. One nightly run per chain at a time (``chain.chain_lock``): a second one exits at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import get_current_settings, temporary_settings

from components.pipeline import chain, chain_method, review, steps
from components.settings.config_loading import config_from_doc, load_config
from components.support import progress
from flows import gpu, night_clock
from flows.progress import PrefectProgress
from flows.retry import step
from flows.update import apply_left_decisions, await_review, continual_update


class NightFailed(chain.PipelineError):
    """A task of the night failed; the summary is attached."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@flow(name="cliploop-nightly", persist_result=False)
def nightly(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """One night. ``config`` (portable, from another process) wins over ``config_path`` + ``overrides``.

    ``method``: a registered method name (`cliploop methods`) instead of the config's ``method.name``.
    """
    with night_clock.ours("nightly"):
        return _night(config_path, overrides, config, method)


def _night(config_path, overrides, config, method) -> dict[str, Any]:
    cfg = config_from_doc(config) if config else load_config(config_path, overrides or [])
    if method is not None and method != cfg.method.name:
        from components.methods import get_method

        get_method(method)  # an unknown name fails here, naming the registered ones
        # The configured settings belong to the configured method: the chosen one starts from its defaults.
        cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": method, "settings": {}})})
    chain_method.check(cfg)  # another method than the chain's: refused before anything changes (reads only)
    doc = cfg.portable()
    log = get_run_logger()
    summary: dict[str, Any] = {
        "swept": [],
        "reconciled": [],
        "ingested": [],
        "pools": [],
        "updates": [],
        "stopped": None,
    }
    with chain.chain_lock(cfg), progress.reporting(PrefectProgress()):
        with night_clock.prefect_call():  # queries and state changes in Prefect's API
            summary["swept"] = sweep_abandoned_runs(cfg, summary["reconciled"])
        for run in summary["swept"]:
            log.warning("flow run %s was left Running or Paused by a process that died: marked Crashed", run)
        summary["reconciled"] += step(chain.reconcile, cfg)(cfg)
        # Decisions taken in MLflow since the last night (no run of this chain waits for a review now).
        summary["reconciled"] += step(review.record_registry_changes, cfg)(cfg)
        for line in summary["reconciled"]:
            log.info("reconciled: %s", line)
        ingest = step(steps.ingest, cfg)
        locations = step(steps.discover, cfg)(cfg)
        with progress.tracked(len(locations), "ingest + validate", unit="drop") as ingested:
            for location in locations:
                outcome = ingest(location, cfg)
                summary["ingested"].append(outcome)
                ingested.advance(1)
                if outcome["status"] in ("quarantined", "refused"):  # INFO: the night's summary says it on the console
                    log.info(
                        "%s %s: %s",
                        outcome["status"].upper(),
                        outcome["task_id"] or location,
                        outcome["message"].splitlines()[0],
                    )
        waiting = {w["task_id"]: w for w in chain.awaiting_review(cfg) if w["gate"] == "pass"}

        def resume(task_id: str) -> dict[str, Any]:
            version = waiting[task_id]["version"]
            outcome = await_review(cfg, version, task_id)
            return {"task_id": task_id, "version": version, "gate": "pass", "outcome": outcome, "resumed_review": True}

        summary["stopped"] = chain.run_in_order(list(waiting), resume, summary["updates"])
        if summary["stopped"]:
            return summary
        todo = step(chain.pending_tasks, cfg)(cfg)
        pools: dict[str, str] = {}
        if todo and steps.builds_pools(cfg):
            with progress.tracked(len(todo), "build pools", unit="task") as pooled:
                built = gpu.dispatch_many(cfg, gpu.BUILD_POOL, [{"task_id": t} for t in todo])
                pooled.advance(len(built))
            summary["pools"] = built
            pools = {b["task_id"]: b["pool_dir"] for b in built}

        def update(task_id: str) -> dict[str, Any]:
            try:
                with night_clock.prefect_call(), _no_heartbeat():
                    return continual_update(task_id, doc, pools)  # a subflow: its body times itself
            except Exception as exc:
                summary["updates"].append(
                    {"task_id": task_id, "outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}
                )
                summary["stopped"] = f"task {task_id} failed: {exc}"
                raise NightFailed(summary["stopped"], summary) from exc

        summary["stopped"] = chain.run_in_order(todo, update, summary["updates"])
        if summary["stopped"]:
            log.info("stopping the chain: %s; later tasks wait for the next night", summary["stopped"])
    return summary


def _no_heartbeat():
    """For a subflow run in the night's process, whose flow run sends heartbeats already: its own would add a wait
    of up to a second as it ends (Prefect joins a heartbeat thread that sleeps in 1 s steps)."""
    if get_current_settings().flows.heartbeat_frequency is None:
        return contextlib.nullcontext()
    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def sweep_abandoned_runs(cfg, decisions: list[str] | None = None) -> list[str]:
    """Flow runs of this chain left ``Running`` or ``Paused`` by a process or worker that died become ``Crashed``.

    Prefect never does this by itself (a dead worker's run stays Running for good, a killed night's review
    stays Paused and can still be resumed in the UI). Called under the chain lock: no other night of this chain
    is alive, so a Running or Paused run of ours for the same workspace and registered model, other than this
    one and its parents, is a dead one. A review decision given to such a run is applied first
    (``update.apply_left_decisions``; its lines go to ``decisions``), never dropped."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    ours = {str(cfg.workspace_path), cfg.mlflow.registered_model}
    current = FlowRunContext.get()
    alive = {str(current.flow_run.id)} if current and current.flow_run else set()
    names = ["cliploop-nightly", "continual-update", gpu.BUILD_POOL, gpu.TRAIN_EVALUATE]
    swept = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=names)),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PAUSED]))
            ),
            limit=200,
        )
        for run in runs:
            mine = gpu.chain_tag(cfg) in (run.tags or []) or _chain_of(run.parameters or {}) == ours
            if str(run.id) in alive or not mine:
                continue
            if decisions is not None:
                decisions.extend(apply_left_decisions(client, run, cfg))
            client.set_flow_run_state(
                run.id,
                Crashed(message="its process or worker died while it was running; swept by the next night (cliploop)"),
                force=True,
            )
            swept.append(str(run.id))
    return swept


def _chain_of(parameters: dict[str, Any]) -> set[str | None]:
    """{workspace, registered model} of a flow run of ours, from its ``config`` (portable) or ``config_path``."""
    doc = parameters.get("config")
    if not doc and parameters.get("config_path") is not None:  # the deployed nightly: resolve the same file
        try:
            doc = load_config(parameters["config_path"], parameters.get("overrides") or []).portable()
        except Exception:  # a config that no longer loads is not this chain's
            return set()
    doc = doc or {}
    return {doc.get("workspace"), (doc.get("mlflow") or {}).get("registered_model")}


SHUTDOWN_GRACE_S = 10.0  # after SIGTERM/SIGINT, how long the night may take to unwind before it is ended


def run_night(config, **flow_options) -> dict[str, Any]:
    """Run one night in this process (no server needed); a failed task raises NightFailed with the summary.

    SIGTERM/SIGINT end it within seconds (``NightInterrupted``), and no process it started outlives it,
    even on SIGKILL (``flows/lifeline.py``)."""
    from flows.embedded_prefect import api_for_night
    from flows.lifeline import supervised

    flow_fn = nightly.with_options(**flow_options) if flow_options else nightly
    # The whole night as one piece of work: what no finer piece covers (Prefect's temporary server starting, the
    # reconcile, a registration) still shows on the console as time going by.
    with progress.tracked(1, "night", unit="night") as night, night_clock.night() as clock:
        try:
            with api_for_night() as waited:
                clock.server_wait_s = waited
                summary = supervised(
                    lambda: flow_fn(config=config.portable()),
                    on_hard_stop=lambda signum: chain.interrupted(config, signum),
                    grace_s=SHUTDOWN_GRACE_S,
                )
        except NightFailed as exc:
            exc.summary["clock"] = clock.report()
            raise
        night.advance(1)
    return {**summary, "clock": clock.report()}
