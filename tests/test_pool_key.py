"""The key a task's pool is published under (components/pipeline/steps.py, pool_key): docs/contracts.md names its
inputs (task id, DVC hash, content digest, model config, method config, templates, image decoder, reduction; "not
the engine"), and a pool found under a key is reused without being rebuilt, so each input must change the key and
nothing else may: not the engine, not the workspace's folder, not where the pinned weights were read from."""

from __future__ import annotations

import pytest

from components.intake.ledger import TaskRecord
from components.model import data, pool_engine
from components.pipeline import steps
from components.settings.config_loading import load_config
from tests.conftest import tiny_overrides

RECORD = dict(task_id="t-a", state="learned", content_digest="digest-a", dvc_md5="md5-a")
PINNED = "cd" * 32  # the SHA-256 the config pins the weights to: nothing here reads them


@pytest.fixture
def weights(tmp_path):
    """Where the weights would lie: a key is computed from the config alone."""
    return tmp_path / "weights" / "tiny.safetensors", PINNED


def _key(tmp_path, ckpt, *sets, record=None, ws="ws"):
    config = load_config(overrides=tiny_overrides(ckpt, f"workspace={tmp_path / ws}", *sets), env={})
    return steps.pool_key(config, TaskRecord(**(record or RECORD)))


# Each documented input, changed alone: config overrides, or another ledger record of the task.
INPUTS = {
    "task id": ([], {"task_id": "t-b"}),
    "DVC hash": ([], {"dvc_md5": "md5-b"}),
    "content digest": ([], {"content_digest": "digest-b"}),
    "model weights": (["model.sha256=" + "ab" * 32], {}),
    "model precision": (["model.frozen_precision=fp32"], {}),
    "model name": (["model.name=cliploop-glyph"], {}),
    "method": (["method.name=zeroshot"], {}),
    "method settings": (["method.settings.mode=bank"], {}),
    "templates": (["evaluation.templates=single"], {}),
    "image decoder": (["model.decoder=pillow"], {}),
}


def test_every_documented_input_of_a_pool_changes_its_key(tmp_path, weights):
    key = _key(tmp_path, weights)
    assert _key(tmp_path, weights) == key
    keys = {name: _key(tmp_path, weights, *sets, record=RECORD | rec) for name, (sets, rec) in INPUTS.items()}
    assert key not in keys.values(), keys
    assert len(set(keys.values())) == len(keys), keys


def test_the_reduction_and_the_default_decoder_are_part_of_the_key(tmp_path, weights, monkeypatch):
    keys = {sets: _key(tmp_path, weights, *sets) for sets in [(), ("model.device=cpu",)]}
    monkeypatch.setattr(pool_engine, "REDUCE", "arrival order")  # sums added up another way: other bits
    assert all(_key(tmp_path, weights, *sets) != key for sets, key in keys.items())
    monkeypatch.undo()
    monkeypatch.setattr(data, "DECODER", "pillow")  # what model.decoder: auto decodes with on a CPU
    assert all(_key(tmp_path, weights, *sets) != key for sets, key in keys.items())


@pytest.mark.parametrize(
    "sets",
    [
        ["compute.engine=ray"],  # the engine: the same parts reduced in the same order (docs/library.md)
        ["compute.actors=3"],
        ["orchestration.retry_delay_s=0"],
    ],
)
def test_what_does_not_change_a_pool_leaves_its_key(tmp_path, weights, sets):
    assert _key(tmp_path, weights, *sets) == _key(tmp_path, weights)


def test_a_moved_workspace_and_moved_pinned_weights_keep_the_key(tmp_path, weights):
    path, sha = weights
    moved = tmp_path / "elsewhere" / path.name
    here = _key(tmp_path, weights)
    assert _key(tmp_path, weights, ws="other-ws") == here
    assert _key(tmp_path, (moved, sha)) == here  # pinned by SHA-256: the path it was read from is not the model
