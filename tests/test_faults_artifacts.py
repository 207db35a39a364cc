"""Whoever can write the artifact store cannot run code or swap weights through a registered version.

Real MLflow (SQLite store, artifacts in the workspace's folder), a version registered by the pipeline's own
steps; each test plants what an attacker with write access to the artifact store could plant, as the files
would be on S3, and checks that every cliploop loader (``cliploop predict``, ``export-model``, the next night's
parent state, ``lineage --verify``) refuses it, names the file, and runs nothing. Each test puts the stored
files back as they were (the registered workspace is shared by the module: registering costs seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from components.pipeline import chain, review, steps
from components.registry import model_pins
from components.registry.registry import from_config
from tests.conftest import pipeline_config
from tests.drops import make_task
from tests.fault_steps import learn_steps

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_checkpoint):
    """A workspace whose task t-a (cat, dog) is version 1, the champion; the config and the model's folder."""
    root = tmp_path_factory.mktemp("registered")
    cfg = pipeline_config(root, tiny_checkpoint, "gate.max_forgetting=100")
    make_task(root / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)
    version, update = learn_steps(cfg, "t-a")
    assert review.apply_gate(cfg, version, update)["verdict"] == "pass"
    review.decide(cfg, version, "approve", "rita")
    registry = from_config(cfg)
    mv = registry.model_version(version)
    folder = Path(model_pins.model_location(registry, mv.model_id, mv.source).removeprefix("file://"))
    return cfg, folder, root


@contextlib.contextmanager
def planted(path: Path, change):
    """``change(path)`` in place for the test's body, then the original bytes back."""
    original = path.read_bytes()
    try:
        change(path)
        yield
    finally:
        path.write_bytes(original)


def _cli(cfg, *argv) -> list[str]:
    return [*argv, "-w", str(cfg.workspace_path)]


def test_a_registered_version_is_pinned_and_loads_verified(registered, tmp_path, capsys):
    from flows.cli import main

    cfg, folder, root = registered
    registry = from_config(cfg)
    tag = registry.version_tags(1)[model_pins.PIN_TAG]
    # The pin covers every stored file of the model: its code, MLmodel, the state bundle and the config.
    files = model_pins.file_digests(folder)
    manifest = json.loads(model_pins.manifest_bytes(files, registry.model_version(1).source))
    assert {"MLmodel", "artifacts/state/manifest.json", "code/components/model/state.py"} <= set(manifest["files"])
    assert tag == hashlib.sha256(model_pins.manifest_bytes(files, registry.model_version(1).source)).hexdigest()

    image = next((root / "incoming" / "t-a").rglob("*.png"))
    assert main(_cli(cfg, "predict", "champion", str(image), "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["label"] in {"cat", "dog"} and 0.0 <= rows[0]["score"] <= 1.0
    assert main(_cli(cfg, "export-model", "1", str(tmp_path / "export"))) == 0
    assert model_pins.file_digests(tmp_path / "export") == files
    assert main(_cli(cfg, "lineage", "champion", "--verify")) == 0


def test_a_version_loaded_through_mlflow_still_loads_verified(registered, tmp_path, capsys):
    """``mlflow.pyfunc.load_model("models:/NAME@champion")``, the call docs/pipeline.md shows, writes MLflow's
    ``registered_model_meta`` note into a local store's own model folder. The pin then saw an added file and every
    verified loader refused a clean version; the note (name and version, never loaded) is left out of the copy."""
    import mlflow

    from flows.cli import main

    cfg, folder, root = registered
    registry = from_config(cfg)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry.tracking_uri)
    try:
        mlflow.pyfunc.load_model(f"models:/{registry.model_name}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    note = folder / model_pins.MLFLOW_LOAD_NOTE
    try:
        assert note.is_file()  # what MLflow does to the store: the reason for this test
        image = next((root / "incoming" / "t-a").rglob("*.png"))
        capsys.readouterr()
        assert main(_cli(cfg, "predict", "champion", str(image), "--json")) == 0
        assert main(_cli(cfg, "export-model", "1", str(tmp_path / "export"))) == 0
        assert not (tmp_path / "export" / model_pins.MLFLOW_LOAD_NOTE).exists()
        assert model_pins.file_digests(tmp_path / "export") == {
            k: v for k, v in model_pins.file_digests(folder).items() if k != model_pins.MLFLOW_LOAD_NOTE
        }
        assert main(_cli(cfg, "lineage", "champion", "--verify")) == 0
        note.write_text("planted: still never loaded, still left out\n")
        assert model_pins.verify_version(registry, 1) == []
    finally:
        note.unlink(missing_ok=True)


def test_planted_code_in_the_stored_model_is_never_run(registered, tmp_path, capsys):
    """A line appended to the packaged ``code/components/model/state.py`` (which ``load_context`` imports): the
    verified loaders refuse before importing it; the mark it would write never appears."""
    from flows.cli import main

    cfg, folder, root = registered
    mark = tmp_path / "planted-code-ran"
    image = next((root / "incoming" / "t-a").rglob("*.png"))

    def plant(path: Path) -> None:
        path.write_text(path.read_text() + f"\nopen({str(mark)!r}, 'w').write('ran')\n")

    with planted(folder / "code" / "components" / "model" / "state.py", plant):
        capsys.readouterr()
        assert main(_cli(cfg, "predict", "champion", str(image))) == 1
        err = capsys.readouterr().err
        assert "code/components/model/state.py: changed" in err and "Traceback" not in err
        assert main(_cli(cfg, "export-model", "champion", str(tmp_path / "out"))) == 1
        assert not (tmp_path / "out").exists()
        assert main(_cli(cfg, "lineage", "champion", "--verify")) == 1
        assert "code/components/model/state.py: changed" in capsys.readouterr().out
        with pytest.raises(model_pins.ArtifactsTampered):
            model_pins.load_verified(from_config(cfg), "champion")
    assert not mark.exists()


def test_an_mlmodel_pointing_at_a_pickle_is_refused(registered, tmp_path):
    """``MLmodel`` rewritten to load a cloudpickled ``python_model.pkl`` (planted beside it): refused by the
    pin, and by the pickle check on its own (a folder whose files were never pinned)."""
    cfg, folder, _ = registered

    def to_pickle(path: Path) -> None:
        loader = "loader_module: mlflow.pyfunc.loaders.code_model"
        assert loader in path.read_text()
        path.write_text(
            path.read_text().replace(loader, "loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl")
        )

    pkl = folder / "python_model.pkl"
    pkl.write_bytes(b"\x80\x04N.")  # a pickle of None: what it holds does not matter, it is never read
    try:
        with planted(folder / "MLmodel", to_pickle):
            with pytest.raises(model_pins.ArtifactsTampered, match="MLmodel: changed") as caught:
                model_pins.load_verified(from_config(cfg), 1)
            assert "python_model.pkl: not pinned (added)" in str(caught.value)
            copy = tmp_path / "copy"
            shutil.copytree(folder, copy)
            with pytest.raises(model_pins.ArtifactsTampered, match="pickled file"):
                model_pins.refuse_pickles(copy, model_pins.file_digests(copy))
            (copy / "python_model.pkl").unlink()
            with pytest.raises(model_pins.ArtifactsTampered, match="does not load a model from code"):
                model_pins.refuse_pickles(copy, model_pins.file_digests(copy))
    finally:
        pkl.unlink()


def _rewrite(state: Path, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and put its new SHA-256 wherever a JSON file of the bundle kept the old one
    (that file changes too, and so on up to ``manifest.json``)."""
    old, new = hashlib.sha256(path.read_bytes()).hexdigest(), hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    for doc in sorted(state.rglob("*.json")):
        text = doc.read_text()
        if old in text:
            _rewrite(state, doc, text.replace(old, new).encode())


def _swap_pool_and_rehash(state: Path) -> None:
    """What an attacker who read the bundle's format would do: change a tensor file and recompute every
    checksum the bundle keeps of itself, so that it checks out against itself."""
    if not list(state.rglob("*.safetensors")):  # its tensors stand as manifests of blobs (docs/storage.md)
        return _swap_blob_and_rehash(state)
    pool = sorted(state.rglob("*.safetensors"))[0]
    before = pool.read_bytes()
    _rewrite(state, pool, before[:-4] + bytes(b ^ 0xFF for b in before[-4:]))  # last tensor bytes, header kept
    assert "manifest.json" in {p.name for p in state.rglob("*.json")}


def _swap_blob_and_rehash(state: Path) -> None:
    """The same attack on a bundle whose tensor files stand as manifests: the file's last tensor changed as above,
    planted as a blob of its own (under its true digest) in the store, and every checksum that named the old blob
    or the old file recomputed."""
    from components.registry import tensor_store
    from components.registry.blob_store import BlobStore

    path = sorted(state.rglob(f"*{tensor_store.SUFFIX}"))[0]
    doc = json.loads(path.read_text())
    store = BlobStore(doc["store"])
    before = tensor_store.rebuild(doc, [store], None, path.name)
    after = before[:-4] + bytes(b ^ 0xFF for b in before[-4:])
    _, header, start = tensor_store.read_header(after, path.name)
    name, lo, hi = tensor_store.layout(header, len(after) - start, path.name)[-1]
    blob = tensor_store.encode_blob(header[name]["dtype"], header[name]["shape"], after[start + lo : start + hi])
    store.put(hashlib.sha256(blob).hexdigest(), blob)
    swaps = {doc["tensors"][name]["digest"]: hashlib.sha256(blob).hexdigest(), doc["sha256"]: _sha(after)}
    for json_file in sorted(state.rglob("*.json")):
        text = json_file.read_text()
        for old, new in swaps.items():
            text = text.replace(old, new)
        if text != json_file.read_text():
            _rewrite(state, json_file, text.encode())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _loads_alone(state: Path, tmp: Path):
    """The bundle loaded on its own checks, its tensors written back from the blobs its manifests name."""
    from components.model.state import LearnerState
    from components.registry import tensor_store

    copy = tmp / "alone"
    shutil.copytree(state, copy)
    tensor_store.materialize(copy, [])
    return LearnerState.load(copy)


def test_swapped_weights_with_recomputed_bundle_hashes_are_refused_as_a_parent(registered, tmp_path):
    """Pool tensors swapped in the stored state and the bundle's own checksums recomputed (the bundle alone
    would load them): the next night's parent state refuses them, naming the files, and so does a parent
    kept from an earlier night when the kept copy is changed."""
    cfg, folder, _ = registered
    state = folder / "artifacts" / "state"
    saved = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    cache = cfg.workspace_path / ".cliploop" / "states"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        _swap_pool_and_rehash(state)
        _loads_alone(state, tmp_path)  # the bundle checks itself and is fooled: the pin is what catches it
        with pytest.raises(model_pins.ArtifactsTampered, match=r"artifacts/state/manifest\.json: changed"):
            steps.parent_state(cfg, 1)
        assert not (cache / "v1").exists()
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    kept = steps.parent_state(cfg, 1)  # the real one: fetched, verified, kept
    assert kept.task_ids == ["t-a"]
    _swap_pool_and_rehash(cache / "v1" / "state")
    with pytest.raises(model_pins.ArtifactsTampered, match="differs"):
        steps.parent_state(cfg, 1)
    shutil.rmtree(cache)
    assert chain.head(cfg)["version"] == 1
