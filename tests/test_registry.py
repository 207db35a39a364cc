"""The MLflow registry on a real SQLite tracking store: runs, idempotent versions, aliases, promotion,
rejection and rollback, and the learner state read back from a version."""

from __future__ import annotations

import json
import threading

import pytest

from components.model.state import LearnerState
from components.registry.registry import Registry, RegistryError, run_key
from components.settings.config_loading import load_config


@pytest.fixture
def registry(tmp_path):
    return Registry(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "artifacts"),
        lock_dir=tmp_path / "locks",
    )


def _update(tmp_path, name):
    out = tmp_path / name
    state = LearnerState(method="zeroshot", backbone={"name": "cliploop-tiny"})
    state.history = {"tasks": [name], "matrix": [[50.0]]}
    state.save(out / "state")
    (out / "eval").mkdir()
    (out / "eval" / "accuracy_matrix.json").write_text(json.dumps({"tasks": [name], "matrix": [[50.0]]}))
    load_config(
        overrides=["model.name=cliploop-tiny", "model.pretrained=null", "method.name=zeroshot"], env={}, cwd=tmp_path
    ).write_resolved(out)
    return out


def _register(registry, tmp_path, task, parent=None):
    out = _update(tmp_path, task)
    run_id = registry.log_update(
        out, task, {"cl.last": 50.0, "cl.bwt": None}, {task: 50.0}, {"method.name": "zeroshot"}, {"method": "zeroshot"}
    )
    key = run_key(parent, task, "md5-" + task, "cfg")
    return run_id, key, registry.register(run_id, key, {"task_id": task, "parent_version": parent or ""})


def test_run_version_and_aliases(registry, tmp_path):
    run_id, key, v1 = _register(registry, tmp_path, "t1")
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"cl.last": 50.0, "acc.t1": 50.0}
    assert run.data.params["method.name"] == "zeroshot" and run.data.tags["cliploop.task_id"] == "t1"
    assert registry.alias("challenger") == v1 and registry.alias("champion") is None
    assert registry.register(run_id, key, {}) == v1  # the same update registered again: the same version

    assert registry.promote(v1, "rita") is None
    _, _, v2 = _register(registry, tmp_path, "t2", parent=v1)
    assert v2 == v1 + 1 and registry.resolve("challenger") == v2
    assert registry.promote(v2, "rita", "looks good") == v1
    assert (registry.alias("champion"), registry.alias("previous-champion"), registry.alias("challenger")) == (
        v2,
        v1,
        None,
    )
    assert registry.version_tags(v2)["review"] == "approved" and registry.version_tags(v2)["reviewer"] == "rita"

    assert registry.rollback("ops", "bad night") == (v1, v2)
    assert registry.alias("champion") == v1 and registry.version_tags(v2)["review"] == "rolled-back"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("ops")

    _, _, v3 = _register(registry, tmp_path, "t3", parent=v1)
    registry.reject(v3, "rita", "forgets t1")
    assert registry.alias("challenger") is None and registry.version_tags(v3)["review_note"] == "forgets t1"
    with pytest.raises(RegistryError, match="is the champion"):
        registry.reject(v1, "rita", "no")
    with pytest.raises(RegistryError, match="no model version holds alias"):
        registry.resolve("challenger")


def test_state_read_back_from_a_version_is_verified(registry, tmp_path):
    _, _, version = _register(registry, tmp_path, "t1")
    folder = registry.download_state(version, tmp_path / "down")
    state = LearnerState.load(folder)
    assert state.method == "zeroshot" and state.history["tasks"] == ["t1"]


def test_concurrent_registrations_get_distinct_versions(registry, tmp_path):
    """Two writers at once (two nightly runs): the lock serialises them, no version number collides."""
    outs = [_update(tmp_path, f"c{i}") for i in range(4)]
    runs = [registry.log_update(o, o.name, {}, {}, {}, {}) for o in outs]
    versions: list[int] = []

    def worker(i):
        versions.append(registry.register(runs[i], run_key(None, f"c{i}", None, "cfg"), {"task_id": f"c{i}"}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4]
