"""Exposure and secrets (docs/security.md): no credential of a config URI leaves the process, a local Ray
listens on 127.0.0.1 only, and `cliploop stack up --auth` puts the MLflow and Prefect servers behind
credentials that cliploop's clients take from the environment.

The stack test and the night run against real servers on 127.0.0.1 (`cliploop stack up --auth`: moto's S3,
MLflow's basic-auth app, a Prefect server with an auth string), started once for the module. The password is
a random canary: a fixed word can be in what a library ships (Prefect's own block schemas hold "s3cr3t").
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from components.pipeline import step_io
from components.registry.registry import from_config
from components.settings import credentials
from components.settings.config_loading import config_from_doc, load_config
from flows.cli import main
from tests.conftest import REPO, pipeline_config
from tests.drops import make_task

# At least 12 characters: MLflow's basic-auth app refuses a shorter admin password.
CANARY = f"pw-{uuid.uuid4().hex[:16]}"
USER = "alice"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redact_masks_url_passwords_and_secret_query_values():
    redact = credentials.redact
    assert redact(f"http://alice:{CANARY}@127.0.0.1:5000/api") == "http://alice:***@127.0.0.1:5000/api"
    assert redact("postgresql://u:p%40ss@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    # An unencoded "@" in the password: masked whole, not cut at the first "@".
    assert redact("see http://u:p@ss@h:1/x now") == "see http://u:***@h:1/x now"
    assert redact("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&x=1") == (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"
    )
    assert redact("http://h/?token=zz#frag") == "http://h/?token=***#frag"
    for plain in ("ssh://git@github.com/x.git", "s3://bucket/prefix", "http://127.0.0.1:5000", "http://a:***@h"):
        assert redact(plain) == plain
    assert credentials.redacted({"a": [f"ftp://u:{CANARY}@h"], "b": 3}) == {"a": ["ftp://u:***@h"], "b": 3}


def test_a_uri_password_is_kept_in_this_process_only(tmp_path, monkeypatch):
    """A credential with no environment home (an SFTP artifact root) works here, is redacted wherever the config
    goes, and comes back when a flow run of this process is handed the redacted config."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    root = f"sftp://bob:{CANARY}@files.invalid/mlflow"
    cfg = load_config(overrides=[f"workspace={tmp_path}", f"mlflow.artifact_root={root}"], env={}, cwd=tmp_path)
    assert cfg.mlflow.artifact_root == root
    for written in (json.dumps(cfg.portable()), cfg.to_yaml(), json.dumps(step_io.handed_config(cfg))):
        assert CANARY not in written and "sftp://bob:***@files.invalid/mlflow" in written
    assert config_from_doc(cfg.portable()).mlflow.artifact_root == root


def test_a_local_ray_listens_on_loopback_only():
    """`compute.engine: ray` without `ray_address` starts Ray the way pool building does (start_ray); every
    socket listening in its processes (GCS, raylet, agents, a worker that ran a task) is on 127.0.0.1."""
    script = """
import json, psutil, ray
from components.settings.config import ComputeConfig
from components.model.ray_pools import start_ray

start_ray(ComputeConfig(engine="ray", ray_cpus=1))
assert ray.get(ray.remote(lambda: 1).remote()) == 1
me = psutil.Process()
found = []
for proc in [me, *me.children(recursive=True)]:
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.Error:
        continue
    found += [[proc.name(), c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
print(json.dumps(found))
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening
    assert [s for s in listening if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == []


# ---- the local stack behind credentials ------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory):
    """`cliploop stack up --auth` on free ports, the credentials in the environment only while it starts."""
    from infra.stack import Stack

    root = tmp_path_factory.mktemp("stack")
    ws = root / "ws"
    ports = {name: _free_port() for name in ("s3", "mlflow", "prefect")}
    flags = ["-w", str(ws), "--auth"] + [x for name, port in ports.items() for x in (f"--port-{name}", str(port))]
    stack = Stack(ws / ".cliploop" / "stack")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "HOME": str(root / "home"),
            "PREFECT_HOME": str(root / "home" / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_USERNAME": USER,
            "MLFLOW_TRACKING_PASSWORD": CANARY,
            "PREFECT_API_AUTH_STRING": f"{USER}:{CANARY}",
        }.items():
            mp.setenv(name, value)
        try:
            assert main(["stack", "up", *flags]) == 0
        except BaseException:
            stack.down(progress=lambda m: None)
            raise
    try:
        yield stack, ports
    finally:
        stack.down(progress=lambda m: None)


def _status(url: str, auth: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _client_env(monkeypatch, stack, ports) -> None:
    """What a shell that sourced the stack's env file has, without MLflow's credentials (each test says how)."""
    from infra.stack import S3_CREDENTIALS

    monkeypatch.setenv("PREFECT_API_URL", stack.env(ports)["PREFECT_API_URL"])
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"{USER}:{CANARY}")
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


@pytest.mark.stack
def test_stack_auth_refuses_anonymous_requests_and_admits_cliploop(auth_stack, tmp_path, monkeypatch):
    stack, ports = auth_stack
    mlflow, prefect = f"http://127.0.0.1:{ports['mlflow']}", f"http://127.0.0.1:{ports['prefect']}/api"
    search = f"{mlflow}/api/2.0/mlflow/registered-models/search"
    assert _status(search) == 401 and _status(search, f"{USER}:wrong-password") == 401
    assert _status(f"{prefect}/work_pools/filter", body=b"{}") == 401
    assert _status(f"{prefect}/work_pools/filter", f"{USER}:wrong-password", body=b"{}") == 401
    assert _status(f"{mlflow}/health") == 200 and _status(f"{prefect}/health") == 200  # probes stay open
    # The stack's folder (its env file, state, MLflow's user database, logs) names the variables, never their values.
    assert [p for p in stack.root.rglob("*") if p.is_file() and _holds(p, CANARY)] == []
    assert b"MLFLOW_TRACKING_PASSWORD" in (stack.root / "env").read_bytes()

    # cliploop's clients, with the credentials where docs/security.md puts them: the environment.
    _client_env(monkeypatch, stack, ports)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", CANARY)
    settings = [f"workspace={tmp_path}", f"mlflow.tracking_uri={mlflow}", "mlflow.registered_model=auth-check"]
    cfg = load_config(overrides=settings, env={}, cwd=tmp_path)
    registry = from_config(cfg)
    assert registry.versions() == [] and registry.alias("champion") is None
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # The same values as the environment above, as a settings context: a test module run earlier in this process
    # may have left Prefect's settings context pointing elsewhere (a test harness), which the variables don't move.
    with temporary_settings({PREFECT_API_URL: prefect, PREFECT_API_AUTH_STRING: f"{USER}:{CANARY}"}):
        with get_client(sync_client=True) as client:  # the work pools `stack up` made through the auth string
            assert {"cpu", "gpu"} <= {pool.name for pool in client.read_work_pools()}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(Exception, match="401"):
        from_config(cfg).versions()


@pytest.mark.stack
@pytest.mark.slow
def test_no_credential_of_a_config_uri_is_written_logged_or_printed(
    auth_stack, tmp_path, tiny_checkpoint, monkeypatch, capfd, caplog
):
    """A night whose config carries the password in mlflow.tracking_uri and s3.endpoint_url (none in MLflow's
    variables) registers a version on the authenticated server, and the password is in none of: the files it
    wrote (resolved configs, reports, DVC's config, the workspace's git history), the stack's stores (MLflow's
    and Prefect's databases, logs), MLflow's run parameters and artifacts, Prefect's flow-run parameters, the
    console, `cliploop config`, a command's error line."""
    stack, ports = auth_stack
    _client_env(monkeypatch, stack, ports)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the refused command below fails at once
    tracking = f"http://{USER}:{CANARY}@127.0.0.1:{ports['mlflow']}"
    endpoint = f"http://cliploop:{CANARY}@127.0.0.1:{ports['s3']}"
    remote = f"s3://cliploop/dvc-{uuid.uuid4().hex[:8]}"
    settings = [f"mlflow.tracking_uri={tracking}", f"s3.endpoint_url={endpoint}", f"dvc.remote={remote}"]
    cfg = pipeline_config(tmp_path, tiny_checkpoint, "approval.auto_promote=true", *settings)
    for handed in (cfg.portable(), step_io.handed_config(cfg)):  # Prefect parameters of the nightly, the GPU steps
        assert CANARY not in json.dumps(handed)

    # It still works: the night reaches the authenticated MLflow server with the URI's password.
    make_task(tmp_path / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    from flows.nightly import run_night

    summary = run_night(cfg)
    assert [u["outcome"] for u in summary["updates"]] == ["promoted"]
    registry = from_config(cfg)
    run = registry.client.get_run(registry.model_version(1).run_id)
    assert run.data.params["mlflow.tracking_uri"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert not [k for k, v in run.data.params.items() if CANARY in v]
    artifact = Path(registry.client.download_artifacts(run.info.run_id, "config.resolved.yaml", str(tmp_path)))
    assert CANARY not in artifact.read_text()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=50)
    assert any("config" in r.parameters for r in runs)
    assert CANARY not in json.dumps([r.parameters for r in runs], default=str)

    # The console: `cliploop config`, a refused command's error, a malformed --set quoting the URI.
    ws = ["-w", str(cfg.workspace_path)]
    assert main(["config", *ws, *[x for s in settings for x in ("--set", s)]]) == 0
    closed = f"http://{USER}:{CANARY}@127.0.0.1:{_free_port()}"
    assert main(["lineage", "champion", *ws, "--set", f"mlflow.tracking_uri={closed}"]) == 4
    assert main(["config", *ws, "--set", f"mlflow.tracking_uri {closed}"]) == 2
    out, err = capfd.readouterr()
    assert "registry failed" in err and "expected section.key=value" in err
    assert CANARY not in out + err

    # Nothing written: the test's folders (workspace, git history, DVC's config) and the stack's (databases, logs).
    leaks = [p for root in (tmp_path, stack.root) for p in root.rglob("*") if p.is_file() and _holds(p, CANARY)]
    assert leaks == []
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=cfg.workspace_path, capture_output=True, text=True)
    assert history.returncode == 0 and CANARY not in history.stdout
    # and a warning line said where each credential belongs.
    said = [r.getMessage() for r in caplog.records if r.name == "cliploop"]
    assert any("mlflow.tracking_uri" in m and "MLFLOW_TRACKING_PASSWORD" in m for m in said), said
    assert any("s3.endpoint_url" in m and "AWS_SECRET_ACCESS_KEY" in m for m in said), said


def _holds(path: Path, text: str) -> bool:
    try:
        return text.encode() in path.read_bytes()
    except OSError:
        return False
