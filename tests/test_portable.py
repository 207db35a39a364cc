"""Keys without places: no run key, cache key or MLflow tag holds a workspace path, so a workspace moved to
another folder (or an orchestrator restarted on another machine) reuses every step it had completed."""

from __future__ import annotations

import json
import shutil

import pytest

from components.pipeline import chain, registration, step_io, steps
from components.registry.lineage import build_lineage
from components.registry.registry import from_config
from tests.conftest import pipeline_config
from tests.drops import make_task


def _registry_outside(tmp_path) -> list[str]:
    """The registry lives outside the workspace, as an MLflow server does on a cluster."""
    root = tmp_path / "registry"
    root.mkdir(exist_ok=True)
    return [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"mlflow.artifact_root={(root / 'art').as_uri()}"]


def test_a_moved_workspace_reuses_every_completed_step(tmp_path, tiny_checkpoint):
    first = pipeline_config(tmp_path / "one", tiny_checkpoint, *_registry_outside(tmp_path))
    make_task(tmp_path / "one" / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    make_task(tmp_path / "one" / "incoming", "t-b", ["emu", "owl"], train=3, test=2)
    for location in steps.discover(first):
        steps.ingest(location, first)
    chain.start_learning(first, "t-a")
    pools = {t: steps.build_pool(first, t)["pool_dir"] for t in ("t-a", "t-b")}
    update = steps.run_update(first, "t-a", None, {"t-a": pools["t-a"]})
    assert update["cached"] is False
    before = {t: steps.task_pool_key(first, t) for t in pools} | {"run": steps.update_key(first, "t-a", None)}

    # The orchestrator's folder moves; its config names the new place and nothing else changes.
    (tmp_path / "two").mkdir()
    shutil.move(tmp_path / "one" / "ws", tmp_path / "two" / "ws")
    moved = pipeline_config(tmp_path / "two", tiny_checkpoint, *_registry_outside(tmp_path))
    assert moved.sha256() == first.sha256()
    after = {t: steps.task_pool_key(moved, t) for t in pools} | {"run": steps.update_key(moved, "t-a", None)}
    assert after == before

    rebuilt = {t: steps.build_pool(moved, t) for t in ("t-a", "t-b")}
    assert all(r["cached"] for r in rebuilt.values())
    assert all(r["pool_dir"].startswith(str(tmp_path / "two")) for r in rebuilt.values())
    again = steps.run_update(moved, "t-a", None, {"t-a": rebuilt["t-a"]["pool_dir"]})
    assert again["cached"] is True and again["out_dir"].startswith(str(tmp_path / "two"))
    version = registration.register_update(moved, again)["version"]

    registry = from_config(moved)
    run = registry.client.get_run(registry.model_version(version).run_id)
    texts = [json.dumps(run.data.tags), json.dumps(registry.version_tags(version))]
    texts += [json.dumps([t.key + "=" + t.value for t in i.tags]) for i in run.inputs.dataset_inputs]
    texts += [i.dataset.source for i in run.inputs.dataset_inputs]
    for text in texts:
        assert str(tmp_path / "one") not in text and str(tmp_path / "two") not in text, text
    registry.promote(version, "rita", "fine")  # --verify vouches only for reviewed links
    record = build_lineage(registry, version, moved.workspace_path, verify=True)
    assert record["verified"] is True


# ---- a task fetched from the DVC remote by its content address --------------------------------------------


def _ingested(tmp_path, *overrides):
    from components.intake import ingestion
    from tests.test_ingest import _config

    ws = tmp_path / "ws"
    cfg = _config(ws, *overrides)
    outcome = ingestion.ingest(str(make_task(tmp_path / "drops", "t1", ["cat", "dog"], train=3, test=2)), cfg)
    assert outcome.status == "accepted"
    return ws, outcome.record.dvc_md5


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_task_fetched_by_content_address_from_a_local_remote_is_the_stored_task(tmp_path):
    from components.intake.task_fetch import CorruptObject, TaskAddress, address_of, fetch_task
    from components.intake.versioning import default_remote
    from components.model.data import load_task

    ws, md5 = _ingested(tmp_path)
    address = address_of(ws, "t1", md5, default_remote(ws))
    address = TaskAddress.from_dict(json.loads(json.dumps(address.to_dict())))  # as it crosses to a worker
    folder = fetch_task(address, tmp_path / "worker-cache")
    assert _files(folder) == _files(ws / "data" / "tasks" / "t1")
    assert load_task(str(folder)).task_id == "t1"

    # One object changed on the remote: another worker's fetch stops, naming the object and the file.
    entry = next(e for e in address.files if e["relpath"].startswith("shards/"))
    stored = tmp_path / "ws" / ".cliploop" / "dvc-remote" / address.object_path(entry["md5"])
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    with pytest.raises(CorruptObject) as bad:
        fetch_task(address, tmp_path / "other-cache")
    assert address.object_path(entry["md5"]) in str(bad.value) and entry["relpath"] in str(bad.value)
    assert not (tmp_path / "other-cache" / "tasks" / md5).exists()
    assert fetch_task(address, tmp_path / "worker-cache") == folder  # a completed fetch is not redone


def test_a_task_fetched_from_an_s3_remote(tmp_path, s3_bucket, s3_env):
    from components.intake.task_fetch import address_of, fetch_task
    from components.support.storage import S3Settings

    remote = f"s3://{s3_bucket}/dvc"
    ws, md5 = _ingested(tmp_path, f"dvc.remote={remote}", f"s3.endpoint_url={s3_env}")
    address = address_of(ws, "t1", md5, remote)
    folder = fetch_task(address, tmp_path / "worker-cache", S3Settings(endpoint_url=s3_env))
    assert _files(folder) == _files(ws / "data" / "tasks" / "t1")


def _worker_steps(tmp_path, cfg) -> tuple[int, dict, dict]:
    """t-a learned; then t-b's two GPU steps run as a worker runs them, handed their keys and the tasks' DVC
    addresses (as ``flows/gpu.py`` hands them), with the ledger and the workspace's task folders gone:
    (parent version, pool result, update result)."""
    from tests.fault_steps import learn_steps

    make_task(tmp_path / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    make_task(tmp_path / "incoming", "t-b", ["emu", "owl"], train=3, test=2)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)
    parent, _ = learn_steps(cfg, "t-a")
    chain.start_learning(cfg, "t-b")
    pool_key = steps.task_pool_key(cfg, "t-b")
    run_key = steps.update_key(cfg, "t-b", parent)
    addresses = step_io.addresses(cfg, ["t-a", "t-b"])

    state = cfg.workspace_path / ".cliploop"
    hidden = [(cfg.workspace_path / "data" / "tasks", tmp_path / "tasks-away")]
    hidden += [(p, tmp_path / p.name) for p in state.glob("ledger.sqlite*")]
    for place, away in hidden:
        place.rename(away)
    try:
        pool = steps.build_pool(cfg, "t-b", pool_key, addresses["t-b"])
        update = steps.run_update(cfg, "t-b", parent, {"t-b": pool["pool_dir"]}, run_key, addresses)
    finally:
        for place, away in hidden:
            away.rename(place)
    assert pool["cached"] is False and update["cached"] is False
    assert set(update["final_row"]) == {"t-a", "t-b"}  # the learned task was evaluated too, from the remote
    return parent, pool, update


def test_a_worker_step_reads_neither_the_ledger_nor_the_workspace_data(tmp_path, tiny_checkpoint):
    cfg = pipeline_config(tmp_path, tiny_checkpoint)
    parent, pool, _ = _worker_steps(tmp_path, cfg)
    # The orchestrator finds the same results under the keys it works out from the ledger.
    assert steps.build_pool(cfg, "t-b")["cached"] is True
    assert steps.run_update(cfg, "t-b", parent, {"t-b": pool["pool_dir"]})["cached"] is True


def test_steps_publish_to_an_s3_artifact_store_and_the_orchestrator_registers_from_it(
    tmp_path, tiny_checkpoint, s3_bucket, s3_env
):
    """``artifacts.root`` on the S3-compatible server: the steps' outputs go there (result.json last), nothing
    into the orchestrator's folder, and registration reads them back, checked against their manifest."""
    store = [f"artifacts.root=s3://{s3_bucket}/art", f"s3.endpoint_url={s3_env}"]
    cfg = pipeline_config(tmp_path, tiny_checkpoint, *store)
    _, pool, update = _worker_steps(tmp_path, cfg)
    assert pool["pool_dir"] == f"s3://{s3_bucket}/art/pools/{pool['key']}"
    assert update["out_dir"] == f"s3://{s3_bucket}/art/runs/{update['run_key']}"
    assert not (cfg.workspace_path / ".cliploop" / "pools").exists()
    assert not (cfg.workspace_path / ".cliploop" / "runs").exists()
    version = registration.register_update(cfg, update)["version"]
    registry = from_config(cfg)
    assert registry.version_tags(version)["parent_version"] == "1"
    for reviewed in (1, version):  # --verify vouches only for reviewed links
        registry.promote(reviewed, "rita", "fine")
    assert build_lineage(registry, version, cfg.workspace_path, verify=True)["verified"] is True


def test_a_training_step_killed_on_one_worker_resumes_on_another_from_the_store(
    tmp_path, tiny_checkpoint, s3_bucket, s3_env, monkeypatch
):
    """Checkpoints are mirrored to the artifact store: a worker SIGKILLed right after one (its own cache gone
    with it) leaves the step to another worker with an empty cache, which resumes at that step."""
    import os
    import subprocess
    import sys

    import boto3

    from tests.conftest import REPO

    cfg = pipeline_config(
        tmp_path,
        tiny_checkpoint,
        f"artifacts.root=s3://{s3_bucket}/art",
        f"s3.endpoint_url={s3_env}",
        "method.name=finetune",
        "method.settings.iterations=4",
        "method.settings.batch_size=2",
        "method.settings.checkpoint_every=2",
        "method.settings.warmup_steps=0",
    )
    make_task(tmp_path / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)
    chain.start_learning(cfg, "t-a")
    key, addresses = steps.update_key(cfg, "t-a", None), step_io.addresses(cfg, ["t-a"])

    code = (
        "import json, sys; from components.pipeline import steps; "
        "from components.settings.config_loading import config_from_doc; "
        "steps.run_update(config_from_doc(json.loads(sys.argv[1])), 't-a', None, {}, sys.argv[2], "
        "json.loads(sys.argv[3]))"
    )
    worker_a = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg.portable()), key, json.dumps(addresses)],
        cwd=REPO,
        env=os.environ | {"CLIPLOOP_FAULT": "after_checkpoint:kill", "CLIPLOOP_CACHE": str(tmp_path / "worker-a")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker_a.returncode == -9, worker_a.stderr[-2000:]
    assert not (cfg.workspace_path / ".cliploop" / "checkpoints").exists()  # nothing in the orchestrator's folder

    monkeypatch.setenv("CLIPLOOP_CACHE", str(tmp_path / "worker-b"))
    update = steps.run_update(cfg, "t-a", None, {}, key, addresses)
    out = step_io.local(step_io.store_of(cfg), update["out_dir"])
    training = json.loads((out / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    assert registration.register_update(cfg, update)["version"] == 1
    left = boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=s3_bucket, Prefix=f"art/checkpoints/{key}/")
    assert left.get("KeyCount", 0) == 0  # the completed step's checkpoints are gone from the store


def test_an_address_that_contradicts_itself_is_refused_before_any_read(tmp_path):
    """A worker never trusts a handed address blindly: a file list that does not hash to the task's md5, or a
    path leaving the task's folder, is refused before the remote is read (the remote here does not exist)."""
    from components.intake.task_fetch import BadAddress, TaskAddress, fetch_task
    from components.intake.versioning import dir_md5

    files = ({"relpath": "task.yaml", "md5": "0" * 32},)
    with pytest.raises(BadAddress, match="does not hash"):
        fetch_task(TaskAddress("t1", "f" * 32, files, str(tmp_path / "none")), tmp_path / "cache")
    escaping = ({"relpath": "../../etc/passwd", "md5": "0" * 32},)
    md5 = dir_md5([dict(f) for f in escaping])
    with pytest.raises(BadAddress, match="leaves the task's folder"):
        fetch_task(TaskAddress("t1", md5, escaping, str(tmp_path / "none")), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
