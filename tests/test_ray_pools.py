"""Pool building on Ray Data (components/model/ray_pools.py) against the local engine, on a 2-core machine: a local Ray
with 2 CPUs and 2 logical GPUs (the encoder actors ask for one each), the tiny model on CPU, and a stored task
of several shards of uneven sizes. Ray starts once for the module (several seconds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from components.intake.shards import CorruptShard, ShardWriter, write_index
from components.methods.lvp import build_pool
from components.model.backbones import load_backbone
from components.model.data import load_task
from components.model.pool_engine import LocalEngine, split_parts
from components.model.pools import PoolConfig
from components.settings.config_loading import load_config
from components.training.run_context import context_for
from tests.conftest import tiny_overrides
from tests.drops import png_bytes

ray = pytest.importorskip("ray")

CLASSES = ["cat", "dog", "emu"]


def store_task(root: Path, task_id: str, target_bytes: int = 6000) -> Path:
    """A stored task (task.yaml, manifest.csv, index.csv, shards) as ingestion lays it out, with small shards:
    images of mixed sizes make shards of uneven row counts, and test rows sit between train rows."""
    folder = Path(root) / task_id
    writer = ShardWriter(folder / "shards", target_bytes)
    rows = []
    for i in range(22):
        split = "test" if i % 5 == 4 else "train"
        data = png_bytes(1000 + i, side=40 if i % 7 in (0, 3) else 16)
        sha = hashlib.sha256(data).hexdigest()
        writer.add(sha, ".png", data)
        rows.append(
            {"path": f"img/{i:03d}.png", "label": CLASSES[i % 3], "split": split, "sha256": sha, "format": "PNG"}
        )
    located = writer.close()
    for row in rows:
        where = located[row["sha256"] + ".png"]
        row.update(shard=where.shard, offset=where.offset, size=where.size)
    write_index(folder / "index.csv", rows)
    spec = {"task_id": task_id, "scenario": "class-incremental", "dataset": "toy", "classes": CLASSES}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    (folder / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows)
    )
    return folder


def _config(workspace, ckpt, engine: str, *extra: str):
    sets = [f"compute.engine={engine}", "compute.actor_gpus=1", "model.device=cpu", *extra]
    return load_config(overrides=[f"workspace={workspace}", *tiny_overrides(ckpt, *sets)], env={}, cwd=workspace)


def _build(folder, cfg):
    task = load_task(str(folder))
    ctx = context_for(cfg, load_backbone(cfg.model))
    pool, stats = build_pool(task, ctx, PoolConfig.model_validate(cfg.method.settings), ctx.pool_engine)
    task.source.close()
    return pool, stats


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace folder holding one stored task of several shards (no ledger: `cliploop pool --out` needs none)."""
    ws = tmp_path_factory.mktemp("ws")
    store_task(ws / "data" / "tasks", "t-shards")
    return ws


def test_the_task_has_several_uneven_shards_and_parts_keep_manifest_order(workspace, tiny_checkpoint):
    task = load_task(str(workspace / "data" / "tasks" / "t-shards"))
    parts = split_parts(task, "train")
    sizes = [p.stop - p.start for p in parts]
    assert len({p.shard for p in parts}) >= 3 and len(set(sizes)) > 1, sizes
    assert parts[0].start == 0 and parts[-1].stop == 18 and all(a.stop == b.start for a, b in zip(parts, parts[1:]))

    # Per shard, then in shard order: the same sums as one pass over the embeddings, up to fp64 rounding.
    cfg = _config(workspace, tiny_checkpoint, "local")
    pool, _ = _build(task.location, cfg)
    partials = LocalEngine().partials(task, "train", context_for(cfg, load_backbone(cfg.model)), gather=True)
    assert [p.part for p in partials] == list(range(len(parts)))
    embeddings, labels = torch.cat([p.embeddings for p in partials]), torch.cat([p.labels for p in partials])
    assert labels.tolist() == [i % 3 for i in range(22) if i % 5 != 4]  # gathered in manifest order
    one_pass = torch.zeros_like(pool.sums).index_add_(0, labels, embeddings.double())
    assert torch.allclose(pool.sums, one_pass, rtol=0, atol=1e-12)
    assert pool.counts.tolist() == torch.bincount(labels, minlength=3).tolist()

    # DataLoader workers (one loader for the split, batches never crossing a shard) give the same bytes.
    with_workers, _ = _build(task.location, _config(workspace, tiny_checkpoint, "local", "evaluation.workers=2"))
    assert torch.equal(with_workers.sums, pool.sums) and torch.equal(with_workers.counts, pool.counts)


def test_cliploop_pool_on_ray_gives_the_local_pool_bytes(workspace, tiny_checkpoint, local_ray, capsys):
    """Mean mode, two encoder actors of one logical GPU each: `cliploop pool --engine ray` and `--engine local`
    print the same SHA-256 of the pool's tensors."""
    from flows.cli import main

    sets = [x for item in tiny_overrides(tiny_checkpoint, "compute.actor_gpus=1") for x in ("--set", item)]
    digests = {}
    for engine in ("local", "ray"):
        out = workspace / f"out-{engine}"
        assert (
            main(["pool", "t-shards", "--engine", engine, "--out", str(out), "--json", "-w", str(workspace), *sets])
            == 0
        )
        doc = json.loads(capsys.readouterr().out)
        assert doc["engine"] == engine and Path(doc["pool_dir"]) == out
        assert json.loads((out / "t-shards.json").read_text())["tensors_sha256"] == doc["tensors_sha256"]
        digests[engine] = doc["tensors_sha256"]
    assert digests["ray"] == digests["local"]
    assert json.loads((workspace / "out-ray" / "t-shards.json").read_text())["meta"]["reduce"] == "per-shard"


def test_a_gathering_mode_on_ray_gives_the_local_pool_bytes(workspace, tiny_checkpoint, local_ray, tmp_path):
    """LVP-IT gathers every embedding (in manifest order) and trains its scalars on them after the reduction."""
    folder = workspace / "data" / "tasks" / "t-shards"
    settings = ["method.settings.variant=lvp-it", "method.settings.it_epochs=3", "compute.actors=1"]
    local, stats = _build(folder, _config(workspace, tiny_checkpoint, "local", *settings))
    on_ray, ray_stats = _build(folder, _config(workspace, tiny_checkpoint, "ray", *settings))
    assert stats.images == ray_stats.images == 18
    files = {name: pool.save(tmp_path / name) for name, pool in (("local", local), ("ray", on_ray))}
    assert files["ray"]["t-shards.safetensors"] == files["local"]["t-shards.safetensors"]
    assert on_ray.it_ab is not None and torch.equal(on_ray.it_ab, local.it_ab)


def test_a_changed_shard_fails_the_ray_build_naming_the_shard(tmp_path, tiny_checkpoint, local_ray):
    folder = store_task(tmp_path, "t-bad")
    victim = load_task(str(folder)).train[-1][0]  # a train image in the last shard
    shard = folder / "shards" / victim["shard"]
    data = bytearray(shard.read_bytes())
    data[victim["offset"] + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match=rf"shards/{victim['shard']}, row '{victim['path']}'"):
        _build(folder, _config(tmp_path, tiny_checkpoint, "ray", "compute.actors=1"))


def test_cliploop_pool_of_an_unknown_task_is_one_line_and_exit_2(tmp_path, capsys):
    from flows.cli import main

    assert main(["pool", "t-nope", "-w", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliploop pool: no stored task 't-nope'") and len(err.splitlines()) == 1


def test_the_kuberay_example_runs_the_ray_cliploop_pins():
    """Ray refuses a driver whose version differs from the cluster's: the example RayCluster must follow the pin."""
    import re

    import yaml

    from tests.conftest import REPO

    cluster = yaml.safe_load((REPO / "infra" / "kubernetes" / "raycluster.yaml").read_text())
    pinned = re.search(r'"ray\[data\]==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == pinned == ray.__version__
    workers = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"


def _on_dvc_remote(folder: Path, remote: Path):
    """The task's files laid out as a DVC remote holds them (by md5), and the task's content address."""
    from components.intake.task_fetch import TaskAddress
    from components.intake.versioning import dir_md5

    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files.append(
            {"relpath": path.relative_to(folder).as_posix(), "md5": hashlib.md5(path.read_bytes()).hexdigest()}
        )
    address = TaskAddress(folder.name, dir_md5(files), tuple(files), str(remote))
    for entry in files:
        target = remote / address.object_path(entry["md5"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / entry["relpath"]).read_bytes())
    return address


def _build_by_address(folder: Path, cfg, address):
    from components.model.ray_pools import RayEngine

    task = load_task(str(folder))  # the driver reads the index; the actors get the address, not this folder
    ctx = context_for(cfg, load_backbone(cfg.model))
    engine = RayEngine(cfg, {task.task_id: address.to_dict()})
    try:
        return build_pool(task, ctx, PoolConfig.model_validate(cfg.method.settings), engine)[0]
    finally:
        task.source.close()


def test_ray_actors_handed_a_dvc_address_fetch_the_task_themselves(tmp_path, tiny_checkpoint, local_ray):
    """On a GPU worker handed a task's DVC content address, the encoder actors fetch the task's objects from the
    DVC remote into their own node's cache (no folder of the driver's is named to them) and the pool has the
    local build's bytes; a shard object changed on the remote fails the build, naming the shard."""
    folder = store_task(tmp_path / "src", "t-addr")
    address = _on_dvc_remote(folder, tmp_path / "remote")
    local, _ = _build(folder, _config(tmp_path, tiny_checkpoint, "local"))
    on_ray = _build_by_address(folder, _config(tmp_path, tiny_checkpoint, "ray"), address)
    assert torch.equal(on_ray.sums, local.sums) and torch.equal(on_ray.counts, local.counts)

    bad = store_task(tmp_path / "src", "t-bad")  # other content, so no actor has it cached
    address = _on_dvc_remote(bad, tmp_path / "remote")
    shard = next(f for f in address.files if f["relpath"].startswith("shards/"))
    damaged = tmp_path / "remote" / address.object_path(shard["md5"])
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CorruptShard, match=shard["relpath"]):
        _build_by_address(bad, _config(tmp_path, tiny_checkpoint, "ray", "compute.actors=1"), address)
