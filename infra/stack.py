"""The local stack on 127.0.0.1: a Prefect server, an MLflow server (SQLite backend, artifacts in S3) and an
S3-compatible object store, for trying the server setup on one machine (`cliploop stack up|down|status`).

State lives in ``<workspace>/.cliploop/stack/``: ``stack.json`` (pids, ports, URLs), ``logs/<service>.log``
and ``env`` (the variables that point cliploop, Prefect, MLflow and boto3 at the stack; ``source`` it).
``up`` is idempotent: services already running and healthy are left alone. The object store is moto's
S3-compatible server (in memory: what it holds is gone after ``down``); point ``s3.endpoint_url`` at a
real S3 or MinIO for anything that must last.

``up --auth`` puts the MLflow server behind its basic-auth app and the Prefect server behind an auth string,
both from the environment of the shell that runs it (``AUTH_VARIABLES``; docs/security.md, "The stack's
servers"): the same variables the clients read, so one shell holds them for the servers and for cliploop.
No credential is written to the stack's folder or printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200}
BUCKET = "cliploop"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "cliploop",
    "AWS_SECRET_ACCESS_KEY": "cliploop-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}
HEALTH = {"s3": "/", "mlflow": "/health", "prefect": "/api/health"}  # answered without credentials
# What `up --auth` reads: MLflow's client variables (the server's admin user is made from them) and Prefect's
# client auth string (the server's own is set to it).
AUTH_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
# The basic-auth app's settings: its user database in the stack's folder (MLflow's default is the working
# folder), and no access for a user the admin has not granted any. A night makes hundreds of requests and each
# checks the password against its slow hash: a check that passed is remembered for a minute by the server's one
# worker (a password changed through MLflow's API is seen at once; one changed in the database by hand, within 60 s).
MLFLOW_AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    root: Path  # <workspace>/.cliploop/stack

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    def read(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def write(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    # ---- services --------------------------------------------------------------------------------------

    def _command(self, name: str, port: int, ports: dict[str, int], auth: bool = False) -> list[str]:
        bin_dir = Path(sys.executable).parent
        if name == "s3":
            return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        if name == "mlflow":
            return [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlflow",
                "--workers",
                "1",
                *(["--app-name", "basic-auth"] if auth else []),
            ]
        return [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]

    def env(self, ports: dict[str, int]) -> dict[str, str]:
        """What a shell, a worker or cliploop needs to use the stack."""
        s3 = f"http://127.0.0.1:{ports['s3']}"
        return {
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "CLIPLOOP__MLFLOW__TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL": s3,
            "CLIPLOOP__S3__ENDPOINT_URL": s3,
            **S3_CREDENTIALS,
        }

    def _service_env(self, name: str, ports: dict[str, int], auth: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env.update(S3_CREDENTIALS)
        if name == "mlflow":
            env["MLFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{ports['s3']}"
            if auth:
                ini = self.root / "mlflow-auth.ini"
                ini.write_text(MLFLOW_AUTH_INI.format(db=self.root / "mlflow-auth.db"))
                env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
                # Read when the user database is made (the first start): the admin is the clients' user.
                env["MLFLOW_AUTH_ADMIN_USERNAME"] = os.environ["MLFLOW_TRACKING_USERNAME"]
                env["MLFLOW_AUTH_ADMIN_PASSWORD"] = os.environ["MLFLOW_TRACKING_PASSWORD"]
                # The key of the app's CSRF tokens (the UI's forms), which it refuses to start without: this one
                # server's own unless the shell sets one.
                env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        if name == "prefect":
            env["PREFECT_HOME"] = str(self.root / "prefect")
            env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            env["PREFECT_UI_ENABLED"] = env.get("PREFECT_UI_ENABLED", "true")
            if auth:
                env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
        return env

    def up(
        self, ports: dict[str, int] | None = None, timeout: float = 120, progress=print, auth: bool = False
    ) -> dict[str, Any]:
        """Start what is not running yet; ``auth``: behind credentials from the environment (``AUTH_VARIABLES``)."""
        try:
            import moto  # noqa: F401
        except ImportError:
            raise StackError(
                "the local object store needs moto's server: pip install 'moto[server]' (or `pip install -e .[stack]`)"
            ) from None
        missing = [name for name in AUTH_VARIABLES if auth and not os.environ.get(name)]
        if missing:
            raise StackError(f"--auth takes the credentials from the environment: set {', '.join(missing)}")
        state = self.read()
        wanted = {**DEFAULT_PORTS, **(state.get("ports") or {}), **(ports or {})}
        running = state.get("services", {})
        if running and bool(state.get("auth")) != auth and any(_alive(s["pid"]) for s in running.values()):
            raise StackError(
                f"the stack runs {'with' if state.get('auth') else 'without'} auth: `cliploop stack down` first"
            )
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        to_start = []
        for name in ("s3", "mlflow", "prefect"):  # MLflow's artifact root lives in S3: the store comes first
            found = running.get(name)
            if found and _alive(found["pid"]) and _healthy(found["url"] + HEALTH[name]):
                progress(f"{name}: already running (pid {found['pid']}, {found['url']})")
            else:
                to_start.append(name)
        # Every port is checked before anything starts: a busy third port must not leave the first server running.
        for name in to_start:
            if _port_busy(wanted[name]):
                raise StackError(
                    f"{name}: port {wanted[name]} on 127.0.0.1 is taken by another program; "
                    f"choose another with --port-{name} (nothing was started)"
                )
        started: list[str] = []
        try:
            self._start(to_start, wanted, running, started, auth, timeout, progress)
            self._work_pools(wanted, progress)
        except BaseException as exc:
            # What this call started goes again (a port taken meanwhile, a server that did not come up, Ctrl-C):
            # the stack is as it was before, and a second `up` starts from there.
            _stop_all([running.pop(name)["pid"] for name in started], 10)
            self.write({"ports": wanted, "services": running, "auth": auth})
            if isinstance(exc, StackError) and started:
                raise StackError(f"{exc}; stopped what this `up` had started: {', '.join(started)}") from None
            raise
        env = self.env(wanted)
        # Names only: the values stay in the shell that started the stack.
        needs = f"# auth on: set {', '.join(AUTH_VARIABLES)} in the shell too\n" if auth else ""
        (self.root / "env").write_text(needs + "".join(f"export {k}={v}\n" for k, v in env.items()))
        state = {"ports": wanted, "services": running, "env_file": str(self.root / "env"), "auth": auth}
        self.write(state)
        return state

    def _start(self, names, wanted, running, started, auth, timeout, progress) -> None:
        """Launch ``names`` together, then wait until each is healthy: the servers start in parallel (each takes
        seconds, mostly its own imports and migrations), and none needs another to start. ``started`` gets each
        one as it is launched, so a failure stops them all."""
        launched = []
        for name in names:
            port = wanted[name]
            if _port_busy(port):  # taken since the check in `up`
                raise StackError(
                    f"{name}: port {port} on 127.0.0.1 is taken by another program; choose another with --port-{name}"
                )
            log = open(self.root / "logs" / f"{name}.log", "ab")
            proc = subprocess.Popen(
                self._command(name, port, wanted, auth),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._service_env(name, wanted, auth),
                start_new_session=True,
                cwd=self.root,
            )
            url = f"http://127.0.0.1:{port}"
            running[name] = {"pid": proc.pid, "port": port, "url": url, "log": str(self.root / "logs" / f"{name}.log")}
            started.append(name)
            self.write({"ports": wanted, "services": running, "auth": auth})
            launched.append((name, proc, url))
        for name, proc, url in launched:
            _wait_healthy(name, url + HEALTH[name], proc, timeout, self.root / "logs" / f"{name}.log")
            progress(f"{name}: started (pid {proc.pid}, {url}{', auth on' if auth and name != 's3' else ''})")
            if name == "s3":  # before anything is stored: MLflow only reaches its artifact root on a request
                self._make_bucket(url)

    def _make_bucket(self, url: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if BUCKET not in existing:
            client.create_bucket(Bucket=BUCKET)

    def _work_pools(self, ports: dict[str, int], progress) -> None:
        """Process work pools ``cpu`` and ``gpu``, made by one child through Prefect's client (this process keeps
        no Prefect settings of the server's: a library caller's own Prefect set-up stays as it was). A second ``up``
        finds them and leaves them alone; the client reads the auth string from the environment."""
        env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api"}
        made = subprocess.run([sys.executable, "-m", "infra.stack"], env=env, capture_output=True, text=True)
        if made.returncode != 0:
            raise StackError(f"could not create the work pools: {(made.stdout + made.stderr).strip()[-500:]}")
        for pool in made.stdout.split():
            progress(f"prefect: work pool {pool!r} (process) created")

    def status(self) -> list[dict[str, Any]]:
        state = self.read()
        rows = []
        for name in ("s3", "mlflow", "prefect"):
            found = (state.get("services") or {}).get(name)
            if not found:
                rows.append({"service": name, "state": "not started"})
                continue
            alive = _alive(found["pid"])
            healthy = alive and _healthy(found["url"] + HEALTH[name])
            rows.append(
                {
                    "service": name,
                    "state": "healthy" if healthy else ("unhealthy" if alive else "stopped"),
                    "pid": found["pid"],
                    "url": found["url"],
                    "log": found["log"],
                }
            )
        return rows

    def down(self, timeout: float = 20, progress=print) -> None:
        """Stop every service (SIGTERM to all at once, then SIGKILL to what is left after ``timeout``)."""
        state = self.read()
        found = [(name, (state.get("services") or {}).get(name)) for name in ("prefect", "mlflow", "s3")]
        stopping = [(name, row["pid"]) for name, row in found if row and _alive(row["pid"])]
        _stop_all([pid for _, pid in stopping], timeout)
        for name, pid in stopping:
            progress(f"{name}: stopped (pid {pid})")
        if self.state_file.exists():
            self.write({"ports": state.get("ports", {}), "services": {}})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 500
    except Exception:
        return False


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_healthy(name: str, url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; see {log}:\n" + _tail(log))
        if _healthy(url):
            return
        time.sleep(0.3)
    raise StackError(f"{name} did not become healthy at {url} within {timeout:.0f} s; see {log}:\n" + _tail(log))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_all(pids: list[int], timeout: float) -> None:
    """SIGTERM each service's process group (servers spawn children), then SIGKILL what is left."""
    groups = []
    for pid in pids:
        try:
            groups.append((pid, os.getpgid(pid)))
        except ProcessLookupError:
            continue
    for _, pgid in groups:
        with contextlib.suppress(ProcessLookupError):  # gone since its group was read
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid, _ in groups):
        time.sleep(0.2)
    for pid, pgid in groups:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def _make_work_pools() -> list[str]:
    """The pools missing on the Prefect API the environment names, made; their names returned."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    made = []
    with get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            try:
                client.read_work_pool(pool)
                continue
            except ObjectNotFound:
                pass
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            made.append(pool)
    return made


if __name__ == "__main__":  # `up`'s child that makes the work pools
    try:
        print(" ".join(_make_work_pools()))
    except Exception as exc:  # the server answered its health check but not this (e.g. a wrong auth string)
        sys.exit(f"{type(exc).__name__}: {exc}")
