"""The artifact store of step outputs (``components/support/artifact_store.py``) on a folder and on the S3-compatible
server: ``result.json`` published last and trusted only with a manifest that every fetched file matches."""

from __future__ import annotations

import boto3
import pytest

from components.support.artifact_store import ArtifactStore, IncompleteArtifact
from tests.conftest import S3_REGION
from tests.s3_fault_proxy import S3FaultProxy


def _outputs(folder):
    (folder / "state" / "pools").mkdir(parents=True)
    (folder / "state" / "manifest.json").write_text('{"files": 2}')
    (folder / "state" / "pools" / "t-a.safetensors").write_bytes(bytes(range(256)) * 300)
    (folder / "eval").mkdir()
    (folder / "eval" / "accuracy_matrix.json").write_text('{"matrix": [[0.5]]}')
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _files(folder):
    skip = {"result.json", "manifest.json"}  # the store's own markers
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    }


def test_a_folder_root_keeps_the_step_folder_in_place(tmp_path):
    store = ArtifactStore(tmp_path / "art", tmp_path / "cache")
    folder = store.staging("runs", "k1")
    assert folder == tmp_path / "art" / "runs" / "k1"
    files = _outputs(folder)
    assert store.result("runs", "k1") is None
    with pytest.raises(IncompleteArtifact):
        store.fetch("runs", "k1")
    store.publish(folder, "runs", "k1", {"task_id": "t-a"})
    assert store.result("runs", "k1") == {"task_id": "t-a"}
    assert store.fetch("runs", "k1") == folder and _files(folder) == files


def test_an_s3_root_publishes_result_last_and_fetch_checks_every_file(tmp_path, s3_bucket, s3_env, monkeypatch):
    direct = boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)
    with S3FaultProxy(s3_env, seed=3) as proxy:
        worker = ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "worker")
        folder = worker.staging("pools", "k1")
        files = _outputs(folder)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the proxy records the order of the writes
        uri = worker.publish(folder, "pools", "k1", {"task_id": "t-a", "n": 1})
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
        puts = [request.split(" ")[1].split("?")[0] for request, _ in proxy.log if request.startswith("PUT ")]
    assert uri == f"s3://{s3_bucket}/art/pools/k1" and not folder.exists()
    assert puts[-2:] == [f"/{s3_bucket}/art/pools/k1/manifest.json", f"/{s3_bucket}/art/pools/k1/result.json"]
    assert len(puts) == len(files) + 2

    orchestrator = ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "orchestrator")
    assert orchestrator.result("pools", "k1") == {"task_id": "t-a", "n": 1}
    assert orchestrator.result("pools", "other") is None
    fetched = orchestrator.fetch("pools", "k1")
    assert _files(fetched) == files
    assert orchestrator.fetch("pools", "k1") == fetched  # cached, complete

    # A changed object: another machine's fetch stops, naming it; nothing is cached.
    key = "art/pools/k1/state/pools/t-a.safetensors"
    direct.put_object(Bucket=s3_bucket, Key=key, Body=b"not the pool")
    elsewhere = ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "elsewhere")
    with pytest.raises(IncompleteArtifact, match="t-a.safetensors"):
        elsewhere.fetch("pools", "k1")
    assert not (tmp_path / "elsewhere" / "fetched" / "pools" / "k1").exists()

    # Files without result.json (a worker killed mid-publish) are not a completed step.
    direct.put_object(Bucket=s3_bucket, Key="art/pools/k2/state/manifest.json", Body=b"{}")
    assert orchestrator.result("pools", "k2") is None
    with pytest.raises(IncompleteArtifact, match="no result.json"):
        orchestrator.fetch("pools", "k2")
