"""The nightly and continual_update flows on the embedded default: real Prefect (its test harness: a
temporary local API), real MLflow on a SQLite file, real DVC with a local remote, real Great Expectations.

Each test drives whole nights: a clean night, a quarantined task and a failing gate, a crash in training
and its rerun, a reviewer approving / rejecting / not answering / rolling back, an alias moved by hand, and
a reviewer deciding in MLflow.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time

import pytest

from components.intake.ledger import Ledger
from components.pipeline import chain, review
from components.registry.registry import from_config
from components.settings.config_loading import load_config
from flows import retry
from flows.nightly import NightFailed, run_night
from tests.conftest import pipeline_config
from tests.drops import make_task


@pytest.fixture(scope="module", autouse=True)
def prefect_api(tmp_path_factory):
    """One temporary Prefect API for the module (starting one costs seconds)."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _champion_predicts(cfg, registry, images, folder):
    """The champion loads as an MLflow pyfunc and names, for each image, the label its learner state's prediction
    rule gives (tests/expected_predictions.py, worked out here from the registered state, not by the served code)."""
    import mlflow
    import pandas as pd

    from components.model.state import LearnerState
    from tests.expected_predictions import expected_labels

    blobs = [p.read_bytes() for p in images]
    # The verified download first: MLflow's own load of a models:/ URI leaves a registered_model_meta file beside
    # the model that the pins (rightly) call an addition.
    state = LearnerState.load(registry.download_state(registry.alias("champion"), folder))
    expected = expected_labels(cfg, state, blobs)
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    predicted = mlflow.pyfunc.load_model("models:/cliploop@champion").predict(pd.DataFrame({"image": blobs}))
    assert list(predicted["label"]) == expected
    assert list(predicted["class_key"]) == [f"toy/{label}" for label in expected]
    return predicted


def _cfg(tmp_path, ckpt, *extra):
    return pipeline_config(tmp_path, ckpt, *extra)


def _drop(tmp_path, task_id, classes, **kw):
    return make_task(tmp_path / "incoming", task_id, classes, train=3, test=2, **kw)


def _states(cfg) -> dict[str, str]:
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        return {r.task_id: r.state for r in ledger.all()}


def _versions(registry) -> list[int]:
    return sorted(int(v.version) for v in registry.client.search_model_versions(f"name = '{registry.model_name}'"))


def test_clean_night_of_two_tasks(tmp_path, tiny_checkpoint):
    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true", "gate.max_forgetting=100")
    _drop(tmp_path, "t-a", ["cat", "dog"])
    _drop(tmp_path, "t-b", ["emu", "owl"])
    summary = run_night(cfg)

    assert [u["outcome"] for u in summary["updates"]] == ["promoted", "promoted"]
    assert [p["task_id"] for p in summary["pools"]] == ["t-a", "t-b"]
    assert _states(cfg) == {"t-a": "promoted", "t-b": "promoted"}
    registry = from_config(cfg)
    assert _versions(registry) == [1, 2]
    assert registry.alias("champion") == 2 and registry.alias("previous-champion") == 1
    tags = registry.version_tags(2)
    assert tags["parent_version"] == "1" and tags["task_id"] == "t-b" and tags["gate"] == "pass"
    assert tags["review"] == "auto" and tags["flow_run_id"] and tags["code_version"]

    # The MLflow run: metrics per task and for the chain, the resolved config, the task data as a DVC dataset.
    run = registry.client.get_run(registry.client.get_model_version("cliploop", "2").run_id)
    assert {"acc.t-a", "acc.t-b", "cl.last", "cl.forgetting"} <= set(run.data.metrics)
    assert run.data.params["method.name"] == "lvp"
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        md5 = ledger.get("t-b").dvc_md5
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [md5]
    artifacts = {a.path for a in registry.client.list_artifacts(run.info.run_id)}
    assert {"eval", "config.resolved.yaml", "validation", "lineage.json"} <= artifacts
    assert "perf.peak_mem_mb" in run.data.metrics

    # The version loads as a pyfunc and predicts, image by image, what its pools say (both tasks' test images).
    tests = [p for t in ("t-a", "t-b") for p in sorted((tmp_path / "incoming" / t / "img").glob("test-*.png"))]
    predicted = _champion_predicts(cfg, registry, tests, tmp_path / "served")
    assert len(set(predicted["label"])) > 1  # these images tell a constant answer from the pools' answers
    assert predicted["score"].between(0, 1).all()

    # Lineage of the champion verifies; a second night finds nothing to do and registers nothing.
    from components.registry.lineage import build_lineage

    record = build_lineage(registry, "champion", cfg.workspace_path, verify=True)
    assert record["verified"] is True and [c["task"]["id"] for c in record["chain"]] == ["t-b", "t-a"]
    again = run_night(cfg)
    assert again["updates"] == [] and _versions(registry) == [1, 2]
    assert {i["status"] for i in again["ingested"]} == {"unchanged"}


def test_a_fine_tuning_method_runs_the_night_and_its_version_serves(tmp_path, tiny_checkpoint):
    """GNSP through the whole pipeline: the second task starts from the first one's state as registered in
    MLflow (fine-tuned weights and Gram matrices), the loss curves are run metrics, the version predicts."""
    cfg = _cfg(
        tmp_path,
        tiny_checkpoint,
        "approval.auto_promote=true",
        "gate.max_forgetting=100",
        "method.name=gnsp",
        "method.settings.iterations=3",
        "method.settings.batch_size=4",
        "method.settings.warmup_steps=0",
    )
    _drop(tmp_path, "t-a", ["cat", "dog"])
    _drop(tmp_path, "t-b", ["emu", "owl"])
    summary = run_night(cfg)
    assert [u["outcome"] for u in summary["updates"]] == ["promoted", "promoted"]
    assert summary["pools"] == []  # only LVP builds pools ahead of training

    registry = from_config(cfg)
    run = registry.client.get_run(registry.client.get_model_version("cliploop", "2").run_id)
    assert run.data.params["method.name"] == "gnsp" and "perf.train_step_ms" in run.data.metrics
    history = registry.client.get_metric_history(run.info.run_id, "train.ce")
    assert [m.step for m in history] == [0, 1, 2]
    from components.model.state import LearnerState

    state = LearnerState.load(registry.download_state(2, tmp_path / "v2"))
    assert state.method == "gnsp" and state.task_ids == ["t-a", "t-b"] and state.weights is not None
    assert any(k.startswith("gnsp.gram.") for k in state.method_tensors)

    _champion_predicts(cfg, registry, sorted((tmp_path / "incoming" / "t-b" / "img").glob("*.png"))[:3], tmp_path / "v")


def test_quarantined_task_and_failing_gate_leave_the_champion_alone(tmp_path, tiny_checkpoint):
    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true")
    _drop(tmp_path, "t-a", ["cat", "dog"])
    run_night(cfg)
    registry = from_config(cfg)
    assert registry.alias("champion") == 1

    bad = _drop(tmp_path, "t-bad", ["emu", "owl"])
    (bad / "manifest.csv").write_text((bad / "manifest.csv").read_text() + "img/missing.png,emu,train\n")
    with _warnings_of_flow_runs() as warned:
        summary = run_night(cfg)
    assert not [w for w in warned if "t-bad" in w]  # the console hears of it once: from the night's summary
    assert [i["status"] for i in summary["ingested"] if i["task_id"] == "t-bad"] == ["quarantined"]
    assert summary["updates"] == [] and _versions(registry) == [1] and registry.alias("champion") == 1
    assert _states(cfg)["t-bad"] == "quarantined"
    assert (cfg.workspace_path / ".cliploop" / "quarantine" / "t-bad").is_dir()

    # A gate rule that cannot be met: the version is registered, tagged fail, rejected; champion untouched.
    strict = _cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true", "gate.min_zero_shot_retention=0.9")
    _drop(tmp_path, "t-c", ["emu", "owl"], salt="c")
    summary = run_night(strict)
    (update,) = summary["updates"]
    assert update["gate"] == "fail" and update["outcome"] == "rejected"
    assert "min_zero_shot_retention" in update["reasons"][0]
    tags = registry.version_tags(update["version"])
    assert tags["gate"] == "fail" and tags["review"] == "rejected" and tags["reviewer"] == review.REVIEWER_GATE
    assert json.loads(tags["gate_reasons"]) == update["reasons"]
    assert registry.alias("champion") == 1 and registry.alias("challenger") is None
    assert _states(strict)["t-c"] == "rejected"


@contextlib.contextmanager
def _warnings_of_flow_runs():
    """Warnings and errors of the flow runs' loggers (Prefect's console handler prints those on the console)."""
    import logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_progress_inside_a_flow_run_is_a_prefect_progress_artifact():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.context import FlowRunContext

    from components.support import progress
    from flows.progress import PrefectProgress

    @flow(persist_result=False)
    def work() -> str:
        with progress.reporting(PrefectProgress(every_s=0)), progress.tracked(4, "train t-x", unit="step") as steps:
            for _ in range(4):
                steps.advance(1)
        return str(FlowRunContext.get().flow_run.id)

    run_id = work()
    with progress.reporting(PrefectProgress(every_s=0)), progress.tracked(2, "outside t-x") as done:
        done.advance(2)  # no flow run: no artifact
    with get_client(sync_client=True) as client:
        keys = ["progress-train-t-x", "progress-outside-t-x"]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    (artifact,) = found
    assert (artifact.key, artifact.type, str(artifact.flow_run_id)) == ("progress-train-t-x", "progress", run_id)
    assert float(artifact.data) == 100.0 and artifact.description == "train t-x: 4 step"


def test_crash_in_training_then_rerun_registers_exactly_one_version(tmp_path, tiny_checkpoint, monkeypatch):
    import components.registry.registry
    import components.training.learn

    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true")
    _drop(tmp_path, "t-a", ["cat", "dog"])
    real_learn = components.training.learn.learn_step

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(components.training.learn, "learn_step", crash)
    with pytest.raises(NightFailed) as failed:
        run_night(cfg)
    assert "illegal memory access" in failed.value.summary["stopped"]
    registry = from_config(cfg)
    assert _versions(registry) == [] and registry.alias("champion") is None
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        record = ledger.get("t-a")
    assert record.state == "failed" and "illegal memory access" in record.reason

    # The next attempt dies after the MLflow run is logged, before the version exists.
    monkeypatch.setattr(components.training.learn, "learn_step", real_learn)
    real_register = components.registry.registry.Registry.register

    def die_registering(self, *args, **kwargs):
        raise RuntimeError("killed while registering (injected)")

    monkeypatch.setattr(components.registry.registry.Registry, "register", die_registering)
    with pytest.raises(NightFailed):
        run_night(cfg)
    assert _versions(registry) == [] and _states(cfg)["t-a"] == "failed"
    monkeypatch.setattr(components.registry.registry.Registry, "register", real_register)

    # A process that died mid-learning leaves the entry in `learning`: the next night reclaims it.
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        ledger.transition("t-a", "learning", expect=["failed"])
    summary = run_night(cfg)
    assert any("interrupted" in line for line in summary["reconciled"])
    assert summary["updates"][0]["outcome"] == "promoted" and summary["updates"][0]["cached"] is True
    assert _versions(registry) == [1] and registry.alias("champion") == 1
    runs = registry.client.search_runs([registry.experiment_id()])
    assert len(runs) == 1  # the run logged before the crash was reused, not logged twice
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        assert ledger.get("t-a").attempts == 3


def test_a_crash_mid_training_resumes_from_the_last_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    import components.training.trainer

    cfg = _cfg(
        tmp_path,
        tiny_checkpoint,
        "approval.auto_promote=true",
        "method.name=finetune",
        "method.settings.iterations=4",
        "method.settings.batch_size=2",
        "method.settings.checkpoint_every=1",
        "method.settings.warmup_steps=0",
    )
    _drop(tmp_path, "t-a", ["cat", "dog"])
    real_step = components.training.trainer.optimization_step

    def dies_at_step_2(method, optimizer, named, images, labels, ctx, step, indices=None):
        if step == 2:
            raise RuntimeError("worker lost (injected)")
        return real_step(method, optimizer, named, images, labels, ctx, step, indices)

    monkeypatch.setattr(components.training.trainer, "optimization_step", dies_at_step_2)
    with pytest.raises(NightFailed):
        run_night(cfg)
    assert _states(cfg)["t-a"] == "failed"
    assert list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("checkpoint.json"))

    monkeypatch.setattr(components.training.trainer, "optimization_step", real_step)
    summary = run_night(cfg)
    assert summary["updates"][0]["outcome"] == "promoted"
    run_dir = next((cfg.workspace_path / ".cliploop" / "runs").iterdir())
    training = json.loads((run_dir / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    assert not list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("*"))  # cleared once complete


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

    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=120")
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
    _drop(tmp_path, "t-a", ["cat", "dog"])
    night, result = _in_background(lambda: run_night(cfg))
    _wait_for_pause(cfg, 1)
    assert registry.version_tags(1)["review"] == "pending" and registry.alias("challenger") == 1
    assert main(["approve", "1", "--reviewer", "rita", "--note", "looks right", *ws]) == 0
    night.join(120)
    assert result["value"]["updates"][0]["outcome"] == "promoted"
    assert registry.alias("champion") == 1 and registry.version_tags(1)["reviewer"] == "rita"
    assert _states(cfg)["t-a"] == "promoted"

    # Night 2: the reviewer rejects through the paused run's input (as in the Prefect UI).
    _drop(tmp_path, "t-b", ["emu", "owl"])
    night, result = _in_background(lambda: run_night(cfg))
    _wait_for_pause(cfg, 2)
    assert len(resume_waiting(cfg, 2, "reject", "sam", "forgets cats")) == 1
    night.join(120)
    assert result["value"]["updates"][0]["outcome"] == "rejected"
    assert registry.alias("champion") == 1 and registry.version_tags(2)["review_note"] == "forgets cats"
    assert _states(cfg)["t-b"] == "rejected"

    # Night 3: nobody answers; the version stays challenger, tagged timed-out; the ledger waits.
    quick = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=3")
    _drop(tmp_path, "t-c", ["yak", "elk"])
    summary = run_night(quick)
    assert summary["updates"][0]["outcome"] == "awaiting-review"
    assert registry.alias("challenger") == 3 and registry.version_tags(3)["review"] == "timed-out"
    assert _states(cfg)["t-c"] == "learned" and registry.alias("champion") == 1

    # Approved later from the shell; then rolled back: v1 is champion again and t-c leaves the chain.
    assert main(["approve", "challenger", "--reviewer", "rita", *ws]) == 0
    assert registry.alias("champion") == 3 and registry.alias("previous-champion") == 1
    assert main(["rollback", "--reviewer", "rita", "--note", "bad in production", *ws]) == 0
    assert registry.alias("champion") == 1 and registry.version_tags(3)["review"] == "rolled-back"
    assert _states(cfg)["t-c"] == "rejected"
    assert main(["requeue", "t-b", *ws]) == 0 and _states(cfg)["t-b"] == "validated"
    # A promoted task (the champion's) or an unknown one cannot be re-queued; the ledger stays as it was.
    before = _states(cfg)
    assert main(["requeue", "t-a", *ws]) == 1 and main(["requeue", "nope", *ws]) == 1
    assert _states(cfg) == before


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

    cfg_a = _cfg(tmp_path / "a", tiny_checkpoint, "approval.timeout_s=150")
    cfg_b = _cfg(tmp_path / "b", tiny_checkpoint, "approval.timeout_s=150")
    _drop(tmp_path / "a", "t-a", ["cat", "dog"])
    _drop(tmp_path / "b", "t-b", ["emu", "owl"])
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
    cfg = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=0")
    _drop(tmp_path, "t-a", ["cat", "dog"])
    summary = run_night(cfg)
    assert summary["updates"][0]["outcome"] == "awaiting-review" and _states(cfg)["t-a"] == "learned"
    registry = from_config(cfg)
    assert registry.alias("champion") is None

    registry.client.set_registered_model_alias("cliploop", "champion", "1")
    _drop(tmp_path, "t-b", ["emu", "owl"])
    _drop(tmp_path, "t-c", ["yak", "elk"])
    waiting = _cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=30", "gate.max_forgetting=100")
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
    assert _states(cfg) == {"t-a": "promoted", "t-b": "promoted", "t-c": "rejected"}


def test_one_night_per_chain_at_a_time(tmp_path, tiny_checkpoint):
    cfg = _cfg(tmp_path, tiny_checkpoint)
    with chain.chain_lock(cfg):
        with pytest.raises(chain.ChainBusy, match="being updated by pid"):
            run_night(cfg)
    with chain.chain_lock(cfg):  # released: taken again at once
        pass


def test_demo_runs_the_night_and_its_lineage_verifies(tmp_path, capsys):
    """`cliploop demo` end to end (its base model is built here: ~10 s), then the auditor's check."""
    from flows.cli import main

    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "quarantined digits-mislabeled" in out and "orchestration" in out
    ws = tmp_path / "demo" / "workspace"
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=tmp_path)
    assert _states(cfg) == {
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

    cfg = _cfg(tmp_path, tiny_checkpoint, "orchestration.retries=2")
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
