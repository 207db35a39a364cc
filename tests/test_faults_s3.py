"""The storage rows of the fault suite: S3 faults injected for real, by a proxy in front of the S3 server.

Each row runs cliploop's real code (the CLI, DVC, MLflow) against the local S3-compatible server through
``tests/s3_fault_proxy.py``, which resets connections, answers 503 SlowDown, adds latency or black-holes
requests, at the given share of requests. What must hold: every step either succeeds with every stored byte
equal to its source (md5/SHA-256 compared on the server's objects), or ends clearly (exit 4 for the CLI,
"safe to re-run") with nothing half-published; and a rerun without faults completes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import boto3
import pytest

from components.support import storage
from flows.cli import main
from tests import s3_fault_kit as kit
from tests.conftest import S3_REGION
from tests.drops import make_task

pytestmark = pytest.mark.faults

proxy, direct, workspace = kit.proxy, kit.direct, kit.workspace  # fixtures
ws_template = kit.ws_template


# ---- ingestion from an s3:// drop zone -----------------------------------------------------------


@pytest.mark.parametrize("rate", kit.RATES)
def test_ingest_from_s3_drop_zone_under_faults(
    rate, workspace, tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    # 4 attempts, not the default 6: a request then fails after at most ~7 s of backoff, not ~30 s, and the
    # 50% row still sees both ends (retries that succeed, and retries that run out).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    drop = make_task(tmp_path / "drops", "s3f-a", ["cat", "dog"])
    kit.upload(direct, drop, s3_bucket, "incoming/s3f-a")
    ws = workspace
    args = [
        "ingest",
        f"s3://{s3_bucket}/incoming/",
        "-w",
        str(ws),
        "--set",
        f"dvc.remote={kit.DVC_REMOTE}",
        "--set",
        "dvc.push=false",
    ]

    proxy.faults(rate).set(draw="sequence")  # the bucket's name is random; the drop is read one request at a time
    started = time.monotonic()
    code = main(args)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    injected = proxy.injected
    states = {t: r["state"] for t, r in kit.ledger(ws).items()}

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
    assert {t: r["state"] for t, r in kit.ledger(ws).items()} == {"s3f-a": "validated"}
    kit.assert_stored_equals_drop(ws, "s3f-a", drop)
    kit.row(
        f"ingest s3 drop zone @{rate:.0%}", proxy, first_exit=code, seconds=round(seconds, 1), stored_equal_drop=True
    )


def test_ingest_when_the_drop_zone_cannot_be_listed_ends_with_exit_4(
    tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the outage outlasts the retries sooner
    make_task(tmp_path / "drops", "s3f-l", ["cat"])
    kit.upload(direct, tmp_path / "drops" / "s3f-l", s3_bucket, "incoming/s3f-l")
    proxy.set(slowdown=1.0)  # the store throttles everything: the retries run out on the first listing

    code = main(["ingest", f"s3://{s3_bucket}/incoming/", "-w", str(tmp_path / "ws")])
    err = capsys.readouterr().err

    assert code == 4 and "SlowDown" in err and "re-run" in err and "Traceback" not in err
    kit.row("ingest, listing throttled 100%", proxy, exit=code)


def test_images_unreadable_for_the_store_are_a_storage_failure_not_a_quarantine(
    workspace, tmp_path, s3_bucket, direct, proxy, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the outage outlasts the retries sooner
    drop = make_task(tmp_path / "drops", "s3f-q", ["cat", "dog"])
    kit.upload(direct, drop, s3_bucket, "incoming/s3f-q")
    ws = workspace
    proxy.set(reset=1.0, match=r"^GET .*/img/")  # every image GET is reset, every attempt: an outage mid-drop

    args = [
        "ingest",
        f"s3://{s3_bucket}/incoming/s3f-q/",
        "-w",
        str(ws),
        "--set",
        f"dvc.remote={kit.DVC_REMOTE}",
        "--set",
        "dvc.push=false",
    ]

    code = main(args)
    err = capsys.readouterr().err
    states = {t: r["state"] for t, r in kit.ledger(ws).items()}

    assert code == 4, f"exit {code}, ledger {states}: {err}"
    assert "quarantined" not in states.values()
    proxy.set(reset=0.0)
    assert main(args) == 0
    kit.assert_stored_equals_drop(ws, "s3f-q", drop)
    kit.row("ingest, every image GET reset", proxy, exit=code, ledger=states, rerun=0)


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
    kit.row("storage read, black hole 100%", proxy, seconds=round(seconds, 1), error="StorageUnavailable")


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


@pytest.mark.parametrize("rate", kit.RATES)
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
    objects = kit.stored_objects(direct, s3_bucket, prefix + "/")
    local = {"eval/" + p.relative_to(out / "eval").as_posix(): p for p in (out / "eval").rglob("*") if p.is_file()}
    local["config.resolved.yaml"] = out / "config.resolved.yaml"
    for rel, path in local.items():
        assert kit.md5_hex(objects[f"{prefix}/{rel}"]) == kit.md5_hex(path.read_bytes()), rel
    kit.row(
        f"mlflow artifacts @{rate:.0%}",
        proxy,
        first_error=type(error).__name__ if error else None,
        first_status=first.info.status,
        artifacts_md5_equal=len(local),
    )


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

    assert kit.md5_hex(streamed) == kit.md5_hex(big.read_bytes())
    assert kit.md5_hex(direct.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read()) == kit.md5_hex(
        big.read_bytes()
    )
    assert direct.get_object(Bucket=s3_bucket, Key="small")["Body"].read() == b"small body"
    assert proxy.snapshot()["reset"] > 0
    kit.row("proxy: multipart + streamed GET, 20% answers lost", proxy, md5_equal=True)
