"""The storage rows of the fault suite: S3 faults injected for real, by a proxy in front of the S3 server.

Each row runs cliploop's real code (the CLI, DVC, MLflow) against the local S3-compatible server through
``tests/s3_fault_proxy.py``, which resets connections, answers 503 SlowDown, adds latency or black-holes
requests, at the given share of requests. What must hold: every step either succeeds with every stored byte
equal to its source (md5/SHA-256 compared on the server's objects), or ends clearly (exit 4 for the CLI,
"safe to re-run") with nothing half-published; and a rerun without faults completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from components.intake import versioning
from components.intake import workspace as workspace_mod
from components.intake.shards import StoredTask, read_index
from components.settings.config_loading import load_config
from components.support import storage
from flows.cli import main
from tests.conftest import REPO, S3_REGION
from tests.drops import make_task
from tests.s3_fault_proxy import S3FaultProxy

pytestmark = pytest.mark.faults

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
    for key in _keys(direct, DVC_BUCKET, ""):
        direct.delete_object(Bucket=DVC_BUCKET, Key=key)
    ws = tmp_path / "ws"
    shutil.copytree(ws_template, ws, symlinks=True)
    return ws


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _upload(direct, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            direct.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
            )


def _objects(direct, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = []
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return {key: direct.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _ledger(ws: Path) -> dict[str, dict]:
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=ws)
    return {row["task_id"]: row for row in workspace_mod.status(cfg)}


def _assert_stored_equals_drop(ws: Path, task_id: str, drop: Path) -> None:
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


def _dvc_remote_problems(objects: dict[str, bytes], prefix: str) -> list[str]:
    """What is wrong in a DVC remote's objects: an object whose md5 is not its name, or a ``.dir`` manifest
    published without all the files it lists (DVC uploads the manifest last, so this must never be seen)."""
    problems, present = [], set()
    for key, data in objects.items():
        name = key[len(prefix) :].removeprefix("files/md5/").replace("/", "")
        md5 = name.removesuffix(".dir")
        present.add(md5)
        if _md5(data) != md5:
            problems.append(f"{key}: md5 {_md5(data)}")
    for key, data in objects.items():
        if key.endswith(".dir"):
            missing = [e["relpath"] for e in json.loads(data) if e["md5"] not in present]
            if missing:
                problems.append(f"{key} published without {len(missing)} of its files, e.g. {missing[0]}")
    return problems


def _assert_remote_holds_workspace(direct, bucket: str, prefix: str, ws: Path) -> None:
    """The remote holds every object of the workspace's data, byte for byte (md5 of each = its DVC hash)."""
    objects = _objects(direct, bucket, prefix)
    assert _dvc_remote_problems(objects, prefix) == []
    data_md5 = versioning.data_md5(ws)
    wanted = {data_md5 + ".dir"} | {e["md5"] for e in versioning._dir_entries(ws, data_md5)}
    have = {k[len(prefix) :].removeprefix("files/md5/").replace("/", "") for k in objects}
    assert wanted <= have, sorted(wanted - have)[:3]
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    for name in wanted:
        local = (cache / name[:2] / name[2:]).read_bytes()
        assert _md5(objects[f"{prefix}files/md5/{name[:2]}/{name[2:]}"]) == _md5(local)


def _row(name: str, proxy: S3FaultProxy, **held) -> None:
    """One line per row for the suite's table (pytest -s shows them)."""
    print(f"\nROW {name} | injected {proxy.snapshot()} | held {held}")


# ---- ingestion from an s3:// drop zone -----------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
def test_ingest_from_s3_drop_zone_under_faults(
    rate, workspace, tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    # 4 attempts, not the default 6: a request then fails after at most ~7 s of backoff, not ~30 s, and the
    # 50% row still sees both ends (retries that succeed, and retries that run out).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    drop = make_task(tmp_path / "drops", "s3f-a", ["cat", "dog"])
    _upload(direct, drop, s3_bucket, "incoming/s3f-a")
    ws = workspace
    args = [
        "ingest",
        f"s3://{s3_bucket}/incoming/",
        "-w",
        str(ws),
        "--set",
        f"dvc.remote={DVC_REMOTE}",
        "--set",
        "dvc.push=false",
    ]

    proxy.faults(rate).set(draw="sequence")  # the bucket's name is random; the drop is read one request at a time
    started = time.monotonic()
    code = main(args)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    injected = proxy.injected
    states = {t: r["state"] for t, r in _ledger(ws).items()}

    assert "Traceback" not in err
    assert code in (0, 4), f"exit {code}, ledger {states}: {err}"
    assert "quarantined" not in states.values(), f"a storage fault was taken for bad data: {states}"
    if rate == 0:
        assert code == 0 and injected == 0
    else:
        assert injected > 0
    if code == 4:
        assert "re-run" in err and "S3" in err
        proxy.faults(0.0)
        assert main(args) == 0
    assert {t: r["state"] for t, r in _ledger(ws).items()} == {"s3f-a": "validated"}
    _assert_stored_equals_drop(ws, "s3f-a", drop)
    _row(f"ingest s3 drop zone @{rate:.0%}", proxy, first_exit=code, seconds=round(seconds, 1), stored_equal_drop=True)


def test_ingest_when_the_drop_zone_cannot_be_listed_ends_with_exit_4(
    tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the outage outlasts the retries sooner
    make_task(tmp_path / "drops", "s3f-l", ["cat"])
    _upload(direct, tmp_path / "drops" / "s3f-l", s3_bucket, "incoming/s3f-l")
    proxy.set(slowdown=1.0)  # the store throttles everything: the retries run out on the first listing

    code = main(["ingest", f"s3://{s3_bucket}/incoming/", "-w", str(tmp_path / "ws")])
    err = capsys.readouterr().err

    assert code == 4 and "SlowDown" in err and "re-run" in err and "Traceback" not in err
    _row("ingest, listing throttled 100%", proxy, exit=code)


def test_images_unreadable_for_the_store_are_a_storage_failure_not_a_quarantine(
    workspace, tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the outage outlasts the retries sooner
    drop = make_task(tmp_path / "drops", "s3f-q", ["cat", "dog"])
    _upload(direct, drop, s3_bucket, "incoming/s3f-q")
    ws = workspace
    proxy.set(reset=1.0, match=r"^GET .*/img/")  # every image GET is reset, every attempt: an outage mid-drop

    args = [
        "ingest",
        f"s3://{s3_bucket}/incoming/s3f-q/",
        "-w",
        str(ws),
        "--set",
        f"dvc.remote={DVC_REMOTE}",
        "--set",
        "dvc.push=false",
    ]

    code = main(args)
    err = capsys.readouterr().err
    states = {t: r["state"] for t, r in _ledger(ws).items()}

    assert code == 4, f"exit {code}, ledger {states}: {err}"
    assert "quarantined" not in states.values()
    proxy.set(reset=0.0)
    assert main(args) == 0
    _assert_stored_equals_drop(ws, "s3f-q", drop)
    _row("ingest, every image GET reset", proxy, exit=code, ledger=states, rerun=0)


def test_storage_read_from_a_black_hole_ends_in_bounded_time(s3_bucket, direct, proxy):
    direct.put_object(Bucket=s3_bucket, Key="x/blob", Body=b"payload")
    proxy.set(blackhole=1.0)
    settings = storage.S3Settings(endpoint_url=proxy.url, max_attempts=2, connect_timeout=1, read_timeout=1)

    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="re-run"):
        storage.get_bytes(storage.S3Uri(s3_bucket, "x/blob"), storage.s3_client(settings))
    seconds = time.monotonic() - started

    assert seconds < 10
    assert 2 <= proxy.snapshot()["blackhole"] <= 3  # the attempts were swallowed, and then it stopped
    proxy.set(blackhole=0.0)
    assert storage.get_bytes(storage.S3Uri(s3_bucket, "x/blob"), storage.s3_client(settings)) == b"payload"
    _row("storage read, black hole 100%", proxy, seconds=round(seconds, 1), error="StorageUnavailable")


def test_retry_settings_come_from_the_aws_configuration(monkeypatch, tmp_path):
    """cliploop's S3 client used to hard-code its retries, which hid AWS_MAX_ATTEMPTS and ~/.aws/config."""

    def attempts_and_mode(settings=None) -> tuple[int, str]:
        config = storage.s3_client(settings or storage.S3Settings(region="us-east-1")).meta.config
        return config.retries["total_max_attempts"], config.retries["mode"]

    assert attempts_and_mode() == (storage.DEFAULT_MAX_ATTEMPTS, "standard")
    (tmp_path / "aws-config").write_text("[default]\nmax_attempts = 4\nretry_mode = adaptive\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    assert attempts_and_mode() == (4, "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert attempts_and_mode() == (9, "standard")
    assert attempts_and_mode(storage.S3Settings(region="us-east-1", max_attempts=2)) == (2, "standard")


# ---- dvc push to an S3 remote --------------------------------------------------------------------


@pytest.fixture
def dvc_ws(workspace) -> Path:
    """A workspace whose data/ (16 random files of 2-10 KiB) is DVC-tracked and committed, not yet pushed."""
    rng = random.Random(5)
    for i in range(16):
        path = workspace / "data" / "tasks" / "t" / f"shard-{i:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(2048 + 512 * i))
    versioning.track_data(workspace)
    versioning.commit(workspace, "data", ["data.dvc"])
    return workspace


@pytest.mark.parametrize("rate", RATES)
def test_dvc_push_to_s3_remote_under_faults(rate, dvc_ws, direct, proxy):
    ws, s3_bucket = dvc_ws, DVC_BUCKET

    proxy.faults(rate)
    error = None
    try:
        versioning.push(ws)
    except versioning.VersioningError as exc:
        error = exc
    injected = proxy.injected

    assert injected == 0 if rate == 0 else injected > 0
    assert rate > 0 or error is None
    assert _dvc_remote_problems(_objects(direct, s3_bucket, "dvc/"), "dvc/") == []
    if error is not None:
        assert "dvc push" in str(error) and ("SlowDown" in str(error) or "reset" in str(error)), str(error)
        proxy.faults(0.0)
        versioning.push(ws)
    _assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    _row(f"dvc push @{rate:.0%}", proxy, first_error=bool(error), remote_md5_equal=True)


def test_ingest_whose_push_fails_ends_with_exit_4_and_the_rerun_finishes(
    workspace, tmp_path, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the outage outlasts the retries sooner
    drop = make_task(tmp_path / "drops", "push-f", ["cat"])
    ws, s3_bucket = workspace, DVC_BUCKET
    args = ["ingest", str(drop), "-w", str(ws), "--set", f"dvc.remote={DVC_REMOTE}"]
    proxy.set(slowdown=1.0, match=r"^PUT .*\.dir")  # the files go up; the manifest, last, is refused

    code = main(args)
    err = capsys.readouterr().err
    state = _ledger(ws)["push-f"]["state"]
    objects = _objects(direct, s3_bucket, "dvc/")

    assert code == 4 and "dvc push" in err and "SlowDown" in err and "re-run" in err, err
    assert "Traceback" not in err and len(err.splitlines()) < 15
    assert state == "ingested"  # committed, not yet validated: accepting a task includes its push
    assert objects and not any(k.endswith(".dir") for k in objects)  # files without a manifest: unpublished
    proxy.set(slowdown=0.0)
    assert main(args) == 0
    assert _ledger(ws)["push-f"]["state"] == "validated"
    _assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    _row("ingest, every DVC upload throttled", proxy, exit=code, ledger=state, rerun=0)


# ---- MLflow artifacts on an s3:// artifact root --------------------------------------------------


def _update_folder(root: Path) -> Path:
    out = root / "update"
    (out / "eval").mkdir(parents=True)
    rng = __import__("random").Random(7)
    (out / "eval" / "accuracy_matrix.json").write_text(json.dumps({"tasks": ["t1"], "matrix": [[0.5]]}))
    (out / "eval" / "curves.bin").write_bytes(bytes(rng.getrandbits(8) for _ in range(300_000)))
    (out / "eval" / "nested").mkdir()
    for i in range(8):  # enough requests for the shares to bite
        (out / "eval" / "nested" / f"class-{i}.txt").write_text(f"per-class accuracy {i}\n" * (50 + i))
    (out / "config.resolved.yaml").write_text("method:\n  name: lvp\n")
    return out


@pytest.mark.parametrize("rate", RATES)
def test_mlflow_artifacts_to_s3_under_faults(rate, tmp_path, s3_bucket, direct, proxy, monkeypatch):
    from components.registry.registry import Registry

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)
    registry = Registry(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="faults",
        artifact_root=f"s3://{s3_bucket}/mlflow",
        lock_dir=tmp_path / "locks",
    )
    out = _update_folder(tmp_path)
    registry.experiment_id()  # the experiment exists before the faults start (a tracking call, not S3)

    def log() -> str:
        return registry.log_update(
            out, "t1", {"average_accuracy": 0.5}, {"t1": 0.5}, {"method.name": "lvp"}, {"run_key": "k1"}
        )

    proxy.faults(rate).set(draw="sequence")  # artifact paths hold a random run id; uploads go one at a time
    error = None
    try:
        run_id = log()
    except Exception as exc:  # noqa: BLE001 - whatever the caller sees, it must say what failed
        error = exc
    injected = proxy.injected
    runs = registry.client.search_runs([registry.experiment_id()])
    assert len(runs) == 1
    first = runs[0]
    if rate == 0:
        assert error is None and injected == 0
    else:
        assert injected > 0
    if error is not None:
        # A run whose artifacts did not all arrive is never left FINISHED (nothing reads it as complete).
        assert first.info.status == "FAILED"
        assert "S3" in str(error) or "upload" in str(error).lower() or "SlowDown" in str(error), repr(error)
        proxy.faults(0.0)
        run_id = log()
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    prefix = run.info.artifact_uri[len(f"s3://{s3_bucket}/") :]
    objects = _objects(direct, s3_bucket, prefix + "/")
    local = {"eval/" + p.relative_to(out / "eval").as_posix(): p for p in (out / "eval").rglob("*") if p.is_file()}
    local["config.resolved.yaml"] = out / "config.resolved.yaml"
    for rel, path in local.items():
        assert _md5(objects[f"{prefix}/{rel}"]) == _md5(path.read_bytes()), rel
    _row(
        f"mlflow artifacts @{rate:.0%}",
        proxy,
        first_error=type(error).__name__ if error else None,
        first_status=first.info.status,
        artifacts_md5_equal=len(local),
    )


# ---- kill -9 and SIGTERM during a DVC push -------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


PUSH = (
    "import sys; from pathlib import Path; from components.intake import versioning; versioning.push(Path(sys.argv[1]))"
)


@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_killed_during_dvc_push_publishes_nothing_half_and_rerun_completes(how, dvc_ws, direct, proxy):
    ws, s3_bucket = dvc_ws, DVC_BUCKET
    proxy.set(latency=1.0)  # each request to the store takes 1 s: the push lasts long enough to be hit

    child = subprocess.Popen(
        [sys.executable, "-c", PUSH, str(ws)],
        cwd=REPO,
        env=dict(os.environ),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    published: list[str] = []
    while time.monotonic() < deadline and child.poll() is None and not published:
        published = _keys(direct, s3_bucket, "dvc/")
        time.sleep(0.02)
    assert child.poll() is None, f"the push ended before it could be killed: {child.communicate()}"
    assert published, "nothing reached the remote in time"
    helpers = _descendants(child.pid)  # the `dvc push` process
    assert helpers
    if how == "kill-9":
        os.killpg(child.pid, signal.SIGKILL)  # the machine or the container goes: every process at once
    else:
        child.send_signal(signal.SIGTERM)  # a scheduler stopping the command
    started = time.monotonic()
    child.communicate(timeout=30)
    ended_in = time.monotonic() - started
    gone_by = time.monotonic() + 1.5  # the push would need several seconds more: an orphan is still there
    while _alive(helpers) and time.monotonic() < gone_by:
        time.sleep(0.05)
    left_behind = _alive(helpers)
    time.sleep(0.5)  # requests in flight when it died land now, or never
    at_kill = _objects(direct, s3_bucket, "dvc/")

    assert _dvc_remote_problems(at_kill, "dvc/") == []
    assert ended_in < 5 and left_behind == [], f"{how}: ended in {ended_in:.1f} s, left {left_behind} running"
    proxy.set(latency=0.0)
    versioning.push(ws)
    _assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    _row(
        f"{how} during dvc push",
        proxy,
        objects_at_kill=len(at_kill),
        of=17,
        dir_at_kill=sum(k.endswith(".dir") for k in at_kill),
        ended_in_s=round(ended_in, 1),
        left_behind=left_behind,
        rerun="complete",
    )


def _keys(direct, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


# ---- the proxy itself ----------------------------------------------------------------------------


def test_proxy_passes_bodies_byte_for_byte_and_resets_after_the_server_answered(tmp_path, direct, proxy):
    """Multipart uploads (aws-chunked parts with trailing checksums), small PUTs and streamed GETs pass unchanged,
    also when 20% of the answers are lost after the server acted (the retried request meets its own result)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    s3_bucket = "cliploop-faults-proxy"  # a fixed name: the same requests, so the same faults, every run
    if s3_bucket not in {b["Name"] for b in direct.list_buckets()["Buckets"]}:
        direct.create_bucket(Bucket=s3_bucket)
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(3).randbytes(11 * 1024 * 1024))
    client = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name=S3_REGION,
        config=Config(retries={"total_max_attempts": 8, "mode": "standard"}),
    )
    proxy.set(reset=0.2, reset_at="response")

    client.upload_file(
        str(big),
        s3_bucket,
        "big.bin",
        Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024),
    )
    client.put_object(Bucket=s3_bucket, Key="small", Body=b"small body")
    streamed = b"".join(client.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].iter_chunks(65536))

    assert _md5(streamed) == _md5(big.read_bytes())
    assert _md5(direct.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read()) == _md5(big.read_bytes())
    assert direct.get_object(Bucket=s3_bucket, Key="small")["Body"].read() == b"small body"
    assert proxy.snapshot()["reset"] > 0
    _row("proxy: multipart + streamed GET, 20% answers lost", proxy, md5_equal=True)
