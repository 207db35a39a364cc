"""What the Ray pool engine (components/model/ray_pools.py) decides before any Ray starts: which pools it leaves to
the local engine, which model it refuses to spread over actors, how many actors and GPUs it asks for. No Ray here
(tests/test_ray_pools.py runs the engine on a local Ray); a CUDA device is named on a CPU backbone where only the
choice is checked, nothing runs on it."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import yaml

from components.intake.shards import ShardWriter, write_index
from components.model.data import load_task
from components.model.pool_engine import LocalEngine
from components.model.ray_pools import RayEngine, RayEngineError
from components.settings.config_loading import load_config
from components.training.run_context import context_for
from tests.conftest import tiny_overrides
from tests.drops import png_bytes


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every choice here is made before Ray would start: starting it fails the test."""
    from components.model import ray_pools

    def refuse(compute):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_pools, "start_ray", refuse)


def _config(tmp_path, ckpt, *sets):
    overrides = [f"workspace={tmp_path / 'ws'}", "compute.engine=ray", *sets]
    return load_config(overrides=tiny_overrides(ckpt, *overrides), env={})


def _stored(root):
    folder = root / "stored"
    writer = ShardWriter(folder / "shards", 1)
    rows = []
    for i in range(4):
        data = png_bytes(700 + i)
        sha = hashlib.sha256(data).hexdigest()
        writer.add(sha, ".png", data)
        rows.append({"path": f"i/{i}.png", "label": "cat", "split": "train" if i else "test", "sha256": sha})
    located = writer.close()
    for row in rows:
        where = located[row["sha256"] + ".png"]
        row.update(shard=where.shard, offset=where.offset, size=where.size, format="PNG")
    write_index(folder / "index.csv", rows)
    spec = {"task_id": "stored", "scenario": "class-incremental", "dataset": "toy", "classes": ["cat"]}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    (folder / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{r['path']},cat,{r['split']}\n" for r in rows)
    )
    return folder


def test_actors_ask_for_a_gpu_where_the_model_runs_on_cuda_unless_configured(tmp_path, tiny_backbone, tiny_checkpoint):
    engine = RayEngine(_config(tmp_path, tiny_checkpoint))
    assert engine.actor_gpus(tiny_backbone) == 0.0
    assert engine.actor_gpus(dataclasses.replace(tiny_backbone, device="cuda:1")) == 1.0
    configured = RayEngine(_config(tmp_path, tiny_checkpoint, "compute.actor_gpus=0.5"))
    assert configured.actor_gpus(dataclasses.replace(tiny_backbone, device="cuda")) == 0.5
    assert configured.actor_gpus(tiny_backbone) == 0.5


@pytest.mark.parametrize(("configured", "parts", "expected"), [(3, 2, 2), (3, 3, 3), (3, 7, 3), (1, 5, 1)])
def test_configured_actors_are_never_more_than_the_parts(tmp_path, tiny_checkpoint, configured, parts, expected):
    engine = RayEngine(_config(tmp_path, tiny_checkpoint, f"compute.actors={configured}"))
    assert engine.actors(0.0, parts) == expected


def test_a_drop_and_fine_tuned_weights_are_left_to_the_local_engine(tmp_path, tiny_backbone, tiny_checkpoint, drops):
    """Actors read only a stored task's shards and load only the configured base model: anything else is encoded
    here, with the local engine's bits."""
    config = _config(tmp_path, tiny_checkpoint)
    engine, ctx = RayEngine(config), context_for(config, tiny_backbone)
    drop = load_task(str(drops[0]))
    local = LocalEngine().partials(drop, "train", ctx, gather=True)
    got = engine.partials(drop, "train", ctx, gather=True)
    assert [p.part for p in got] == [0] and torch.equal(got[0].sums, local[0].sums)
    stored = load_task(str(_stored(tmp_path)))
    tuned = context_for(config, dataclasses.replace(tiny_backbone, reference={**tiny_backbone.reference, "weights": 1}))
    try:
        got = engine.partials(stored, "train", tuned, gather=False)
        assert [p.part for p in got] == [0, 1, 2] and [int(p.counts.sum()) for p in got] == [1, 1, 1]
    finally:
        stored.source.close()


def test_a_base_model_without_weights_to_load_is_refused_before_ray_starts(tmp_path, tiny_backbone, tiny_checkpoint):
    config = _config(tmp_path, tiny_checkpoint)
    unloadable = dataclasses.replace(tiny_backbone, reference={"name": "cliploop-tiny"})
    stored = load_task(str(_stored(tmp_path)))
    try:
        with pytest.raises(RayEngineError, match="'cliploop-tiny' has no weights to load .*other random weights"):
            RayEngine(config).partials(stored, "train", context_for(config, unloadable), gather=False)
    finally:
        stored.source.close()
