"""``continual_update``: one task through validate-checked → pool → train → evaluate → register → gate → review.

A thin Prefect wrapper over ``components.steps`` and ``components.chain``: steps with retries
(``flows/retry.py``), a markdown artifact with the gate's verdict, and the reviewer's decision as a
typed input of a paused flow run. Results are not persisted by Prefect (its default serializer is
pickle); the steps cache their own results as JSON in content-addressed folders.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.input import RunInput

from components import chain, review, steps
from components.config import Config
from components.config_loading import config_from_doc
from flows import gpu
from flows.retry import step

REVIEW_POLL_S = 2


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
    """Promote by rule (auto_promote), or pause for a reviewer; returns promoted | rejected | awaiting-review."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.flow_runs import FlowPauseTimeout, pause_flow_run

    log = get_run_logger()
    if config.approval.auto_promote:
        review.decide(config, version, "approve", review.REVIEWER_AUTO, "gate passed; approval.auto_promote is on")
        log.info("version %s promoted to champion (auto_promote)", version)
        return "promoted"
    if config.approval.timeout_s <= 0:
        review.review_timed_out(config, version)
        return "awaiting-review"
    create_markdown_artifact(
        key=f"review-v{version}",
        markdown=(
            f"# Review version {version} (task `{task_id}`)\n\nThis run is paused for "
            f"{config.approval.timeout_s} s. Answer here (Resume, with decision/reviewer/note) or from a shell:\n\n"
            f"    cliploop approve {version} --reviewer NAME --note '...'\n"
            f"    cliploop reject {version} --reviewer NAME --reason '...'\n\n"
            f"`cliploop lineage {version}` shows what it was made from."
        ),
        description=f"approval request for version {version}",
    )
    review.review_requested(config, version)
    log.info("waiting up to %ss for a review of version %s", config.approval.timeout_s, version)
    try:
        answer = pause_flow_run(
            wait_for_input=Review,
            timeout=config.approval.timeout_s,
            poll_interval=REVIEW_POLL_S,
            key=f"review-{version}",
        )
    except FlowPauseTimeout:
        if review.review_timed_out(config, version):
            log.warning("no review of version %s within %ss: it stays challenger", version, config.approval.timeout_s)
            return "awaiting-review"
        answer = None
    if answer is not None:
        try:
            review.decide(config, version, answer.decision, answer.reviewer, answer.note)
        except chain.PipelineError as exc:
            log.error("the review of version %s could not be applied: %s", version, exc)
    return review.review_outcome(config, version)


@flow(name="continual-update", flow_run_name="update-{task_id}", persist_result=False)
def continual_update(task_id: str, config: dict[str, Any], pools: dict[str, str] | None = None) -> dict[str, Any]:
    """Learn one validated task on top of the champion, register it, gate it, and get it reviewed."""
    from prefect.artifacts import create_markdown_artifact

    cfg = config_from_doc(config)
    log = get_run_logger()
    parent = chain.head(cfg)["version"]
    step(chain.start_learning, cfg)(cfg, task_id)
    try:
        pools = dict(pools or {})
        if steps.builds_pools(cfg) and task_id not in pools:
            pools[task_id] = gpu.dispatch(cfg, gpu.BUILD_POOL, task_id=task_id)["pool_dir"]
        update = gpu.dispatch(cfg, gpu.TRAIN_EVALUATE, task_id=task_id, parent_version=parent, pools=pools)
        registered = step(steps.register_update, cfg)(cfg, update, _flow_run_id())
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
    create_markdown_artifact(
        key=f"gate-v{version}", markdown=verdict["markdown"], description=f"promotion gate of version {version}"
    )
    outcome = "rejected" if verdict["verdict"] != "pass" else await_review(cfg, version, task_id)
    return {
        "task_id": task_id,
        "version": version,
        "parent_version": parent,
        "gate": verdict["verdict"],
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


def resume_waiting(version: int, decision: str, reviewer: str, note: str = "") -> list[str]:
    """Hand a decision made outside Prefect (``cliploop approve``) to the flow runs paused for ``version``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        paused = client.read_flow_runs(flow_run_filter=flt, limit=200)
    resumed = []
    for run in paused:
        details = run.state.state_details if run.state else None
        if details is not None and details.pause_key == f"review-{version}":
            resume_flow_run(run.id, run_input={"decision": decision, "reviewer": reviewer, "note": note})
            resumed.append(str(run.id))
    return resumed
