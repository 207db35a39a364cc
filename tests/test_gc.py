"""Data governance rows of the fault suite: collecting DVC objects without losing a registered version's data.

A real workspace (git + DVC with its local remote, MLflow on SQLite, the ledger) holds a chain of two promoted
versions (t-a, then t-b: the champion) and a third task t-c that the ledger knows but whose folder was then
removed by hand, so HEAD no longer has it. ``dvc gc -w -c -f`` keeps HEAD's objects only: it deleted the
champion's data listing from the remote while ``lineage --verify`` still said yes, and ``dvc pull`` at the
champion's commit failed. ``cliploop gc`` keeps what any version, ledger task or the working tree uses; and
``--verify`` asks the remote itself.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.intake import ingestion, versioning
from components.intake.ledger import Ledger
from components.model.state import LearnerState
from components.registry.registry import from_config, run_key
from components.settings.config_loading import load_config
from flows.cli import main
from tests.conftest import _empty_mlflow_store
from tests.drops import make_task

pytestmark = pytest.mark.faults

JUNK = b"pushed once, then never committed: no commit, version or task refers to it\n" * 40


def _config(ws: Path):
    return load_config(overrides=[f"workspace={ws}"], env={}, cwd=ws.parent)


def _remote(ws: Path) -> Path:
    return ws / ".cliploop" / "dvc-remote" / "files" / "md5"


def _object(root: Path, oid: str) -> Path:
    return root / oid[:2] / oid[2:]


def _listing(ws: Path, commit: str) -> str:
    """The data listing (``<md5>.dir``) that ``data.dvc`` names at ``commit``."""
    import yaml

    return yaml.safe_load(versioning.git(["show", f"{commit}:data.dvc"], ws).stdout)["outs"][0]["md5"]


@pytest.fixture(scope="module")
def chain_ws(tmp_path_factory) -> dict:
    """Built once: the workspace described above, with one unreferenced object pushed. Tests copy it."""
    root = tmp_path_factory.mktemp("gc")
    ws = root / "ws"
    cfg = _config(ws)
    for task_id, classes in (("t-a", ["cat", "dog"]), ("t-b", ["emu", "owl"]), ("t-c", ["fox"])):
        assert ingestion.ingest(str(make_task(root / "drops", task_id, classes)), cfg).status == "accepted"
    shutil.copyfile(_empty_mlflow_store(), ws / ".cliploop" / "mlflow.db")
    registry = from_config(cfg)
    with Ledger(ws / ".cliploop" / "ledger.sqlite") as ledger:
        records = {t: ledger.get(t) for t in ("t-a", "t-b", "t-c")}
    parent = None
    for task_id in ("t-a", "t-b"):
        out = root / f"out-{task_id}"
        LearnerState(method="lvp", backbone={"name": "cliploop-tiny"}).save(out / "state")
        cfg.write_resolved(out)
        record = records[task_id]
        tags = {
            "task_id": task_id,
            "parent_version": parent or "",
            "method": "lvp",
            "dvc_md5": record.dvc_md5,
            "workspace_commit": record.workspace_commit,
            "gate": "pass",
        }
        run_id = registry.log_update(out, task_id, {}, {}, {}, {})
        parent = registry.register(run_id, run_key(parent, task_id, record.dvc_md5, "c" * 64), tags)
        registry.promote(parent, "rita", "fine")
    # t-c's folder removed by hand: HEAD no longer has it, the ledger still knows it (it may be re-queued).
    shutil.rmtree(ws / "data" / "tasks" / "t-c")
    versioning.track_data(ws)
    versioning.commit(ws, "remove t-c by hand", ["data.dvc"])
    versioning.push(ws)
    # An object pushed and then never committed (what an abandoned change leaves): the one thing to collect.
    (ws / "data" / "junk").mkdir()
    (ws / "data" / "junk" / "blob.bin").write_bytes(JUNK)
    junk_listing = versioning.track_data(ws) + ".dir"
    versioning.push(ws)
    shutil.rmtree(ws / "data" / "junk")
    versioning.track_data(ws)
    assert versioning.git(["status", "--porcelain", "data.dvc"], ws).stdout == ""
    commits = {t: records[t].workspace_commit for t in records}
    return {"ws": ws, "commits": commits, "junk": [hashlib.md5(JUNK).hexdigest(), junk_listing]}


@pytest.fixture
def ws(chain_ws, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(chain_ws["ws"], copy, symlinks=True)
    return copy


def _pull_at(ws: Path, commit: str, into: Path) -> subprocess.CompletedProcess:
    """A fresh clone of the workspace's git at ``commit``, pulling its data from the same remote."""
    subprocess.run(["git", "clone", "-q", str(ws), str(into)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=into, check=True)
    remote = ws / ".cliploop" / "dvc-remote"
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "remote", "modify", "--local", "storage", "url", str(remote)], cwd=into, check=True)
    return subprocess.run([*dvc, "pull"], cwd=into, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_gc_keeps_every_versions_and_tasks_data_and_deletes_only_the_unreferenced(chain_ws, ws, tmp_path, capsys):
    commits, junk = chain_ws["commits"], chain_ws["junk"]
    remote_before = {p.relative_to(_remote(ws)) for p in _remote(ws).rglob("*") if p.is_file()}
    assert all(_object(_remote(ws), oid).is_file() for oid in junk)

    assert main(["gc", "-w", str(ws)]) == 0  # a dry run by default
    dry = capsys.readouterr().out
    assert "dry run: nothing deleted" in dry and "2 of" in dry, dry
    assert {p.relative_to(_remote(ws)) for p in _remote(ws).rglob("*") if p.is_file()} == remote_before

    assert main(["gc", "-w", str(ws), "--yes"]) == 0
    done = capsys.readouterr().out
    remote_after = {p.relative_to(_remote(ws)) for p in _remote(ws).rglob("*") if p.is_file()}
    cache = ws / ".dvc" / "cache" / "files" / "md5"

    assert "removed 2" in done, done
    assert remote_before - remote_after == {Path(oid[:2]) / oid[2:] for oid in junk}  # the junk, and only it
    assert not any(_object(cache, oid).exists() for oid in junk)
    for task_id, commit in commits.items():  # the champion (t-b), its parent (t-a), the ledger's t-c
        pulled = _pull_at(ws, commit, tmp_path / f"clone-{task_id}")
        assert pulled.returncode == 0, (task_id, pulled.stderr[-800:])
        check = versioning.verify_task(tmp_path / f"clone-{task_id}", task_id, _task_md5(ws, task_id))
        assert check.ok, check.problems
    assert main(["lineage", "champion", "-w", str(ws), "--verify"]) == 0
    capsys.readouterr()
    print(f"\nROW cliploop gc --yes | removed {len(remote_before - remote_after)} unreferenced | pull at 3 commits ok")


def _task_md5(ws: Path, task_id: str) -> str:
    with Ledger(ws / ".cliploop" / "ledger.sqlite") as ledger:
        return ledger.get(task_id).dvc_md5


def test_gc_refuses_in_one_line_when_the_registry_cannot_be_read(ws, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    remote_before = sorted(_remote(ws).rglob("*"))

    code = main(["gc", "-w", str(ws), "--yes", "--set", "mlflow.tracking_uri=http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()

    assert code == 4 and len(err) == 1, err
    assert err[0].startswith("cliploop gc: refused, nothing deleted: the registry cannot be read"), err
    assert sorted(_remote(ws).rglob("*")) == remote_before


def test_verify_fails_when_the_remote_lost_the_champions_data_listing(chain_ws, ws, capsys):
    """What `dvc gc -w -c -f` did: it keeps HEAD's objects, and the champion's commit is not HEAD."""
    champion_listing = _listing(ws, chain_ws["commits"]["t-b"])
    assert main(["lineage", "champion", "-w", str(ws), "--verify"]) == 0
    capsys.readouterr()

    gc = versioning.dvc(["gc", "-w", "-c", "-f"], ws)
    assert gc.returncode == 0
    assert not _object(_remote(ws), champion_listing).exists()  # the defect, reproduced with DVC itself

    code = main(["lineage", "champion", "-w", str(ws), "--verify"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "verified: NO" in out and "version 2: the DVC remote lacks" in out, out
    assert f"data listing {champion_listing}" in out, out
    print(f"\nROW dvc gc -w -c -f, then lineage --verify | exit {code} | names {champion_listing}")


def test_gc_and_the_remote_check_on_an_s3_remote(tmp_path, s3_bucket, s3_env, capsys):
    """The same through s3fs on the S3 server: listing, sizes, deleting, and the remote check of --verify."""
    import boto3

    from components.registry.data_gc import remote_problems
    from tests.conftest import S3_REGION

    ws = tmp_path / "ws"
    cfg = load_config(overrides=[f"workspace={ws}", f"dvc.remote=s3://{s3_bucket}/dvc"], env={}, cwd=tmp_path)
    assert ingestion.ingest(str(make_task(tmp_path / "drops", "s3-a", ["cat"])), cfg).status == "accepted"
    (ws / "data" / "junk").mkdir()
    (ws / "data" / "junk" / "blob.bin").write_bytes(JUNK)
    versioning.track_data(ws)
    versioning.push(ws)
    shutil.rmtree(ws / "data" / "junk")
    versioning.track_data(ws)
    direct = boto3.client("s3", endpoint_url=s3_env, region_name=S3_REGION)

    def keys() -> set[str]:
        return {o["Key"] for o in direct.list_objects_v2(Bucket=s3_bucket, Prefix="dvc/").get("Contents", [])}

    before = keys()
    assert main(["gc", "-w", str(ws), "--yes"]) == 0
    remote_line = next(line for line in capsys.readouterr().out.splitlines() if "remote s3://" in line)
    removed = before - keys()
    junk = hashlib.md5(JUNK).hexdigest()
    assert remote_line.endswith("removed 2") and len(removed) == 2  # the junk file and the listing that named it
    assert f"dvc/files/md5/{junk[:2]}/{junk[2:]}" in removed
    commit = _task_commit(ws, "s3-a")
    assert remote_problems(ws, [("version 1", "s3-a", commit)]) == []
    index = next(e["md5"] for e in versioning.task_entries(ws, "s3-a") if e["relpath"] == "index.csv")
    direct.delete_object(Bucket=s3_bucket, Key=f"dvc/files/md5/{index[:2]}/{index[2:]}")
    assert remote_problems(ws, [("version 1", "s3-a", commit)]) == [
        f"version 1: the DVC remote lacks 1 object(s) of its data: data/tasks/s3-a/index.csv ({index})"
    ]


def _task_commit(ws: Path, task_id: str) -> str:
    with Ledger(ws / ".cliploop" / "ledger.sqlite") as ledger:
        return ledger.get(task_id).workspace_commit
