"""What the storage rows of the fault suite share (``tests/test_faults_s3.py``, ``tests/test_faults_s3_dvc.py``): the
fault proxy in front of the S3 server, a direct client for setup and checks, a workspace whose DVC remote is on S3,
and the checks that compare what the server stores with its source, byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import pytest

from components.intake import versioning
from components.intake import workspace as workspace_mod
from components.intake.shards import StoredTask, read_index
from components.settings.config_loading import load_config
from tests.conftest import S3_REGION
from tests.s3_fault_proxy import S3FaultProxy

SEED = 13
RATES = [0.0, 0.1, 0.5]


@pytest.fixture
def proxy(s3_env, monkeypatch):
    """The fault proxy in front of the S3 server; every AWS client of the test process goes through it."""
    with S3FaultProxy(s3_env, seed=SEED, max_lifetime=240) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
        yield fault_proxy


@pytest.fixture
def direct(s3_env):
    """A client that talks to the S3 server itself (setup and checks never go through the faults)."""
    return boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)


DVC_BUCKET = "cliploop-faults-dvc"
DVC_REMOTE = f"s3://{DVC_BUCKET}/dvc"


@pytest.fixture(scope="module")
def ws_template(tmp_path_factory) -> Path:
    """An initialised, empty workspace (git + DVC) whose remote is ``DVC_REMOTE`` with no endpoint in its
    config: DVC takes it from ``AWS_ENDPOINT_URL`` (the proxy). Tests copy it: DVC's setup costs more than
    the steps under test."""
    ws = tmp_path_factory.mktemp("ws-template") / "ws"
    versioning.init_workspace(ws, versioning.RemoteSpec(DVC_REMOTE))
    return ws


@pytest.fixture
def workspace(ws_template, tmp_path, direct, proxy) -> Path:
    """A copy of the template workspace, and the remote's bucket, empty."""
    if DVC_BUCKET not in {b["Name"] for b in direct.list_buckets()["Buckets"]}:
        direct.create_bucket(Bucket=DVC_BUCKET)
    for key in keys(direct, DVC_BUCKET, ""):
        direct.delete_object(Bucket=DVC_BUCKET, Key=key)
    ws = tmp_path / "ws"
    shutil.copytree(ws_template, ws, symlinks=True)
    return ws


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def upload(direct, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            direct.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
            )


def stored_objects(direct, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = []
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return {key: direct.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def ledger(ws: Path) -> dict[str, dict]:
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=ws)
    return {row["task_id"]: row for row in workspace_mod.status(cfg)}


def assert_stored_equals_drop(ws: Path, task_id: str, drop: Path) -> None:
    """Every byte stored for the task is the drop's: metadata files equal, every image's SHA-256 equal and
    read back from the shards with their checks."""
    folder = ws / "data" / "tasks" / task_id
    for name in ("task.yaml", "manifest.csv"):
        assert (folder / name).read_bytes() == (drop / name).read_bytes(), name
    rows = read_index(folder / "index.csv")
    assert {r["path"]: r["sha256"] for r in rows} == {
        p.relative_to(drop).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in (drop / "img").iterdir()
    }
    stored = StoredTask(folder)
    try:
        assert all(stored.read(r["path"], 10**6) == (drop / r["path"]).read_bytes() for r in stored.rows)
    finally:
        stored.close()


def dvc_remote_problems(objects: dict[str, bytes], prefix: str) -> list[str]:
    """What is wrong in a DVC remote's objects: an object whose md5 is not its name, or a ``.dir`` manifest
    published without all the files it lists (DVC uploads the manifest last, so this must never be seen)."""
    problems, present = [], set()
    for key, data in objects.items():
        name = key[len(prefix) :].removeprefix("files/md5/").replace("/", "")
        md5 = name.removesuffix(".dir")
        present.add(md5)
        if md5_hex(data) != md5:
            problems.append(f"{key}: md5 {md5_hex(data)}")
    for key, data in objects.items():
        if key.endswith(".dir"):
            missing = [e["relpath"] for e in json.loads(data) if e["md5"] not in present]
            if missing:
                problems.append(f"{key} published without {len(missing)} of its files, e.g. {missing[0]}")
    return problems


def assert_remote_holds_workspace(direct, bucket: str, prefix: str, ws: Path) -> None:
    """The remote holds every object of the workspace's data, byte for byte (md5 of each = its DVC hash)."""
    objects = stored_objects(direct, bucket, prefix)
    assert dvc_remote_problems(objects, prefix) == []
    data_md5 = versioning.data_md5(ws)
    wanted = {data_md5 + ".dir"} | {e["md5"] for e in versioning._dir_entries(ws, data_md5)}
    have = {k[len(prefix) :].removeprefix("files/md5/").replace("/", "") for k in objects}
    assert wanted <= have, sorted(wanted - have)[:3]
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    for name in wanted:
        local = (cache / name[:2] / name[2:]).read_bytes()
        assert md5_hex(objects[f"{prefix}files/md5/{name[:2]}/{name[2:]}"]) == md5_hex(local)


def row(name: str, proxy: S3FaultProxy, **held) -> None:
    """One line per row for the suite's table (pytest -s shows them)."""
    print(f"\nROW {name} | injected {proxy.snapshot()} | held {held}")


def keys(direct, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
