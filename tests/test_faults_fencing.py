"""Fault suite: two attempts of one step key at once (``components/support/fencing.py``).

The night takes a hung worker for dead and starts its step again elsewhere while the first flow-run process lives
on. Here the first attempt is a real child process that stops itself (SIGSTOP, ``CLIPLOOP_FAULT=<point>:stop``)
after it took the key; a second attempt, this test's process, takes the key over and runs the step to the end;
then the first is sent SIGCONT. It must write nothing more under the key (no checkpoint, no result file), end
with the ``Superseded`` error, and the result read afterwards is the second attempt's, byte for byte. On a folder
artifact store and on the S3-compatible server. No Prefect worker is involved: the steps are called as a worker's
flow run calls them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from components.pipeline import step_io, steps
from components.support.artifact_store import ArtifactStore
from components.support.fencing import Superseded
from tests.conftest import REPO, S3_REGION, pipeline_config

pytestmark = pytest.mark.faults

TRAINING = [  # a run that checkpoints: 4 steps, a checkpoint after step 2
    "method.name=finetune",
    "method.settings.iterations=4",
    "method.settings.batch_size=2",
    "method.settings.checkpoint_every=2",
    "method.settings.warmup_steps=0",
]
# What a worker's flow run does: the training step under the key it was handed, as the attempt it was handed
# (none: it takes the key over itself).
WORKER = (
    "import json, sys; from components.pipeline import steps; "
    "from components.settings.config_loading import config_from_doc; "
    "steps.run_update(config_from_doc(json.loads(sys.argv[1])), 't-a', None, None, sys.argv[2], None, "
    "sys.argv[3] or None)"
)


def _config(tmp_path, tiny_checkpoint, ingested, *extra):
    shutil.copytree(ingested, tmp_path / "ws", symlinks=True)
    return pipeline_config(tmp_path, tiny_checkpoint, *TRAINING, *extra)


def _stopped_worker(cfg, key: str, point: str, env: dict[str, str], attempt: str = "") -> subprocess.Popen:
    """The first attempt: a worker process that stops itself at ``point``; returned once it is stopped."""
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(cfg.portable()), key, attempt],
        cwd=REPO,
        env=os.environ | env | {"CLIPLOOP_FAULT": f"{point}:stop"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and worker.poll() is None:
        stat = Path(f"/proc/{worker.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            return worker
        time.sleep(0.2)
    worker.kill()
    out, err = worker.communicate()
    raise AssertionError(f"the first attempt never stopped at {point} (exit {worker.returncode}):\n{err[-3000:]}")


def _resumed(worker: subprocess.Popen) -> tuple[int, str]:
    os.kill(worker.pid, signal.SIGCONT)
    _, err = worker.communicate(timeout=300)
    return worker.returncode, err


def _folder_files(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _bucket_objects(client, bucket: str) -> dict[str, bytes]:
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _owners(store: ArtifactStore, key: str) -> list[tuple[str, str]]:
    log = store.owners("runs", key)
    return [(log.read(n)["attempt"], log.read(n)["state"]) for n in log.numbers()]


# ---- the owner log itself, on both kinds of store -------------------------------------------------------


@pytest.fixture(params=["folder", "s3"])
def store_root(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "art")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/art"


def _outputs(folder: Path, text: str) -> None:
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "weights.bin").write_text(text)


def test_a_superseded_attempt_can_neither_write_nor_complete_and_a_cut_short_completion_is_finished(
    tmp_path, store_root
):
    store = ArtifactStore(store_root, tmp_path / "cache")
    first = store.claim("runs", "k1")
    _outputs(store.staging("runs", "k1", first), "first")
    first.check()  # its last check before the flip passes...
    second = store.claim("runs", "k1")  # ...and then the key is taken over
    with pytest.raises(Superseded, match=f"^Superseded: attempt {first.id} of step runs/k1 was superseded by "):
        first.check()
    with pytest.raises(Superseded, match=f"superseded by {second.id}"):  # the record after its own is taken
        first.finish({"by": "first"}, "nothing published")
    with pytest.raises(Superseded, match=rf"superseded by {second.id}; nothing (written|published)"):
        store.publish(store.staging("runs", "k1", first), "runs", "k1", {"by": "first"}, first)
    assert store.result("runs", "k1") is None and not store.staging("runs", "k1", first).exists()
    if store.remote:  # nothing of the first attempt stays in the store either, checkpoints included
        ckpt = tmp_path / "ckpt" / "t-a"
        ckpt.mkdir(parents=True)
        (ckpt / "checkpoint.safetensors").write_bytes(b"x")
        (ckpt / "checkpoint.json").write_text("{}")
        with pytest.raises(Superseded, match="nothing written"):
            store.push_checkpoint("k1", ckpt, first)
        assert store.pull_checkpoints("k1", tmp_path / "elsewhere") == []
    with pytest.raises(Superseded, match=f"superseded by {second.id}"):
        store.hold("runs", "k1", first.id)  # a worker handed the first attempt's id refuses to start

    _outputs(store.staging("runs", "k1", second), "second")
    store.publish(store.staging("runs", "k1", second), "runs", "k1", {"by": "second"}, second)
    assert store.result("runs", "k1") == {"by": "second", "attempt": second.id}
    fetched = store.fetch("runs", "k1")
    assert (fetched / "state" / "weights.bin").read_text() == "second"
    assert store.claim("runs", "k1") is None and store.hold("runs", "k1", second.id) is None  # complete
    assert [state for _, state in _owners(store, "k1")] == ["running", "running", "done"]

    # Completed (the done record) but cut short before the result was in place: the next claim finishes it.
    if store.remote:
        uri = f"{store_root}/runs/k1/result.json"[len("s3://") :].split("/", 1)
        store._s3_client().delete_object(Bucket=uri[0], Key=uri[1])
    else:
        os.rename(fetched, fetched.with_name(f".k1.{second.id}"))
    assert store.result("runs", "k1") is None
    assert store.claim("runs", "k1") is None
    assert store.result("runs", "k1") == {"by": "second", "attempt": second.id}
    elsewhere = ArtifactStore(store_root, tmp_path / "other-cache")
    assert (elsewhere.fetch("runs", "k1") / "state" / "weights.bin").read_text() == "second"


# ---- two real processes on one training step ------------------------------------------------------------


@pytest.mark.parametrize("dispatched", [False, True], ids=["in-process", "dispatched"])
def test_a_hung_attempt_resumed_after_its_step_was_redone_writes_no_checkpoint_and_no_result(
    tmp_path, tiny_checkpoint, ingested, dispatched
):
    """Folder artifact store, one machine (the checkpoints' folder is shared): the first attempt stops right after
    it took the key; when it goes on, its first write would be a training checkpoint. Either each attempt takes the
    key itself, or, as the night dispatches a GPU step (``flows/gpu.py``), the dispatcher takes it for each start
    and hands the attempt's id to the worker."""
    cfg = _config(tmp_path, tiny_checkpoint, ingested)
    key = steps.update_key(cfg, "t-a", None)
    store = step_io.store_of(cfg)
    first = _stopped_worker(cfg, key, "after_claim", {}, store.claim("runs", key).id if dispatched else "")

    second = steps.run_update(cfg, "t-a", None, None, key, None, store.claim("runs", key).id if dispatched else None)
    assert second["cached"] is False
    (first_id, _), (second_id, _) = _owners(store, key)[:2]
    assert second["attempt"] == second_id != first_id
    artifacts = cfg.workspace_path / ".cliploop"
    before = {part: _folder_files(artifacts / part) for part in ("runs", "checkpoints", "owners")}

    code, err = _resumed(first)

    assert code != 0 and f"Superseded: attempt {first_id} of step runs/{key} was superseded by {second_id}" in err, err
    assert err.rstrip().endswith("; nothing written"), err[-2000:]
    after = {part: _folder_files(artifacts / part) for part in ("runs", "checkpoints", "owners")}
    assert after == before  # not a byte more, less or changed: no checkpoint, no result, no left-over folder
    assert store.result("runs", key) == json.loads((artifacts / "runs" / key / "result.json").read_text())
    assert store.result("runs", key)["attempt"] == second_id
    assert steps.run_update(cfg, "t-a", None, None, key)["cached"] is True


def test_an_attempt_superseded_after_uploading_its_files_cannot_flip_the_result_on_s3(
    tmp_path, tiny_checkpoint, ingested, s3_bucket, s3_env, monkeypatch
):
    """S3 artifact store, two workers with caches of their own: the first attempt stops after uploading its
    files, just before the write that completes the step (the check-then-write race at its widest)."""
    cfg = _config(
        tmp_path, tiny_checkpoint, ingested, f"artifacts.root=s3://{s3_bucket}/art", f"s3.endpoint_url={s3_env}"
    )
    key = steps.update_key(cfg, "t-a", None)
    store = step_io.store_of(cfg)
    direct = boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)
    first = _stopped_worker(cfg, key, "before_result_flip", {"CLIPLOOP_CACHE": str(tmp_path / "worker-a")})
    first_id = _owners(store, key)[0][0]
    uploaded = f"art/runs/{key}/attempts/{first_id}/"
    assert any(k.startswith(uploaded) for k in _bucket_objects(direct, s3_bucket))

    monkeypatch.setenv("CLIPLOOP_CACHE", str(tmp_path / "worker-b"))
    second = steps.run_update(cfg, "t-a", None, None, key)
    second_id = second["attempt"]
    before = _bucket_objects(direct, s3_bucket)

    code, err = _resumed(first)

    assert code != 0, err
    assert re.search(
        rf"Superseded: attempt {first_id} of step runs/{key} was superseded by {second_id}; nothing published", err
    ), err[-2000:]
    after = _bucket_objects(direct, s3_bucket)
    assert after == {k: v for k, v in before.items() if not k.startswith(uploaded)}  # its own upload, removed
    assert _owners(store, key) == [(first_id, "running"), (second_id, "running"), (second_id, "done")]
    published = f"art/runs/{key}/attempts/{second_id}/"
    fetched = ArtifactStore(store.root, tmp_path / "reader").fetch("runs", key)
    assert (fetched / "result.json").read_bytes() == after[f"art/runs/{key}/result.json"]
    files = {p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*") if p.is_file()}
    assert files == {k[len(published) :]: v for k, v in after.items() if k.startswith(published)} | {
        "result.json": after[f"art/runs/{key}/result.json"]
    }
    assert json.loads(files["result.json"])["attempt"] == second_id
