"""``continual_update``: one task through validate-checked → pool → train → evaluate → register → gate → review.

A thin Prefect wrapper over ``components.pipeline.steps`` and ``components.pipeline.chain``: steps with retries
(``flows/retry.py``), a markdown artifact with the gate's verdict, and the reviewer's decision as a
typed input of a paused flow run. Results are not persisted by Prefect (its default serializer is
pickle); the steps cache their own results as JSON in content-addressed folders.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.input import RunInput

from components.pipeline import chain, registration, review, steps
from components.settings.config import Config
from components.settings.config_loading import config_from_doc
from components.support import progress
from flows import gpu, night_clock
from flows.console import review_wait_text
from flows.progress import WAIT_UNIT, say
from flows.retry import step

REVIEW_POLL_S = 2
# How often a paused run reads MLflow for a decision taken there (a reviewer's move is noticed within this).
REGISTRY_POLL_S = 5.0


class Review(RunInput):
    """What a reviewer answers to a paused update (Prefect UI, or `cliploop approve/reject`)."""

    decision: Literal["approve", "reject"]
    reviewer: str
    note: str = ""


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def await_review(config: Config, version: int, task_id: str) -> str:
    """Promote by rule (auto_promote), or pause for a reviewer; returns promoted | rejected | awaiting-review.

    The answer comes as the paused run's input (Prefect UI, ``cliploop approve|reject``) or is taken in MLflow
    (``review.registry_decision``: the ``champion`` alias or the ``cliploop.review`` tag), which a watcher
    reads every ``REGISTRY_POLL_S`` while the run waits and hands to the run as the same input. Either way
    ``review.decide`` applies it."""
    from prefect.artifacts import create_markdown_artifact

    log = get_run_logger()
    if config.approval.auto_promote:
        review.decide(config, version, "approve", review.REVIEWER_AUTO, "gate passed; approval.auto_promote is on")
        log.info("version %s promoted to champion (auto_promote)", version)
        return "promoted"
    answer = review.registry_decision(config, version)  # decided in MLflow since the last night
    if answer is None and config.approval.timeout_s <= 0:
        review.review_timed_out(config, version)
        return "awaiting-review"
    if answer is None:
        with night_clock.prefect_call():
            create_markdown_artifact(
                key=f"review-v{version}",
                markdown=(
                    f"# Review version {version} (task `{task_id}`)\n\nThis run is paused for "
                    f"{config.approval.timeout_s} s. Answer here (Resume, with decision/reviewer/note), from a "
                    f"shell:\n\n"
                    f"    cliploop approve {version} --reviewer NAME --note '...'\n"
                    f"    cliploop reject {version} --reviewer NAME --reason '...'\n\n"
                    f"or in MLflow: move the `champion` alias of `{config.mlflow.registered_model}` to version "
                    f"{version}, or set its tags `cliploop.reviewer`, `cliploop.review_note` and then "
                    f"`cliploop.review` = `approved` or `rejected`.\n\n"
                    f"`cliploop lineage {version}` shows what it was made from."
                ),
                description=f"approval request for version {version}",
            )
        review.review_requested(config, version)
        text = review_wait_text(version, task_id, config.mlflow.registered_model, config.approval.timeout_s)
        log.info("%s", text)
        # Prefect's own console lines stop at warnings: the console is told here, then shown the time waited.
        say(text)
        with progress.tracked(config.approval.timeout_s, f"waiting for a review of v{version}", unit=WAIT_UNIT):
            answer = _pause_for_review(config, version, log)
        if answer is None:
            answer = review.registry_decision(config, version)  # one that landed as the wait ended
            if answer is None and review.review_timed_out(config, version):
                log.warning("no review of version %s in %ss: it stays challenger", version, config.approval.timeout_s)
                return "awaiting-review"
    if answer is not None:
        try:
            review.decide(config, version, answer["decision"], answer["reviewer"], answer["note"])
        except chain.PipelineError as exc:
            log.error("the review of version %s could not be applied: %s", version, exc)
    return review.review_outcome(config, version)


def _pause_for_review(config: Config, version: int, log) -> dict[str, str] | None:
    """Pause the flow run for a ``Review`` input (up to ``approval.timeout_s``) while a watcher thread reads the
    registry; None if no answer came. One pause with one key (``review.pause_key``: the registry and the
    version), so the UI, the CLI and the watcher all resume it the same way, and the timeout is Prefect's own."""
    import contextvars
    import threading

    from prefect.flow_runs import FlowPauseTimeout, pause_flow_run

    stop = threading.Event()
    run_id = _flow_run_id()
    watcher = None
    if run_id is not None:
        # The copied context carries this run's Prefect settings (API URL) into the thread.
        watcher = threading.Thread(
            target=contextvars.copy_context().run,
            args=(_watch_registry, config, version, run_id, stop, log),
            name=f"cliploop-review-watch-v{version}",
            daemon=True,
        )
        watcher.start()
    try:
        answer = pause_flow_run(
            wait_for_input=Review,
            timeout=config.approval.timeout_s,
            poll_interval=REVIEW_POLL_S,
            key=review.pause_key(config, version),
        )
    except FlowPauseTimeout:
        return None
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=30)
    return {"decision": answer.decision, "reviewer": answer.reviewer, "note": answer.note}


def _watch_registry(config: Config, version: int, run_id: str, stop, log) -> None:
    """Until ``stop``: read the registry every ``REGISTRY_POLL_S``; a decision found there resumes the paused
    run with it as input. Errors (registry or API unreachable) are logged and the next poll tries again."""
    while not stop.wait(REGISTRY_POLL_S):
        try:
            answer = review.registry_decision(config, version)
            if answer is not None and _resume(run_id, review.pause_key(config, version), answer):
                log.info("found in the registry: %s version %s (%s)", answer["decision"], version, answer["reviewer"])
                return
        except Exception as exc:  # the wait goes on; the CLI, the UI and the timeout still end it
            log.warning("could not read the registry for a review of version %s: %s", version, exc)


def _resume(run_id: str, key: str, answer: dict[str, str]) -> bool:
    """Resume flow run ``run_id`` if it is paused under ``key`` (False if not paused yet)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    details = run.state.state_details if run.state and run.state.is_paused() else None
    if details is None or details.pause_key != key:
        return False
    resume_flow_run(run_id, run_input=answer)
    return True


@flow(name="continual-update", flow_run_name="update-{task_id}", persist_result=False)
def continual_update(task_id: str, config: dict[str, Any], pools: dict[str, str] | None = None) -> dict[str, Any]:
    """Learn one validated task on top of the champion, register it, gate it, and get it reviewed."""
    with night_clock.ours("continual-update"):
        return _update(task_id, config, pools)


def _update(task_id: str, config: dict[str, Any], pools: dict[str, str] | None) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    cfg = config_from_doc(config)
    log = get_run_logger()
    parent = chain.head(cfg)["version"]
    step(chain.start_learning, cfg)(cfg, task_id)
    try:
        pools = dict(pools or {})
        with progress.tracked(2, f"learn + register {task_id}", unit="step") as done:
            if steps.builds_pools(cfg) and task_id not in pools:
                pools[task_id] = gpu.dispatch(cfg, gpu.BUILD_POOL, task_id=task_id)["pool_dir"]
            update = gpu.dispatch(cfg, gpu.TRAIN_EVALUATE, task_id=task_id, parent_version=parent, pools=pools)
            done.advance(1)
            registered = step(registration.register_update, cfg)(cfg, update, _flow_run_id())
            done.advance(1)
    except BaseException as exc:
        chain.mark_failed(cfg, task_id, f"{type(exc).__name__}: {exc}")
        raise
    version = registered["version"]
    log.info(
        "task %s learned on %s: version %s (%s)",
        task_id,
        f"v{parent}" if parent else "the base model",
        version,
        ", ".join(f"{k}={v:.2f}" for k, v in update["metrics"].items() if isinstance(v, float)),
    )
    verdict = step(review.apply_gate, cfg)(cfg, version, update)
    with night_clock.prefect_call():
        create_markdown_artifact(
            key=f"gate-v{version}", markdown=verdict["markdown"], description=f"promotion gate of version {version}"
        )
    outcome = "rejected" if verdict["verdict"] != "pass" else await_review(cfg, version, task_id)
    return {
        "task_id": task_id,
        "version": version,
        "parent_version": parent,
        "gate": verdict["verdict"],
        "gate_checked": verdict["checked"],
        "reasons": verdict["reasons"],
        "outcome": outcome,
        "metrics": update["metrics"],
        "out_dir": update.get("out_dir"),
        "timings": update.get("timings"),
        "train_restarts": update.get("restarts", 0),
        "train_parent_pid": update.get("parent_pid"),
        "register_s": registered.get("seconds"),
        "cached": update.get("cached", False),
    }


def resume_waiting(config: Config, version: int, decision: str, reviewer: str, note: str = "") -> list[str]:
    """Hand a decision made outside Prefect (``cliploop approve``) to the flow runs paused for ``version`` of
    this configuration's registered model (``review.pause_key``); runs of other workspaces on the same
    Prefect server, waiting for their own version of that number, are left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        paused = client.read_flow_runs(flow_run_filter=flt, limit=200)
    key = review.pause_key(config, version)
    resumed = []
    for run in paused:
        details = run.state.state_details if run.state else None
        if details is not None and details.pause_key == key:
            resume_flow_run(run.id, run_input={"decision": decision, "reviewer": reviewer, "note": note})
            resumed.append(str(run.id))
    return resumed


def apply_left_decisions(client, run, config: Config) -> list[str]:
    """Review decisions given to a flow run of this chain whose night is gone (resumed in the Prefect UI after
    the process died: Prefect stores the input and marks the run Running, and no one reads it). Applied with
    ``review.decide`` like any other, unless the version was decided since; one line each."""
    import json

    prefix = f"paused-{review.pause_prefix(config)}"  # Prefect stores a paused run's input under this key
    lines = []
    for found in client.filter_flow_run_input(run.id, key_prefix=prefix, limit=20, exclude_keys=set()):
        number = found.key[len(prefix) :].removesuffix("-response")
        if not found.key.endswith("-response") or not number.isdigit():
            continue
        version, answer = int(number), json.loads(found.value)
        tags = chain.version_tags_or_none(chain.registry_of(config), version) or {}
        if tags.get("review") not in review.UNDECIDED:
            lines.append(
                f"v{version}: a decision left on dead flow run {run.id} ignored: decided since ({tags.get('review')})"
            )
            continue
        try:
            review.decide(config, version, answer["decision"], answer["reviewer"], answer.get("note", ""))
            lines.append(
                f"v{version}: {answer['decision']} by {answer['reviewer']}, given to flow run {run.id} after its "
                "night died: applied"
            )
        except chain.PipelineError as exc:
            lines.append(f"v{version}: the decision left on dead flow run {run.id} could not be applied: {exc}")
    return lines
