"""The storage-timeout rows of the fault suite: a store that takes a request and never answers.

A real S3 server (moto) behind ``tests/s3_fault_proxy.py`` in ``blackhole`` mode: the connection is accepted and
the request swallowed. Before, one swallowed upload held ``dvc push`` (and so ``cliploop ingest`` and the night)
for good: botocore marks uploads ``Expect: 100-continue`` and aiohttp waits for the "100 Continue" without any
timeout. What must hold now: every S3 request, cliploop's own and DVC's, ends after its timeout and attempts
(``s3.*``), a whole push after ``dvc.transfer_timeout_s``; the command ends with exit 4 "safe to re-run", nothing
half-published, and the rerun completes. The commands run as child processes under a guard timeout, so a hang
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from components.intake import workspace
from components.settings.config_loading import load_config
from components.support import storage
from components.support.artifact_store import ArtifactStore
from tests.conftest import REPO, S3_REGION
from tests.drops import make_task
from tests.s3_fault_kit import assert_remote_holds_workspace, ledger, stored_objects
from tests.s3_fault_proxy import S3FaultProxy

pytestmark = pytest.mark.faults

GUARD_S = 150  # far above the bounded run (about 40 s on the 2-core machine), far below "forever"
FAST = ["s3.connect_timeout_s=2", "s3.read_timeout_s=2", "s3.max_attempts=2"]


@pytest.fixture
def direct(s3_env):
    return boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)


@pytest.fixture
def proxy(s3_env):
    with S3FaultProxy(s3_env, seed=7, max_lifetime=GUARD_S + 60) as fault_proxy:
        yield fault_proxy


def _cliploop(args: list[str], proxy: S3FaultProxy) -> tuple[int, str, float]:
    """``cliploop ARGS`` in a child process, every AWS client of it pointed at the proxy; (exit, stderr, seconds).
    Past ``GUARD_S`` the test fails: that is the hang this file is about."""
    # Run from the workspace's parent: the repository's own cliploop.yaml is not this test's configuration.
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url, PYTHONPATH=str(REPO))
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=Path(args[args.index("-w") + 1]).parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=GUARD_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`cliploop {' '.join(args[:2])}` still running after {GUARD_S} s: {proxy.snapshot()}")
    return proc.returncode, proc.stderr, time.monotonic() - started


def _ingest_args(drop, ws, bucket: str, proxy: S3FaultProxy, *settings: str) -> list[str]:
    sets = [f"dvc.remote=s3://{bucket}/dvc", f"s3.endpoint_url={proxy.url}", *settings]
    return ["ingest", str(drop), "-w", str(ws), *(a for s in sets for a in ("--set", s))]


def test_a_swallowed_upload_ends_the_push_with_exit_4_and_the_rerun_completes(tmp_path, s3_bucket, direct, proxy):
    drop = make_task(tmp_path / "drops", "bh-push", ["cat", "dog"])
    ws = tmp_path / "ws"
    args = _ingest_args(drop, ws, s3_bucket, proxy, *FAST)
    proxy.set(blackhole=1.0, match=r"^PUT ")  # every upload is taken and never answered; reads still work

    code, err, seconds = _cliploop(args, proxy)
    swallowed = proxy.snapshot().get("blackhole", 0)
    objects = stored_objects(direct, s3_bucket, "dvc/")

    assert code == 4 and "re-run" in err and "Traceback" not in err, err
    assert "timeout" in err.lower(), err  # it says why: the store did not answer
    assert swallowed >= 2  # at least one upload, with its retry, went into the black hole
    assert ledger(ws)["bh-push"]["state"] == "ingested"  # committed, not accepted: accepting includes the push
    assert not any(key.endswith(".dir") for key in objects)  # nothing published half
    proxy.clear()
    code_again, err_again, _ = _cliploop(args, proxy)
    assert code_again == 0, err_again
    assert ledger(ws)["bh-push"]["state"] == "validated"
    assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    print(f"\nROW dvc push, every PUT black-holed | exit {code} in {seconds:.1f} s | swallowed {swallowed} | rerun 0")


def test_a_push_that_outlives_its_deadline_is_stopped_with_exit_4(tmp_path, s3_bucket, direct, proxy):
    drop = make_task(tmp_path / "drops", "slow-push", ["cat"])
    ws = tmp_path / "ws"
    args = _ingest_args(drop, ws, s3_bucket, proxy, *FAST, "dvc.transfer_timeout_s=3")
    proxy.set(latency=1.5)  # every request answers, slowly: no request times out, the push as a whole is too slow

    code, err, seconds = _cliploop(args, proxy)

    assert code == 4 and "did not finish within 3 s" in err and "re-run" in err, err
    assert ledger(ws)["slow-push"]["state"] == "ingested"
    assert not any(key.endswith(".dir") for key in stored_objects(direct, s3_bucket, "dvc/"))
    proxy.clear()
    code_again, err_again, _ = _cliploop(args, proxy)
    assert code_again == 0, err_again
    assert_remote_holds_workspace(direct, s3_bucket, "dvc/", ws)
    print(f"\nROW dvc push past dvc.transfer_timeout_s=3 | exit {code} in {seconds:.1f} s | rerun 0")


def test_cliploops_own_s3_client_takes_the_configured_bounds_and_a_swallowed_put_ends(tmp_path, s3_bucket, proxy):
    config = load_config(
        overrides=[f"workspace={tmp_path / 'ws'}", f"s3.endpoint_url={proxy.url}", *FAST], env={}, cwd=tmp_path
    )
    settings = workspace.s3_settings(config)
    client_config = storage.s3_client(settings).meta.config
    assert (client_config.connect_timeout, client_config.read_timeout) == (2, 2)
    assert client_config.retries["total_max_attempts"] == 2
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "state.bin").write_bytes(os.urandom(4096))
    store = ArtifactStore(f"s3://{s3_bucket}/artifacts", tmp_path / "cache", settings)
    proxy.set(blackhole=1.0, match=r"^PUT ")

    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match="re-run"):
        store.publish(folder, "states", "k1", {"ok": True})
    seconds = time.monotonic() - started

    assert seconds < 20 and proxy.snapshot()["blackhole"] == 2  # two attempts of 2 s each, then it stopped
    print(f"\nROW artifact upload, PUT black-holed | StorageUnavailable in {seconds:.1f} s")
