"""The local stack on 127.0.0.1: a Prefect server, an MLflow server (artifacts in S3) and an S3-compatible object
store, for trying the server setup on one machine (`cliploop stack up|down|status`). MLflow and Prefect store in
SQLite files by default; ``up --db postgres`` starts a local PostgreSQL first and runs both on it
(``infra/postgres.py``), as a platform with many workers and reviewers would.

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

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.postgres import LocalPostgres, PostgresUnavailable, uri
from infra.processes import StackError, alive, healthy, port_busy, stop_all, wait_healthy

DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000, "prefect": 4200, "postgres": 5432}
DATABASES = ("sqlite", "postgres")  # what MLflow and Prefect store in: SQLite files, or one local PostgreSQL
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

    @property
    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.root)

    # ---- services --------------------------------------------------------------------------------------

    @staticmethod
    def services(db: str | None) -> tuple[str, ...]:
        """In start order: the database first (the servers migrate it as they start), then the object store
        (MLflow's artifact root lives in S3)."""
        return ("postgres", "s3", "mlflow", "prefect") if db == "postgres" else ("s3", "mlflow", "prefect")

    def _healthy(self, name: str, found: dict[str, Any]) -> bool:
        if name == "postgres":
            return self.postgres.ready(found["port"])
        return healthy(found["url"] + HEALTH[name])

    def _command(self, name: str, port: int, ports: dict[str, int], auth: bool = False) -> list[str]:
        bin_dir = Path(sys.executable).parent
        if name == "s3":
            return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        if name == "postgres":
            return self.postgres.command(port)
        if name == "mlflow":
            return [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                uri(ports["postgres"], "mlflow", "postgresql+psycopg2")
                if "postgres" in ports
                else f"sqlite:///{self.root / 'mlflow.db'}",
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
            # MLflow's job runner (its GenAI jobs; cliploop starts none) is three more Python processes beside the
            # server: off, the server starts on about a third of the CPU and stops within a second.
            env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
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
        if "postgres" in ports and name in ("mlflow", "prefect"):
            env.update(self.postgres.client_env())  # the password comes from the stack's pgpass file
            if name == "prefect":
                env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = uri(ports["postgres"], "prefect", "postgresql+asyncpg")
        if name == "prefect":
            env["PREFECT_HOME"] = str(self.root / "prefect")
            env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            env["PREFECT_UI_ENABLED"] = env.get("PREFECT_UI_ENABLED", "true")
            if auth:
                env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
        return env

    def up(
        self,
        ports: dict[str, int] | None = None,
        timeout: float = 120,
        progress=print,
        auth: bool = False,
        db: str = "sqlite",
    ) -> dict[str, Any]:
        """Start what is not running yet; ``auth``: behind credentials from the environment (``AUTH_VARIABLES``);
        ``db``: what MLflow and Prefect store in (``DATABASES``)."""
        if db not in DATABASES:
            raise StackError(f"--db must be one of {', '.join(DATABASES)}, not {db!r}")
        try:
            import moto  # noqa: F401
        except ImportError:
            raise StackError(
                "the local object store needs moto's server: pip install 'moto[server]' (or `pip install -e .[stack]`)"
            ) from None
        if db == "postgres" and importlib.util.find_spec("psycopg2") is None:
            raise StackError(
                "MLflow reaches PostgreSQL through psycopg2: pip install psycopg2-binary (or `pip install -e .[stack]`)"
            )
        missing = [name for name in AUTH_VARIABLES if auth and not os.environ.get(name)]
        if missing:
            raise StackError(f"--auth takes the credentials from the environment: set {', '.join(missing)}")
        state = self.read()
        names = self.services(db)
        wanted = {
            k: v for k, v in {**DEFAULT_PORTS, **(state.get("ports") or {}), **(ports or {})}.items() if k in names
        }
        running = state.get("services", {})
        if running and any(alive(s["pid"]) for s in running.values()):
            if bool(state.get("auth")) != auth:
                raise StackError(
                    f"the stack runs {'with' if state.get('auth') else 'without'} auth: `cliploop stack down` first"
                )
            if state.get("db", "sqlite") != db:
                raise StackError(f"the stack runs on {state.get('db', 'sqlite')}: `cliploop stack down` first")
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        to_start = []
        for name in names:
            found = running.get(name)
            if found and alive(found["pid"]) and self._healthy(name, found):
                progress(f"{name}: already running (pid {found['pid']}, {found['url']})")
            else:
                to_start.append(name)
        # Every port is checked before anything starts: a busy third port must not leave the first server running.
        for name in to_start:
            if port_busy(wanted[name]):
                raise StackError(
                    f"{name}: port {wanted[name]} on 127.0.0.1 is taken by another program; "
                    f"choose another with --port-{name} (nothing was started)"
                )
        started: list[str] = []
        try:
            if "postgres" in to_start:
                self.postgres.prepare()  # the cluster and its password, made once
                self._start(["postgres"], wanted, running, started, auth, timeout, progress, db)
                to_start.remove("postgres")
            if "postgres" in wanted:
                self.postgres.create_databases(wanted["postgres"])
            self._start(to_start, wanted, running, started, auth, timeout, progress, db)
            self._work_pools(wanted, progress)
        except BaseException as exc:
            # What this call started goes again (a port taken meanwhile, a server that did not come up, Ctrl-C):
            # the stack is as it was before, and a second `up` starts from there.
            stop_all([running.pop(name)["pid"] for name in started], 10)
            self.write({"ports": wanted, "services": running, "auth": auth, "db": db})
            if isinstance(exc, PostgresUnavailable):
                raise StackError(f"postgres: {exc}" + (f"; stopped {', '.join(started)}" if started else "")) from None
            if isinstance(exc, StackError) and started:
                raise StackError(f"{exc}; stopped what this `up` had started: {', '.join(started)}") from None
            raise
        env = self.env(wanted)
        # Names only: the values stay in the shell that started the stack.
        needs = f"# auth on: set {', '.join(AUTH_VARIABLES)} in the shell too\n" if auth else ""
        if db == "postgres":  # where the servers keep their state (the password is in pgpass, not here)
            needs += (
                f"# databases: PostgreSQL on 127.0.0.1:{wanted['postgres']}, {uri(wanted['postgres'], 'mlflow')} "
                f"(MLflow) and {uri(wanted['postgres'], 'prefect')} (Prefect); password in {self.postgres.pgpass}\n"
            )
        else:
            needs += f"# databases: SQLite files, {self.root / 'mlflow.db'} and {self.root / 'prefect'}\n"
        (self.root / "env").write_text(needs + "".join(f"export {k}={v}\n" for k, v in env.items()))
        state = {"ports": wanted, "services": running, "env_file": str(self.root / "env"), "auth": auth, "db": db}
        self.write(state)
        return state

    def _start(self, names, wanted, running, started, auth, timeout, progress, db) -> None:
        """Launch ``names`` together, then wait until each is healthy: the servers start in parallel (each takes
        seconds, mostly its own imports and migrations), and none needs another to start. ``started`` gets each
        one as it is launched, so a failure stops them all."""
        launched = []
        for name in names:
            port = wanted[name]
            if port_busy(port):  # taken since the check in `up`
                raise StackError(
                    f"{name}: port {port} on 127.0.0.1 is taken by another program; choose another with --port-{name}"
                )
            log = open(self.root / "logs" / f"{name}.log", "ab")
            pg = name == "postgres"
            proc = subprocess.Popen(
                self._command(name, port, wanted, auth),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._service_env(name, wanted, auth),
                start_new_session=True,
                cwd=self.postgres.data_dir if pg else self.root,
                **(self.postgres.run_as() if pg else {}),
            )
            url = f"{'postgresql' if pg else 'http'}://127.0.0.1:{port}"
            running[name] = {"pid": proc.pid, "port": port, "url": url, "log": str(self.root / "logs" / f"{name}.log")}
            started.append(name)
            self.write({"ports": wanted, "services": running, "auth": auth, "db": db})
            launched.append((name, proc, url))
        for name, proc, url in launched:
            check = (lambda: self.postgres.ready(wanted["postgres"])) if name == "postgres" else None
            wait_healthy(name, url + HEALTH.get(name, ""), proc, timeout, self.root / "logs" / f"{name}.log", check)
            behind = ", auth on" if auth and name in ("mlflow", "prefect") else ""
            progress(f"{name}: started (pid {proc.pid}, {url}{behind})")
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
        for name in self.services(state.get("db")):
            found = (state.get("services") or {}).get(name)
            if not found:
                rows.append({"service": name, "state": "not started"})
                continue
            running = alive(found["pid"])
            ok = running and self._healthy(name, found)
            rows.append(
                {
                    "service": name,
                    "state": "healthy" if ok else ("unhealthy" if running else "stopped"),
                    "pid": found["pid"],
                    "url": found["url"],
                    "log": found["log"],
                }
            )
        return rows

    def down(self, timeout: float = 20, progress=print) -> None:
        """Stop every service (SIGTERM to all at once, then SIGKILL to what is left after ``timeout``); the database
        last, once its clients are gone, by PostgreSQL's fast shutdown (SIGINT: open sessions are ended, what was
        committed is kept). Its data stays for the next ``up``."""
        state = self.read()
        services = state.get("services") or {}
        found = [(name, services.get(name)) for name in ("prefect", "mlflow", "s3", "postgres")]
        stopping = [(name, row["pid"]) for name, row in found if row and alive(row["pid"])]
        stop_all([pid for name, pid in stopping if name != "postgres"], timeout)
        stop_all([pid for name, pid in stopping if name == "postgres"], timeout, signal.SIGINT)
        for name, pid in stopping:
            progress(f"{name}: stopped (pid {pid})")
        if self.state_file.exists():
            self.write({"ports": state.get("ports", {}), "services": {}, "db": state.get("db", "sqlite")})


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
