"""The nightly and continual_update flows on the embedded default: real Prefect (its test harness: a
temporary local API, one per test process: ``prefect_api`` in tests/conftest.py), real MLflow on a SQLite file,
real DVC with a local remote, real Great Expectations.

Each test drives whole nights: a clean night, a night of a fine-tuning method, a quarantined task and a failing
gate, a crash in training and its rerun, a crash resumed from its checkpoint. The reviewer's side (approve,
reject, timeout, rollback, an alias moved by hand, decisions in MLflow) is ``tests/test_flows_review.py``.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from components.intake.ledger import Ledger
from components.pipeline import review
from components.registry.registry import from_config
from flows.nightly import NightFailed, run_night
from tests.flow_kit import flow_cfg, flow_drop, flow_states, flow_versions

pytestmark = pytest.mark.usefixtures("prefect_api")


def _champion_predicts(cfg, registry, images, folder):
    """The champion loads as an MLflow pyfunc and names, for each image, the label its learner state's prediction
    rule gives (tests/expected_predictions.py, worked out here from the registered state, not by the served code)."""
    import mlflow
    import pandas as pd

    from components.model.state import LearnerState
    from tests.expected_predictions import expected_labels

    blobs = [p.read_bytes() for p in images]
    state = LearnerState.load(registry.download_state(registry.alias("champion"), folder))
    expected = expected_labels(cfg, state, blobs)
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    predicted = mlflow.pyfunc.load_model("models:/cliploop@champion").predict(pd.DataFrame({"image": blobs}))
    assert list(predicted["label"]) == expected
    assert list(predicted["class_key"]) == [f"toy/{label}" for label in expected]
    return predicted


def test_clean_night_of_two_tasks(tmp_path, tiny_checkpoint):
    cfg = flow_cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true", "gate.max_forgetting=100")
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    flow_drop(tmp_path, "t-b", ["emu", "owl"])
    summary = run_night(cfg)

    assert [u["outcome"] for u in summary["updates"]] == ["promoted", "promoted"]
    assert [p["task_id"] for p in summary["pools"]] == ["t-a", "t-b"]
    assert flow_states(cfg) == {"t-a": "promoted", "t-b": "promoted"}
    registry = from_config(cfg)
    assert flow_versions(registry) == [1, 2]
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
    assert again["updates"] == [] and flow_versions(registry) == [1, 2]
    assert {i["status"] for i in again["ingested"]} == {"unchanged"}


def test_a_fine_tuning_method_runs_the_night_and_its_version_serves(tmp_path, tiny_checkpoint):
    """GNSP through the whole pipeline: the second task starts from the first one's state as registered in
    MLflow (fine-tuned weights and Gram matrices), the loss curves are run metrics, the version predicts."""
    cfg = flow_cfg(
        tmp_path,
        tiny_checkpoint,
        "approval.auto_promote=true",
        "gate.max_forgetting=100",
        "method.name=gnsp",
        "method.settings.iterations=3",
        "method.settings.batch_size=4",
        "method.settings.warmup_steps=0",
    )
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    flow_drop(tmp_path, "t-b", ["emu", "owl"])
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
    cfg = flow_cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true")
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    run_night(cfg)
    registry = from_config(cfg)
    assert registry.alias("champion") == 1

    bad = flow_drop(tmp_path, "t-bad", ["emu", "owl"])
    (bad / "manifest.csv").write_text((bad / "manifest.csv").read_text() + "img/missing.png,emu,train\n")
    with _warnings_of_flow_runs() as warned:
        summary = run_night(cfg)
    assert not [w for w in warned if "t-bad" in w]  # the console hears of it once: from the night's summary
    assert [i["status"] for i in summary["ingested"] if i["task_id"] == "t-bad"] == ["quarantined"]
    assert summary["updates"] == [] and flow_versions(registry) == [1] and registry.alias("champion") == 1
    assert flow_states(cfg)["t-bad"] == "quarantined"
    assert (cfg.workspace_path / ".cliploop" / "quarantine" / "t-bad").is_dir()

    # A gate rule that cannot be met: the version is registered, tagged fail, rejected; champion untouched.
    strict = flow_cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true", "gate.min_zero_shot_retention=0.9")
    flow_drop(tmp_path, "t-c", ["emu", "owl"], salt="c")
    summary = run_night(strict)
    (update,) = summary["updates"]
    assert update["gate"] == "fail" and update["outcome"] == "rejected"
    assert "min_zero_shot_retention" in update["reasons"][0]
    tags = registry.version_tags(update["version"])
    assert tags["gate"] == "fail" and tags["review"] == "rejected" and tags["reviewer"] == review.REVIEWER_GATE
    assert json.loads(tags["gate_reasons"]) == update["reasons"]
    assert registry.alias("champion") == 1 and registry.alias("challenger") is None
    assert flow_states(strict)["t-c"] == "rejected"


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

    cfg = flow_cfg(tmp_path, tiny_checkpoint, "approval.auto_promote=true")
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    real_learn = components.training.learn.learn_step

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(components.training.learn, "learn_step", crash)
    with pytest.raises(NightFailed) as failed:
        run_night(cfg)
    assert "illegal memory access" in failed.value.summary["stopped"]
    registry = from_config(cfg)
    assert flow_versions(registry) == [] and registry.alias("champion") is None
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
    assert flow_versions(registry) == [] and flow_states(cfg)["t-a"] == "failed"
    monkeypatch.setattr(components.registry.registry.Registry, "register", real_register)

    # A process that died mid-learning leaves the entry in `learning`: the next night reclaims it.
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        ledger.transition("t-a", "learning", expect=["failed"])
    summary = run_night(cfg)
    assert any("interrupted" in line for line in summary["reconciled"])
    assert summary["updates"][0]["outcome"] == "promoted" and summary["updates"][0]["cached"] is True
    assert flow_versions(registry) == [1] and registry.alias("champion") == 1
    runs = registry.client.search_runs([registry.experiment_id()])
    assert len(runs) == 1  # the run logged before the crash was reused, not logged twice
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        assert ledger.get("t-a").attempts == 3


def test_a_crash_mid_training_resumes_from_the_last_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    import components.training.trainer

    cfg = flow_cfg(
        tmp_path,
        tiny_checkpoint,
        "approval.auto_promote=true",
        "method.name=finetune",
        "method.settings.iterations=4",
        "method.settings.batch_size=2",
        "method.settings.checkpoint_every=1",
        "method.settings.warmup_steps=0",
    )
    flow_drop(tmp_path, "t-a", ["cat", "dog"])
    real_step = components.training.trainer.optimization_step

    def dies_at_step_2(method, optimizer, named, images, labels, ctx, step, indices=None):
        if step == 2:
            raise RuntimeError("worker lost (injected)")
        return real_step(method, optimizer, named, images, labels, ctx, step, indices)

    monkeypatch.setattr(components.training.trainer, "optimization_step", dies_at_step_2)
    with pytest.raises(NightFailed):
        run_night(cfg)
    assert flow_states(cfg)["t-a"] == "failed"
    assert list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("checkpoint.json"))

    monkeypatch.setattr(components.training.trainer, "optimization_step", real_step)
    summary = run_night(cfg)
    assert summary["updates"][0]["outcome"] == "promoted"
    run_dir = next((cfg.workspace_path / ".cliploop" / "runs").iterdir())
    training = json.loads((run_dir / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    assert not list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("*"))  # cleared once complete
