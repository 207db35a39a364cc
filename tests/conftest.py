"""Shared fixtures: isolated homes for every tool, and a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Hugging Face's hub client reads these once, when it is first imported, and the test modules import it (through
# open_clip) at collection, before any fixture runs: set at the fixture only, they were read as unset, and a test
# loading a pretrained tag retried the hub for a minute or more instead of failing at once (no test may download).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Two test processes share the machine's cores (make test, make check: -n 2), and every process that trains
# starts more: one thread each, not one per core, or their OpenMP threads wait for cores spinning (the training
# files took a quarter more CPU and a fifth more time at two threads). The processes a test starts
# (servers, workers, Ray) inherit it; a benchmark script that measures threads sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train's controller collects its workers' reports every 2 s (Ray's default), and a tiny training of a few steps
# spent most of its time waiting for the next collection. Ray's processes take it from the environment of the process
# that starts Ray, whichever test that is; tests/test_ray_train.py times its kills by it.
RAY_TRAIN_POLL_S = 0.25
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(RAY_TRAIN_POLL_S)

S3_KEY = "testing"
S3_REGION = "us-east-1"


# What starts a server: the fixtures of the S3-compatible server and of a Prefect API, and the modules whose tests
# run flows (a flow run without an API starts Prefect's temporary server), a Ray cluster or an MLflow server.
SERVER_FIXTURES = {"s3_endpoint", "s3_env", "s3_bucket", "prefect_api", "local_ray"}
SERVER_MODULES = {
    "test_faults",
    "test_faults_artifacts",
    "test_faults_fencing",
    "test_faults_registry",
    "test_faults_s3",
    "test_faults_s3_dvc",
    "test_faults_storage",
    "test_flows",
    "test_flows_review",
    "test_gc",
    "test_portable",
    "test_ray_pools",
    "test_ray_train",
    "test_secrets",
    "test_stack",
}
# `make check` sets this: a test that reaches for a Prefect API then fails at once instead of starting a server,
# so a test missing from the lists above shows up as a failure of the fast suite, not as a slow one.
NO_SERVERS = os.environ.get("CLIPLOOP_TEST_NO_SERVERS") == "1"


# The longest files first (measured: `pytest --durations`): `make test` hands whole files to its two processes in
# collection order (--dist loadfile --no-loadscope-reorder), and a long file handed out last is the run's tail (the
# stack's night, started last, ran alone for minutes at the end).
LONGEST_FIRST = [
    "test_stack",
    "test_ray_train",
    "test_flows_review",
    "test_faults",
    "test_secrets",
    "test_stack_postgres",
    "test_flows",
    "test_ingest",
    # the longest files of `make check` (no server), after those: there they come first
    "test_validation",
    "test_methods",
    "test_cli",
    "test_label_doubt",
]


def _module(item) -> str:
    return item.module.__name__.rpartition(".")[2] if item.module else ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _module(item) in SERVER_MODULES or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch, request):
    """No test reads or writes the user's real config, caches or cloud credentials."""
    home = tmp_path_factory.mktemp("home")
    if not NO_SERVERS and (request.node.get_closest_marker("server") or request.node.get_closest_marker("slow")):
        # Prefect's database in this home already has Prefect's schema, as on any machine that ran Prefect once: a
        # Prefect server started here (a night's temporary one, a CLI's in a child process) skips the migrations.
        (home / ".prefect").mkdir()
        shutil.copyfile(_migrated_prefect_database(), home / ".prefect" / "prefect.db")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("CLIPLOOP_CACHE", str(home / ".cache" / "cliploop"))
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PREFECT_HOME", str(home / ".prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Flow runs still go through the real Prefect API; only their log lines are not shipped to it. No test
    # reads them, and lines still queued when a test's temporary server has stopped made the session end
    # with "Error logging to API: All connection attempts failed".
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "cliploop-test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@cliploop.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "cliploop-test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@cliploop.invalid")
    for name in list(os.environ):
        if name.startswith(("AWS_", "CLIPLOOP__")) or name == "CLIPLOOP_CONFIG":
            monkeypatch.delenv(name, raising=False)
    if NO_SERVERS:  # port 9 (discard): nothing answers there
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    """One local Ray per test process (2 CPUs, 2 logical GPUs), shared by every module that uses one and stopped at
    the end: Ray keeps its cluster token for the life of the process, so a second cluster started in the same
    process after a shutdown, under another test's HOME, fails its token check. Its HOME for the start is a folder
    of its own (the token file goes there, not in the user's home)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        home = os.environ.get("HOME")
        os.environ["HOME"] = str(tmp_path_factory.mktemp("ray-home"))
        try:
            ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
        finally:
            if home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = home
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto's standalone server) in its own process on 127.0.0.1.

    moto is an S3-compatible server, not AWS: it is the S3 server that installs from the package
    registries reachable here (MinIO does not), and it speaks the same HTTP protocol to boto3, s3fs and DVC.
    """
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """AWS settings pointing at the local server, through the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env, request):
    """A fresh, empty bucket on the local server."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)
    name = "b-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.getpid() % 10000}-{int(time.time() * 1000) % 100000}"
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (a server in its own process, with its own SQLite database) for every test of this
    process that asks for one: starting one costs seconds on 2 cores, so the suite pays for it once per process.

    What Prefect's ``prefect_test_harness`` does, but for the way out: the harness waits without a limit for the
    client's log and event workers to drain before it stops its server, and on a loaded machine that wait once never
    ended (the session hung after its last test, in a futex wait). Here the drain has a limit, and the server is
    stopped whatever happens."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    folder = Path(tempfile.mkdtemp(prefix="cliploop-prefect-api-"))
    shutil.copyfile(_migrated_prefect_database(), folder / "prefect.db")
    database = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: database}):
        server = SubprocessASGIServer(port=_free_port())  # the server's process takes the database from these
        server.start(timeout=120)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            # Threads that did not copy this context (a flow run from a plain thread) see the same API.
            with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
                yield server.api_url
                # A second or less for this server's workers; the rest of the limit went to the workers of servers
                # already gone (a stack test's), which only ever time out: 20 s at the end of a session, now 5.
                for worker in (APILogWorker, EventsWorker):
                    worker.drain_all(timeout=5)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, tiny_checkpoint) -> Path:
    """A workspace with task ``t-a`` (cat, dog; JPEG images) ingested for real, made once per test process:
    ingestion (git, DVC, Great Expectations) takes seconds, and many rows start from exactly this state. Tests
    copy it (``tests.fault_kit.fault_cfg(..., start=ingested)``), never change it."""
    from components.pipeline import steps
    from tests.drops import make_task

    root = tmp_path_factory.mktemp("ingested")
    cfg = pipeline_config(root, tiny_checkpoint, "gate.max_forgetting=100")
    make_task(root / "incoming", "t-a", ["cat", "dog"], train=3, test=2, image_format="jpg")
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)
    return root / "ws"


@pytest.fixture(scope="session")
def demo_base_model(tmp_path_factory) -> Path:
    """The demo's base model, built for real (``demo.build_base_model``: a warm-up training of its own, the
    slowest set-up of the suite) once per test run: under pytest-xdist the workers share one cache folder, the
    first builds while the others wait on a file lock, then they all find it cached by recipe."""
    import fcntl

    from components.scenarios import demo

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers (each has its own below it)
    cache = root / "demo-cache"
    cache.mkdir(exist_ok=True)
    with open(root / "demo-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return demo.build_base_model(cache, progress=None)


@pytest.fixture
def demo_cache(demo_base_model) -> Path:
    """This test's cache (``CLIPLOOP_CACHE``) holds the demo's base model already, a copy of the one built for
    this run, so ``cliploop demo`` finds it cached by recipe instead of training it again."""
    from components.scenarios import demo
    from components.support.storage import cache_dir

    target = demo.base_model_path(cache_dir() / "demo")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo_base_model, target)
    return target


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Fixed random weights of the tiny model config, saved once per session as (path, sha256), so every
    test and every child process loads the same model without a download."""
    import open_clip
    import torch

    from components.model.backbones import register_builtin_configs, save_weights

    register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("cliploop-tiny", pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return path, save_weights(model, path)


class MemoryImages:
    """A drop-like source of images held in memory (``read(relpath, max_bytes)``)."""

    def __init__(self, blobs: dict[str, bytes]):
        self.blobs = blobs

    def read(self, relpath: str, max_bytes: int) -> bytes:
        return self.blobs[relpath]


@pytest.fixture(scope="module")
def tiny_backbone(tiny_checkpoint):
    """The tiny model with the session's fixed weights, on the CPU."""
    from components.model.backbones import load_backbone
    from components.settings.config import ModelConfig

    path, sha = tiny_checkpoint
    cfg = ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path), sha256=sha, device="cpu")
    return load_backbone(cfg)


def tiny_overrides(ckpt, *extra) -> list[str]:
    """Config overrides that point cliploop at the tiny checkpoint (small evaluation batches)."""
    path, sha = ckpt
    return [
        "model.name=cliploop-tiny",
        "model.pretrained=null",
        f"model.checkpoint={path}",
        f"model.sha256={sha}",
        "evaluation.batch_size=16",
        *extra,
    ]


@pytest.fixture(scope="session")
def drops(tmp_path_factory):
    """Three small task drops: two class-incremental, one domain-incremental over the same classes."""
    from tests.drops import make_task

    root = tmp_path_factory.mktemp("drops")
    return [
        make_task(root, "t-a", ["cat", "dog"], train=4, test=2),
        make_task(root, "t-b", ["emu", "owl"], train=4, test=2),
        make_task(
            root,
            "t-c",
            ["cat", "dog", "emu", "owl"],
            scenario="domain-incremental",
            train=3,
            test=2,
            domain="sketch",
            salt="c",
        ),
    ]


def pipeline_config(tmp_path, ckpt, *extra):
    """A resolved config for whole-pipeline tests: workspace ``tmp_path/ws`` (initialised), drop zone
    ``tmp_path/incoming``, the tiny checkpoint, no retry delay."""
    from components.intake.workspace import ensure_workspace
    from components.settings.config_loading import load_config

    cfg = load_config(
        overrides=[
            f"workspace={tmp_path / 'ws'}",
            f"drop_zone={tmp_path / 'incoming'}",
            *tiny_overrides(ckpt, "orchestration.retry_delay_s=0", *extra),
        ],
        env={},
        cwd=tmp_path,
    )
    ensure_workspace(cfg)
    store = cfg.workspace_path / ".cliploop" / "mlflow.db"
    if cfg.mlflow.tracking_uri is None and not store.exists():
        shutil.copyfile(_empty_mlflow_store(), store)
    return cfg


@functools.cache
def _migrated_prefect_database() -> Path:
    """An empty Prefect SQLite database with Prefect's schema, made by Prefect once per test process. A Prefect
    server started on a new database migrates it first, 13.9 CPU-s instead of 6.2 on 2 cores (docs/benchmarks.md,
    "The test suite's CPU"), and most tests that run a night start one in a fresh home. The stack's own servers
    (tests/test_stack*.py, tests/test_secrets.py) still start from nothing: that is what they test."""
    folder = Path(tempfile.mkdtemp(prefix="cliploop-prefect-template-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "prefect.db"
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{path}",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    subprocess.run([prefect, "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True)
    return path


@functools.cache
def _empty_mlflow_store() -> Path:
    """An empty MLflow SQLite store, made by MLflow once per test process: creating one runs MLflow's schema
    migrations (seconds on 2 cores), and whole-pipeline tests each need one. It holds no experiment of ours
    (cliploop creates its experiment with the workspace's artifact location), so a copy works anywhere."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="cliploop-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, True)  # one per test process: they piled up in /tmp run after run
    path = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
