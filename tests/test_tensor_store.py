"""The tensor store on its own (components/registry/tensor_store.py, blob_store.py): a learner-state bundle's
safetensors files become one blob per tensor named by its SHA-256 and come back byte for byte; a child bundle stores
only what it changed; the base model's own tensors are not stored; a changed, planted or missing blob stops the
load in one line naming it; gc keeps every blob a manifest names. No servers, no training: bundles are written
with ``LearnerState.save`` from small tensors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from components.model.state import LearnerState
from components.registry import blob_store, tensor_store
from components.registry.blob_store import BlobStore, TensorStoreError


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "visual.proj": torch.randn(8, 4, generator=g),
        "text.proj": torch.randn(6, 4, generator=g),
        "logit_scale": torch.tensor(4.6),
        "steps": torch.tensor([3, 1], dtype=torch.int64),
    }


def _bundle(folder: Path, weights: dict[str, torch.Tensor], method_tensors=None) -> Path:
    state = LearnerState(method="finetune", backbone={"name": "cliploop-tiny"}, weights=weights)
    state.method_tensors = method_tensors or {}
    state.save(folder / "state")
    return folder / "state"


def _blob_by_hand(tensor: torch.Tensor, dtype: str) -> bytes:
    """A one-tensor safetensors file by the format's definition: an 8-byte little-endian header length, the JSON
    header (padded with spaces to a multiple of 8), then the tensor's bytes, row-major little-endian."""
    data = tensor.contiguous().numpy().tobytes()
    header = json.dumps({"t": {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [0, len(data)]}})
    header = header.replace(" ", "").encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def test_a_blob_is_a_safetensors_file_of_its_one_tensor_and_named_by_its_sha256(tmp_path):
    from safetensors import safe_open

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    blob = tensor_store.tensor_blob(t)
    assert blob == _blob_by_hand(t, "F32")
    (tmp_path / "b.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("t"), t)
    store = BlobStore(tmp_path / "store")
    digest = hashlib.sha256(blob).hexdigest()
    assert store.put(digest, blob) and not store.put(digest, blob)  # the second time: already there
    assert Path(store.name(digest)) == tmp_path / "store" / "tensors" / digest[:2] / f"{digest}.safetensors"


def test_a_bundle_stands_as_manifests_and_comes_back_byte_for_byte(tmp_path):
    state = _bundle(tmp_path / "run", _weights(), {"cvm.concepts": torch.ones(3, 4)})
    originals = {p.relative_to(state).as_posix(): p.read_bytes() for p in state.rglob("*.safetensors")}
    assert set(originals) == {"backbone.safetensors", "method/tensors.safetensors"}
    store = BlobStore(tmp_path / "store")

    done = tensor_store.externalize(state, store)

    assert sorted(done["files"]) == sorted(originals) and not list(state.rglob("*.safetensors"))
    doc = json.loads((state / "backbone.safetensors.tensors.json").read_text())
    assert doc["sha256"] == hashlib.sha256(originals["backbone.safetensors"]).hexdigest()
    assert doc["tensors"]["visual.proj"]["shape"] == [8, 4] and doc["tensors"]["visual.proj"]["dtype"] == "F32"
    assert doc["tensors"]["visual.proj"]["bytes"] == 8 * 4 * 4
    expected = {  # each tensor's blob, by the format's definition, and nothing else
        hashlib.sha256(_blob_by_hand(t, d)).hexdigest(): len(_blob_by_hand(t, d))
        for t, d in [(v, "F32") for k, v in _weights().items() if k != "steps"]
        + [(_weights()["steps"], "I64"), (torch.ones(3, 4), "F32")]
    }
    assert done["added"] == expected
    assert {p.name.removesuffix(".safetensors") for p in (tmp_path / "store" / "tensors").rglob("*")} >= set(expected)

    assert sorted(tensor_store.materialize(state, [store])) == sorted(originals)
    assert {r: (state / r).read_bytes() for r in originals} == originals
    loaded = LearnerState.load(state)
    assert all(torch.equal(loaded.weights[k], v) for k, v in _weights().items())


def test_a_child_stores_only_the_tensors_it_changed(tmp_path):
    store = BlobStore(tmp_path / "store")
    parent = _bundle(tmp_path / "parent", _weights())
    tensor_store.externalize(parent, store)
    changed = dict(_weights(), **{"text.proj": torch.zeros(6, 4)})
    child = _bundle(tmp_path / "child", changed)

    done = tensor_store.externalize(child, store)

    blob = _blob_by_hand(torch.zeros(6, 4), "F32")
    assert done["added"] == {hashlib.sha256(blob).hexdigest(): len(blob)}  # 6 x 4 floats and a header
    before = tensor_store.manifests(parent)["backbone.safetensors"]["tensors"]
    after = tensor_store.manifests(child)["backbone.safetensors"]["tensors"]
    assert [k for k in after if after[k]["digest"] != before[k]["digest"]] == ["text.proj"]
    tensor_store.materialize(child, [store])
    assert torch.equal(LearnerState.load(child).weights["text.proj"], torch.zeros(6, 4))


def test_tensors_equal_to_the_base_models_are_not_stored_and_come_from_the_base(tmp_path):
    base = _weights()
    base_digests = {k: hashlib.sha256(tensor_store.tensor_blob(v)).hexdigest() for k, v in base.items()}
    trained = dict(base, **{"visual.proj": base["visual.proj"] + 1})  # the text tower frozen, as it was
    state = _bundle(tmp_path / "run", trained)
    store = BlobStore(tmp_path / "store")

    done = tensor_store.externalize(state, store, lambda: base_digests)

    assert done["added"] == {
        hashlib.sha256(_blob_by_hand(trained["visual.proj"], "F32")).hexdigest(): len(
            _blob_by_hand(trained["visual.proj"], "F32")
        )
    }
    entries = tensor_store.manifests(state)["backbone.safetensors"]["tensors"]
    assert {k for k, e in entries.items() if e.get("base")} == {"text.proj", "logit_scale", "steps"}
    with pytest.raises(TensorStoreError, match="no base model was given"):
        tensor_store.materialize(state, [store])
    other = dict(base, **{"text.proj": torch.zeros(6, 4)})  # not the base this bundle was made from
    with pytest.raises(TensorStoreError, match="base model's tensor text.proj is not the one"):
        tensor_store.materialize(state, [store], lambda: other)
    tensor_store.materialize(state, [store], lambda: base)
    assert torch.equal(LearnerState.load(state).weights["visual.proj"], trained["visual.proj"])


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_changed_planted_or_missing_blob_stops_the_load_in_one_line_naming_it(tmp_path):
    store = BlobStore(tmp_path / "store")
    state = _bundle(tmp_path / "run", _weights())
    tensor_store.externalize(state, store)
    digest = tensor_store.manifests(state)["backbone.safetensors"]["tensors"]["visual.proj"]["digest"]
    path = Path(store.name(digest))
    original = path.read_bytes()

    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of the last float
    with pytest.raises(TensorStoreError) as caught:
        tensor_store.materialize(state, [store])
    assert str(path) in _one_line(caught) and "changed or planted" in str(caught.value)
    assert not (state / "backbone.safetensors").exists()

    path.write_bytes(tensor_store.tensor_blob(torch.zeros(8, 4)))  # a well-formed blob, of another tensor
    with pytest.raises(TensorStoreError, match="changed or planted"):
        tensor_store.materialize(state, [store])

    path.unlink()
    with pytest.raises(TensorStoreError) as caught:
        tensor_store.materialize(state, [store])
    assert digest in _one_line(caught) and blob_store.ENV in str(caught.value)
    assert tensor_store.blob_problems(state, [store]) == [f"backbone.safetensors (visual.proj): {caught.value}"]
    path.write_bytes(original)
    assert tensor_store.blob_problems(state, [store]) == []
    tensor_store.verify_bundle(state, [store])


def test_a_blob_is_taken_from_any_store_that_holds_it_first_from_the_environments(tmp_path, monkeypatch):
    """A moved store: the manifest's recorded store is gone; the blobs are found where $CLIPLOOP_TENSOR_STORE
    says, and the folder a manifest records is only the last place looked in."""
    store = BlobStore(tmp_path / "store")
    state = _bundle(tmp_path / "run", _weights())
    tensor_store.externalize(state, store)
    shutil.move(tmp_path / "store", tmp_path / "moved")
    with pytest.raises(TensorStoreError, match="is in none of"):
        tensor_store.materialize(state, [])
    monkeypatch.setenv(blob_store.ENV, str(tmp_path / "moved"))
    assert [s.root for s in blob_store.candidates(None, recorded=str(tmp_path / "store"))] == [
        str(tmp_path / "moved"),
        str(tmp_path / "store"),
    ]
    assert tensor_store.materialize(state, []) == ["backbone.safetensors"]


def test_a_kept_bundle_with_a_file_missing_or_changed_is_refused(tmp_path):
    store = BlobStore(tmp_path / "store")
    state = _bundle(tmp_path / "run", _weights())
    tensor_store.externalize(state, store)
    tensor_store.verify_bundle(state, [store])
    original = (state / "history.json").read_bytes()
    (state / "history.json").write_text('{"tasks": []}')
    with pytest.raises(TensorStoreError, match="history.json does not have the sha256"):
        tensor_store.verify_bundle(state, [store])
    (state / "history.json").write_bytes(original)
    (state / "backbone.safetensors.tensors.json").unlink()
    with pytest.raises(TensorStoreError, match="backbone.safetensors is listed in the manifest but missing"):
        tensor_store.verify_bundle(state, [store])


def test_gc_removes_only_blobs_no_manifest_names_and_only_after_the_grace(tmp_path):
    store = BlobStore(tmp_path / "store")
    parent, child = _bundle(tmp_path / "p", _weights()), _bundle(tmp_path / "c", dict(_weights(), steps=torch.ones(2)))
    tensor_store.externalize(parent, store)
    tensor_store.externalize(child, store)
    shared = tensor_store.referenced(tensor_store.manifests(parent).values()) & tensor_store.referenced(
        tensor_store.manifests(child).values()
    )
    assert len(shared) == 3  # visual.proj, text.proj, logit_scale: stored once, named by both
    only_child = tensor_store.referenced(tensor_store.manifests(child).values()) - shared
    keep = tensor_store.referenced(tensor_store.manifests(parent).values())  # the child is gone

    young = blob_store.collect(store, keep, delete=True)  # written just now: inside the grace
    assert young["unused"] == 0 and young["removed"] == 0 and young["objects"] == 5
    old = os.path.getmtime(store.name(next(iter(only_child)))) - blob_store.GRACE_S - 1
    for digest, _, _ in store.listing():
        os.utime(store.name(digest), (old, old))
    dry = blob_store.collect(store, keep, delete=False)
    assert (dry["unused"], dry["removed"], dry["bytes"]) == (1, 0, os.path.getsize(store.name(next(iter(only_child)))))
    done = blob_store.collect(store, keep, delete=True)
    assert done["removed"] == 1 and {d for d, _, _ in store.listing()} == keep
    tensor_store.materialize(parent, [store])  # every blob the parent names is still there
