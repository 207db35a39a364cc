"""The reviewer's side of the nightly flow on the embedded default (real Prefect test API, MLflow on SQLite, DVC,
Great Expectations): a reviewer approving / rejecting / not answering / rolling back, an approval reaching only its
own workspace's paused run, an alias moved by hand and decisions taken in MLflow, one night per chain at a time,
the demo with its lineage, and the steps' retries. Whole nights are ``tests/test_flows.py``.
"""

from __future__ import annotations

import contextvars
import json
import re
import threading
import time

import pytest

from components.pipeline import chain, review
from components.registry.registry import from_config
from components.settings.config_loading import load_config
from flows import retry
from flows.nightly import run_night
from tests.flow_kit import flow_cfg, flow_drop, flow_states

pytestmark = pytest.mark.usefixtures("prefect_api")


def _in_background(fn):
    """Run ``fn`` in a thread that sees this test's Prefect settings (they live in context variables)."""
    ctx = contextvars.copy_context()
    result: dict = {}

    def target():
        try:
            result["value"] = ctx.run(fn)
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _wait_for_pause(cfg, version: int, timeout: float = 120, task_id: str | None = None) -> None:
    """Until a flow run is paused for ``version``'s review (``task_id``: the run learning that task)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.time() + timeout
    while time.time() < deadline:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=flt):
                if run.state.state_details.pause_key == review.pause_key(cfg, version) and (
                    task_id is None or run.name == f"update-{task_id}"
                ):
                    return
        time.sleep(0.5)
    raise AssertionError(f"no flow run paused for version {version}")


def test_approve_reject_timeout_and_rollback(tmp_path, tiny_checkpoint):
    from flows.cli import main
    from flows.update import resume_waiting

    cfg = flow_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=120")
    registry = from_config(cfg)
    ws = [
        "-w",
        str(cfg.workspace_path),
        "--set",
        f"model.checkpoint={tiny_checkpoint[0]}",
        "--set",
        f"model.sha256={tiny_checkpoint[1]}",
        "--set",
        "model.name=cliploop-tiny",
        "--set",
        "model.pretrained=null",
    ]

    # Night 1: the flow pauses for a reviewer; `cliploop approve` decides and resumes it.
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    night, result = _in_background(lambda: run_night(cfg))
    _wait_for_pause(cfg, 1)
    assert registry.version_tags(1)["review"] == "pending" and registry.alias("challenger") == 1
    assert main(["approve", "1", "--reviewer", "rita", "--note", "looks right", *ws]) == 0
    night.join(120)
    assert result["value"]["updates"][0]["outcome"] == "promoted"
    assert registry.alias("champion") == 1 and registry.version_tags(1)["reviewer"] == "rita"
    assert flow_states(cfg)["t-a"] == "promoted"

    # Night 2: the reviewer rejects through the paused run's input (as in the Prefect UI).
    flow_drop(tmp_path, "t-b", ["emu", "owl"])
    night, result = _in_background(lambda: run_night(cfg))
    _wait_for_pause(cfg, 2)
    assert len(resume_waiting(cfg, 2, "reject", "sam", "forgets cats")) == 1
    night.join(120)
    assert result["value"]["updates"][0]["outcome"] == "rejected"
    assert registry.alias("champion") == 1 and registry.version_tags(2)["review_note"] == "forgets cats"
    assert flow_states(cfg)["t-b"] == "rejected"

    # Night 3: nobody answers; the version stays challenger, tagged timed-out; the ledger waits.
    quick = flow_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=3")
    flow_drop(tmp_path, "t-c", ["yak", "elk"])
    summary = run_night(quick)
    assert summary["updates"][0]["outcome"] == "awaiting-review"
    assert registry.alias("challenger") == 3 and registry.version_tags(3)["review"] == "timed-out"
    assert flow_states(cfg)["t-c"] == "learned" and registry.alias("champion") == 1

    # Approved later from the shell; then rolled back: v1 is champion again and t-c leaves the chain.
    assert main(["approve", "challenger", "--reviewer", "rita", *ws]) == 0
    assert registry.alias("champion") == 3 and registry.alias("previous-champion") == 1
    assert main(["rollback", "--reviewer", "rita", "--note", "bad in production", *ws]) == 0
    assert registry.alias("champion") == 1 and registry.version_tags(3)["review"] == "rolled-back"
    assert flow_states(cfg)["t-c"] == "rejected"
    assert main(["requeue", "t-b", *ws]) == 0 and flow_states(cfg)["t-b"] == "validated"
    # A promoted task (the champion's) or an unknown one cannot be re-queued; the ledger stays as it was.
    before = flow_states(cfg)
    assert main(["requeue", "t-a", *ws]) == 1 and main(["requeue", "nope", *ws]) == 1
    assert flow_states(cfg) == before


def _cli_workspace(cfg, ckpt) -> list[str]:
    return [
        "-w",
        str(cfg.workspace_path),
        *[f"--set={kv}" for kv in (f"model.checkpoint={ckpt[0]}", f"model.sha256={ckpt[1]}")],
        "--set=model.name=cliploop-tiny",
        "--set=model.pretrained=null",
    ]


def test_an_approval_reaches_only_its_own_workspaces_paused_run(tmp_path, tiny_checkpoint):
    """Two workspaces on one Prefect server, each night paused for the review of its own version 1 (both
    chains number from 1). ``cliploop approve 1 -w A`` must resume A's run only: B's run stays paused, B's
    version 1 stays pending with no reviewer, until B's own reviewer rejects it."""
    from flows.cli import main

    cfg_a = flow_cfg(tmp_path / "a", tiny_checkpoint, "approval.timeout_s=150")
    cfg_b = flow_cfg(tmp_path / "b", tiny_checkpoint, "approval.timeout_s=150")
    flow_drop(tmp_path / "a", "t-a", ["cat", "dog"])
    flow_drop(tmp_path / "b", "t-b", ["emu", "owl"])
    # One after the other: registering uses MLflow's process-wide tracking URI (nights run in their own
    # processes in production; here they share the test's process and its Prefect server).
    night_a, result_a = _in_background(lambda: run_night(cfg_a))
    _wait_for_pause(cfg_a, 1, timeout=240, task_id="t-a")
    night_b, result_b = _in_background(lambda: run_night(cfg_b))
    _wait_for_pause(cfg_b, 1, timeout=240, task_id="t-b")
    assert review.pause_key(cfg_a, 1) != review.pause_key(cfg_b, 1)

    assert main(["approve", "1", "--reviewer", "rita", *_cli_workspace(cfg_a, tiny_checkpoint)]) == 0
    night_a.join(120)
    assert result_a["value"]["updates"][0]["outcome"] == "promoted"
    registry_a, registry_b = from_config(cfg_a), from_config(cfg_b)
    assert registry_a.alias("champion") == 1 and registry_a.version_tags(1)["reviewer"] == "rita"
    # B's run still waits, its version undecided.
    assert night_b.is_alive()
    _wait_for_pause(cfg_b, 1, timeout=5, task_id="t-b")
    tags_b = registry_b.version_tags(1)
    assert registry_b.alias("champion") is None and tags_b["review"] == "pending" and "reviewer" not in tags_b

    assert (
        main(
            ["reject", "1", "--reason", "not mine to say", "--reviewer", "sam", *_cli_workspace(cfg_b, tiny_checkpoint)]
        )
        == 0
    )
    night_b.join(120)
    assert result_b["value"]["updates"][0]["outcome"] == "rejected"
    assert registry_b.version_tags(1)["reviewer"] == "sam" and registry_a.version_tags(1)["review"] == "approved"


def test_alias_moved_by_hand_and_decisions_taken_in_mlflow(tmp_path, tiny_checkpoint, monkeypatch):
    """A reviewer works in MLflow (plain alias and tag writes, as the UI makes; no cliploop involved).

    Night 1: nobody answers t-a's v1. Between nights the champion alias is moved to v1 by hand: night 2
    honours it and records ``review=manual-alias``. Night 2 then waits for t-b's v2: the alias moved to it
    approves it, the run goes on to learn t-c on v2, and v3's review tag set to ``rejected`` rejects it.
    ``approval.timeout_s=30``: a decision not noticed within 30 s would end the wait as timed-out."""
    from flows import update

    monkeypatch.setattr(update, "REGISTRY_POLL_S", 0.5)
    cfg = flow_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=0")
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    summary = run_night(cfg)
    assert summary["updates"][0]["outcome"] == "awaiting-review" and flow_states(cfg)["t-a"] == "learned"
    registry = from_config(cfg)
    assert registry.alias("champion") is None

    registry.client.set_registered_model_alias("cliploop", "champion", "1")
    flow_drop(tmp_path, "t-b", ["emu", "owl"])
    flow_drop(tmp_path, "t-c", ["yak", "elk"])
    waiting = flow_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=30", "gate.max_forgetting=100")
    night, result = _in_background(lambda: run_night(waiting))
    _wait_for_pause(waiting, 2)
    registry.client.set_registered_model_alias("cliploop", "champion", "2")
    _wait_for_pause(waiting, 3)
    for key, value in (("reviewer", "sam"), ("review_note", "forgets cats"), ("review", "rejected")):
        registry.client.set_model_version_tag("cliploop", "3", f"cliploop.{key}", value)
    night.join(180)

    assert "error" not in result, result.get("error")
    summary = result["value"]
    assert any("t-a: learned -> promoted" in line for line in summary["reconciled"])
    assert "v1: champion without a review (alias moved by hand): review=manual-alias" in summary["reconciled"]
    assert (registry.version_tags(1)["review"], registry.version_tags(1)["reviewer"]) == ("manual-alias", "unknown")
    updates = [(u["task_id"], u["parent_version"], u["outcome"]) for u in summary["updates"]]
    assert updates == [("t-b", 1, "promoted"), ("t-c", 2, "rejected")]
    approved, rejected = registry.version_tags(2), registry.version_tags(3)
    assert (approved["review"], approved["reviewer"]) == ("approved", "unknown") and approved["review_at"]
    assert (rejected["review"], rejected["reviewer"], rejected["review_note"]) == ("rejected", "sam", "forgets cats")
    assert rejected["review_at"] and registry.alias("challenger") is None
    assert (registry.alias("champion"), registry.alias("previous-champion")) == (2, 1)
    assert flow_states(cfg) == {"t-a": "promoted", "t-b": "promoted", "t-c": "rejected"}


def test_one_night_per_chain_at_a_time(tmp_path, tiny_checkpoint):
    cfg = flow_cfg(tmp_path, tiny_checkpoint)
    with chain.chain_lock(cfg):
        with pytest.raises(chain.ChainBusy, match="being updated by pid"):
            run_night(cfg)
    with chain.chain_lock(cfg):  # released: taken again at once
        pass


def test_demo_runs_the_night_and_its_lineage_verifies(tmp_path, capsys, demo_cache):
    """`cliploop demo` end to end (its base model, built once for the test run, already in the cache), then the
    auditor's check."""
    from flows.cli import main

    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "quarantined digits-mislabeled" in out and "orchestration" in out
    # Where the night's time went: five parts, measured apart (flows/night_clock.py), that add up to the night.
    split = re.search(r"The night took ([\d.]+) s: (.*?) = (\d+)%", out)
    parts = [float(x) for x in re.findall(r"([\d.]+) s(?:,|$)", split.group(2))]
    assert len(parts) == 5 and abs(sum(parts) - float(split.group(1))) <= 5 * 0.05 + 1e-9, split.group(0)
    assert abs(int(split.group(3)) - 100 * parts[-1] / float(split.group(1))) <= 1, split.group(0)
    ws = tmp_path / "demo" / "workspace"
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=tmp_path)
    assert flow_states(cfg) == {
        "digits-0-4": "promoted",
        "digits-5-9": "promoted",
        "digits-chalk": "promoted",
        "digits-mislabeled": "quarantined",
    }
    assert main(["lineage", "champion", "-w", str(ws), "--json", "--verify"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [c["task"]["id"] for c in record["chain"]] == ["digits-chalk", "digits-5-9", "digits-0-4"]
    assert all(c["task"]["dvc_md5"] for c in record["chain"]) and record["verified"] is True

    shard = sorted((ws / "data" / "tasks" / "digits-5-9").rglob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["lineage", "champion", "-w", str(ws), "--json", "--verify"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["verified"] is False


def test_steps_retry_transient_errors_only(tmp_path, tiny_checkpoint):
    """A storage hiccup is retried (with backoff); a bug or bad data is not."""
    from botocore.exceptions import EndpointConnectionError
    from prefect import flow

    from flows.retry import step

    cfg = flow_cfg(tmp_path, tiny_checkpoint, "orchestration.retries=2")
    calls = {"flaky": 0, "broken": 0}

    def flaky(config):
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    def broken(config):
        calls["broken"] += 1
        raise ValueError("label 'ten' is not declared")

    @flow
    def night():
        first = step(flaky, cfg)(cfg)
        try:
            step(broken, cfg)(cfg)
        except ValueError:
            return first
        raise AssertionError("the broken step did not fail")

    assert night() == "ok" and calls == {"flaky": 3, "broken": 1}
    assert retry.is_transient(RuntimeError("wrapped")) is False
