"""Each registered version's weights stored once (docs/storage.md, "Tensors stored once"), through the pipeline's
own steps on real parts: MLflow on SQLite, the artifact store in the workspace, fine-tuning of the tiny model on
two tasks (t-a, then t-b on top of it). The step's results and the MLflow model hold tensor manifests, never the
backbone; the child stores only the tensors it changed; the version still loads with ``mlflow.pyfunc.load_model``
and predicts; a changed blob is refused by every loader in one line; a retried registration stores nothing; an
old version (a whole bundle, no manifests) still loads; gc keeps every blob a live version names.

The tests share one registered workspace (training and registering cost seconds); the gc test deletes a version
and so comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from components.pipeline import registration, review, steps
from components.registry import model_pins, tensor_store
from components.registry.registry import from_config
from components.registry.version_tensors import blob_store
from tests.conftest import pipeline_config
from tests.drops import make_task
from tests.fault_steps import learn_steps

pytestmark = pytest.mark.slow  # trains and registers two versions, a minute; tests/test_tensor_store.py is fast

TRAINING = [
    "method.name=finetune",
    "method.settings.iterations=2",
    "method.settings.batch_size=4",
    "method.settings.warmup_steps=0",
    "gate.max_forgetting=100",
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("stored-once")
    cfg = pipeline_config(root, tiny_checkpoint, *TRAINING)
    make_task(root / "incoming", "t-a", ["cat", "dog"], train=4, test=2)
    make_task(root / "incoming", "t-b", ["emu", "owl"], train=4, test=2)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)
    updates = {}
    for task_id in ("t-a", "t-b"):
        version, updates[task_id] = learn_steps(cfg, task_id)
        assert review.apply_gate(cfg, version, updates[task_id])["verdict"] == "pass"
        review.decide(cfg, version, "approve", "rita")
    return {"cfg": cfg, "root": root, "updates": updates}


def _model_state(cfg, version: int) -> Path:
    registry = from_config(cfg)
    mv = registry.model_version(version)
    return (
        Path(model_pins.model_location(registry, mv.model_id, mv.source).removeprefix("file://"))
        / "artifacts"
        / "state"
    )


def _backbone(state: Path) -> dict:
    return tensor_store.manifests(state)["backbone.safetensors"]


def _blobs(cfg) -> dict[str, int]:
    return {d: size for d, size, _ in blob_store(cfg).listing()}


def test_the_weights_are_stored_once_and_the_child_stores_only_what_it_changed(chain):
    cfg, updates = chain["cfg"], chain["updates"]
    runs = {t: Path(u["out_dir"]) / "state" for t, u in updates.items()}
    for task_id, version in (("t-a", 1), ("t-b", 2)):
        for state in (runs[task_id], _model_state(cfg, version)):  # the step's results and the MLflow model
            assert not list(state.rglob("*.safetensors")), state
            assert (state / "backbone.safetensors.tensors.json").is_file()
        assert _backbone(runs[task_id]) == _backbone(_model_state(cfg, version))
    first, second = _backbone(runs["t-a"])["tensors"], _backbone(runs["t-b"])["tensors"]
    changed = {first[k]["digest"] for k in first if not first[k].get("base")}
    assert changed and len(changed) < len(first)  # training moved some tensors; some stayed the base model's
    moved = {second[k]["digest"] for k in second if second[k]["digest"] != first[k]["digest"]}
    assert moved
    stored = _blobs(cfg)
    named = tensor_store.referenced([*tensor_store.manifests(runs["t-a"]).values()]) | tensor_store.referenced(
        [*tensor_store.manifests(runs["t-b"]).values()]
    )
    assert set(stored) == named  # one file per digest, and no blob that nothing names
    for digest in stored:
        assert hashlib.sha256(Path(blob_store(cfg).name(digest)).read_bytes()).hexdigest() == digest
    # What the child added is what it changed: each new tensor once, with its one-tensor header.
    only_second = tensor_store.referenced([_backbone(runs["t-b"])]) - tensor_store.referenced([_backbone(runs["t-a"])])
    assert only_second <= moved
    weights = sum(e["bytes"] for e in second.values() if e["digest"] in only_second)
    assert weights <= sum(stored[d] for d in only_second) <= weights + 256 * len(only_second)


def test_a_version_loads_through_mlflow_and_predicts_what_its_weights_say(chain, tmp_path):
    import mlflow
    import pandas as pd

    from components.model.state import LearnerState
    from tests.expected_predictions import expected_labels

    cfg, root = chain["cfg"], chain["root"]
    registry = from_config(cfg)
    state = LearnerState.load(registry.download_state(2, tmp_path / "v2"))
    assert state.weights is not None and state.task_ids == ["t-a", "t-b"]
    images = [p.read_bytes() for p in sorted((root / "incoming").rglob("*.png"))[:6]]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry.tracking_uri)
    try:
        predicted = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/2").predict(
            pd.DataFrame({"image": images})
        )
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(predicted["label"]) == expected_labels(cfg, state, images)
    assert steps.parent_state(cfg, 2).task_ids == ["t-a", "t-b"]  # the next night's parent, made whole
    assert model_pins.verify_version(registry, 2) == []


def test_a_changed_blob_is_refused_by_every_loader_in_one_line(chain, tmp_path, capsys):
    from flows.cli import main

    cfg, root = chain["cfg"], chain["root"]
    entry = _backbone(_model_state(cfg, 2))["tensors"]
    digest = next(e["digest"] for e in entry.values() if not e.get("base") and e["bytes"] >= 16)
    path = Path(blob_store(cfg).name(digest))
    original = path.read_bytes()
    shutil.rmtree(cfg.workspace_path / ".cliploop" / "states", ignore_errors=True)  # no kept parent
    image = next((root / "incoming" / "t-a").rglob("*.png"))
    path.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))
    try:
        capsys.readouterr()
        assert main(["predict", "2", str(image), "-w", str(cfg.workspace_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and "changed or planted" in err[0], err
        with pytest.raises(tensor_store.TensorStoreError, match="changed or planted"):
            steps.parent_state(cfg, 2)
        assert not (cfg.workspace_path / ".cliploop" / "states" / "v2").exists()
        assert main(["lineage", "2", "--verify", "-w", str(cfg.workspace_path)]) == 1
        assert "tensor blobs of version 2: backbone.safetensors" in capsys.readouterr().out
    finally:
        path.write_bytes(original)
    assert model_pins.verify_version(from_config(cfg), 2) == []


def test_a_retried_registration_stores_and_registers_nothing_new(chain):
    cfg, updates = chain["cfg"], chain["updates"]
    before, registry = _blobs(cfg), from_config(cfg)
    runs = len(registry.client.search_runs([registry.experiment_id()]))
    again = steps.run_update(cfg, "t-b", 1)  # the step found complete, its bundle checked with its blobs
    assert again["cached"] and again["run_key"] == updates["t-b"]["run_key"]
    assert registration.register_update(cfg, again)["version"] == 2
    assert _blobs(cfg) == before
    assert len(registry.client.search_runs([registry.experiment_id()])) == runs
    assert [int(v.version) for v in registry.versions()] == [1, 2] or len(registry.versions()) >= 2


def test_a_version_registered_with_a_whole_bundle_still_loads(chain, tmp_path):
    """A version written before blobs: its model carries ``backbone.safetensors`` itself, and no manifest."""
    import mlflow
    import pandas as pd

    from components.model.state import LearnerState
    from components.registry.registry import run_key

    cfg, root = chain["cfg"], chain["root"]
    registry = from_config(cfg)
    whole = LearnerState.load(registry.download_state(1, tmp_path / "v1"))
    out = tmp_path / "old-step"
    whole.save(out / "state")
    cfg.write_resolved(out)
    assert (out / "state" / "backbone.safetensors").is_file()
    run_id = registry.log_update(out, "t-a", {}, {}, {"model.name": cfg.model.name}, {"task_id": "t-a"})
    version = registry.register(run_id, run_key(None, "t-a", "old", "d" * 64), {"task_id": "t-a", "review": "x"})
    assert (_model_state(cfg, version) / "backbone.safetensors").is_file()
    assert not tensor_store.manifests(_model_state(cfg, version))
    loaded = LearnerState.load(registry.download_state(version, tmp_path / "old"))
    assert all((loaded.weights[k] == v).all() for k, v in whole.weights.items())
    images = [p.read_bytes() for p in sorted((root / "incoming").rglob("*.png"))[:2]]
    mlflow.set_tracking_uri(registry.tracking_uri)
    predicted = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version}").predict(
        pd.DataFrame({"image": images})
    )
    assert len(predicted) == 2
    registry.client.delete_model_version(registry.model_name, str(version))  # as it was for the other tests


def test_gc_keeps_every_blob_a_live_version_names_and_removes_the_rest(chain):
    """Last: it deletes version 2. Step results are left aside first, so only the versions' models keep blobs."""
    from components.registry.data_gc import collect_tensors

    cfg, updates = chain["cfg"], chain["updates"]
    store = blob_store(cfg)
    orphan = tensor_store.tensor_blob(__import__("torch").ones(3))
    store.put(hashlib.sha256(orphan).hexdigest(), orphan)  # what a superseded attempt leaves
    old = 0.0
    for digest in _blobs(cfg):
        os.utime(store.name(digest), (old, old))  # past the grace
    first = tensor_store.referenced(tensor_store.manifests(_model_state(cfg, 1)).values())
    second = tensor_store.referenced(tensor_store.manifests(_model_state(cfg, 2)).values())
    runs = cfg.workspace_path / ".cliploop" / "runs"
    aside = cfg.workspace_path / "runs-aside"
    os.rename(runs, aside)
    try:
        young = collect_tensors(cfg, delete=False)  # the default grace: a day; these are older
        assert young["unused"] == 1 and young["bytes"] == len(orphan)
        done = collect_tensors(cfg, delete=True, grace_s=0)
        assert done["removed"] == 1 and set(_blobs(cfg)) == first | second
        registry = from_config(cfg)
        registry.client.delete_model_version(registry.model_name, "2")
        done = collect_tensors(cfg, delete=True, grace_s=0)
        assert done["removed"] == len(second - first) and set(_blobs(cfg)) == first  # shared ones kept
        assert steps.parent_state(cfg, 1).task_ids == ["t-a"]
        shutil.rmtree(cfg.workspace_path / ".cliploop" / "states", ignore_errors=True)
        assert registry.download_state(1, cfg.workspace_path / "v1-again").is_dir()
    finally:
        os.rename(aside, runs)
    assert json.loads((runs / updates["t-a"]["run_key"] / "result.json").read_text())["task_id"] == "t-a"
