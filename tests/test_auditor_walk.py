"""The auditor's walk (README, "The auditor"; docs/audit.md), end to end on
real parts: a workspace made by ``cliploop init`` and ``cliploop ingest``, a version registered the way a night
registers it (MLflow on SQLite), then ``git clone``, ``dvc pull`` in the clone, every hash ``cliploop lineage``
reports recomputed from the pulled files by its definition, and ``--verify`` in the clone failing after one
byte changed. Also: a workspace made before the clone-reachable remote keeps its remote, and a moved one keeps
pushing into the remote it carries (issue 24, item 1).

No training runs: the version's learner state is an empty bundle, which is all that registration and lineage
read; training is covered by tests/test_flows.py.
"""

from __future__ import annotations

import configparser
import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.intake import versioning
from flows.cli import main
from tests.conftest import _empty_mlflow_store
from tests.drops import make_task


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _dvc_dir_hash(folder: Path) -> str:
    """DVC's hash of a folder, from its definition: the MD5 of the JSON list of ``{"md5", "relpath"}`` of its
    files (sorted by relpath, keys sorted, Python's default separators), which DVC stores as the ``.dir``
    object."""
    entries = [
        {"md5": _md5(p.read_bytes()), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    return _md5(json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode())


def _content_digest(task: Path) -> str:
    """The drop's content digest (docs/contracts.md; components/intake/validation.py states it) from a stored
    task: SHA-256 of ``json.dumps({"images": sorted distinct (path, sha256 of the image's bytes), "manifest.csv":
    sha256, "task.yaml": sha256}, sort_keys=True)``. Each image's bytes are read from its shard at the offset
    the task's index gives, and hashed here."""
    with open(task / "index.csv", newline="") as fh:
        located = {row["path"]: row for row in csv.DictReader(fh)}
    images = set()
    with open(task / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            where = located[row["path"]]
            with open(task / "shards" / where["shard"], "rb") as shard:
                shard.seek(int(where["offset"]))
                images.add((row["path"], hashlib.sha256(shard.read(int(where["size"]))).hexdigest()))
    doc = {
        "images": sorted(images),
        "manifest.csv": hashlib.sha256((task / "manifest.csv").read_bytes()).hexdigest(),
        "task.yaml": hashlib.sha256((task / "task.yaml").read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _register(ws: Path, task_id: str) -> int:
    """A version of ``task_id`` registered as a night's register step does (``register_update``), approved."""
    from components.model.state import LearnerState
    from components.pipeline import chain, registration
    from components.registry.registry import from_config, run_key
    from components.settings.config_loading import load_config

    shutil.copyfile(_empty_mlflow_store(), ws / ".cliploop" / "mlflow.db")  # MLflow's schema, made once per process
    cfg = load_config(ws / "cliploop.yaml")
    chain.start_learning(cfg, task_id)
    out = ws / ".cliploop" / "runs" / "r1"
    LearnerState(method="lvp", backbone={"name": "cliploop-tiny"}).save(out / "state")
    cfg.write_resolved(out)
    with chain.ledger_of(cfg) as ledger:
        key = run_key(None, task_id, ledger.get(task_id).dvc_md5, cfg.sha256())
    update = {"task_id": task_id, "run_key": key, "parent_version": None, "out_dir": str(out)}
    version = registration.register_update(cfg, update | {"metrics": {}, "final_row": {}})["version"]
    from_config(cfg).promote(version, "rita", "looks right")
    return version


@pytest.mark.slow  # init, ingest, a registration, a clone and a pull through the CLI: 25 s alone
def test_the_auditor_walk_from_a_clone(tmp_path, capsys):
    import mlflow

    ws, clone = tmp_path / "ws", tmp_path / "audit"
    assert main(["init", str(ws)]) == 0
    drop = make_task(tmp_path / "drops", "t-a", ["cat", "dog"], train=2, test=1)
    assert main(["ingest", str(drop), "-w", str(ws)]) == 0
    version = _register(ws, "t-a")
    registry = f"mlflow.tracking_uri=sqlite:///{ws / '.cliploop' / 'mlflow.db'}"
    capsys.readouterr()

    # The auditor clones the workspace and pulls its data: the clone has no .cliploop/ (git ignores it).
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    assert not (clone / ".cliploop").exists() and not (clone / "data" / "tasks").exists()
    pulled = versioning.dvc(["pull"], clone, check=False)
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout

    assert main(["lineage", "champion", "--json", "--verify", "-w", str(clone), "--set", registry]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["verified"] is True and record["problems"] == []
    assert not (clone / ".cliploop").exists()  # a read-only command: nothing made in the clone
    assert record["model"]["version"] == version and len(record["chain"]) == 1
    [link] = record["chain"]
    task = clone / "data" / "tasks" / "t-a"
    assert link["task"]["dvc_md5"] == _dvc_dir_hash(task)
    assert link["task"]["content_digest"] == _content_digest(task)
    # No ledger in a clone: the validation comes from the report pulled with the data.
    assert link["task"]["validation"] == {"success": True, "report": "data/reports/t-a/report.json", "state": None}
    commit = link["task"]["workspace_commit"]
    assert _git(clone, "rev-parse", "HEAD") == commit  # the clone's history holds it: the last ingest
    data_dvc = yaml.safe_load(_git(clone, "show", f"{commit}:data.dvc"))
    assert data_dvc["outs"][0]["md5"] == _dvc_dir_hash(clone / "data") + ".dir"
    kept_at = mlflow.artifacts.download_artifacts(  # the configuration the run keeps, as MLflow serves it
        run_id=link["mlflow_run_id"],
        artifact_path="config.resolved.yaml",
        dst_path=str(tmp_path / "kept"),
        tracking_uri=registry.partition("=")[2],
    )
    assert link["config_file_sha256"] == hashlib.sha256(Path(kept_at).read_bytes()).hexdigest()

    shard = next((task / "shards").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    assert main(["lineage", "champion", "--verify", "-w", str(clone), "--set", registry]) == 1
    out = capsys.readouterr().out
    assert "verified: NO" in out and f"data/tasks/t-a/shards/{shard.name}: changed" in out


def _remote_urls(ws: Path) -> tuple[str | None, str | None]:
    """The default remote's URL in the committed .dvc/config and in .dvc/config.local, as DVC wrote them."""
    out = []
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        parser.read(ws / ".dvc" / name)
        out.append(parser.get("'remote \"storage\"'", "url", fallback=None))
    return out[0], out[1]


def test_an_older_workspace_keeps_its_remote_and_a_moved_one_pushes_into_its_own(tmp_path):
    """A workspace set up before this change names its remote ``../.cliploop/dvc-remote`` in the committed config
    only. Set up again with ``dvc.remote`` unset (what every ingest does), it keeps that very folder and gains an
    absolute spelling in the committed config, so a clone pulls. Moved to another folder, it keeps pushing into
    the remote it carries, never into the old place, and the committed path follows it. Pointed at a remote
    outside, nothing of the old one is left for DVC to read."""
    ws = tmp_path / "ws"
    remote = ws / ".cliploop" / "dvc-remote"
    default = versioning.RemoteSpec(url=versioning.default_remote(ws), configured=False)
    versioning.init_workspace(ws, default)
    # As the code before the change left it: relative, committed, no config.local.
    (ws / ".dvc" / "config.local").unlink(missing_ok=True)
    config = (ws / ".dvc" / "config").read_text()
    (ws / ".dvc" / "config").write_text(config.replace(str(remote), "../.cliploop/dvc-remote"))
    versioning.commit(ws, "as before", [".dvc/config"])
    (ws / "data" / "tasks" / "t1").mkdir()
    (ws / "data" / "tasks" / "t1" / "a.bin").write_bytes(b"first")
    versioning.track_data(ws)
    versioning.push(ws)
    before = sorted(p.relative_to(remote) for p in remote.rglob("*") if p.is_file())
    assert len(before) == 2  # the file and the listing of data/

    versioning.configure_remote(ws, default)
    assert _remote_urls(ws) == (str(remote), "../.cliploop/dvc-remote")
    assert versioning.remote_url(ws) == "../.cliploop/dvc-remote"  # what DVC reads first: the same folder
    versioning.commit(ws, "cliploop: DVC remote for clones", [".dvc/config", "data.dvc"])
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    versioning.dvc(["pull"], clone)
    assert (clone / "data" / "tasks" / "t1" / "a.bin").read_bytes() == b"first"

    moved = tmp_path / "elsewhere" / "ws"
    moved.parent.mkdir()
    shutil.move(ws, moved)
    (moved / "data" / "tasks" / "t1" / "b.bin").write_bytes(b"second")
    versioning.track_data(moved)
    versioning.push(moved)
    assert not ws.exists()  # nothing was pushed to, or made at, the old place
    carried = moved / ".cliploop" / "dvc-remote"
    after = {p.relative_to(carried) for p in carried.rglob("*") if p.is_file()}
    assert set(before) < after and len(after) == 4  # one more file, one more listing
    versioning.configure_remote(moved, versioning.RemoteSpec(versioning.default_remote(moved), configured=False))
    assert _remote_urls(moved) == (str(moved / ".cliploop" / "dvc-remote"), "../.cliploop/dvc-remote")
    # dvc.remote set to a folder outside: the inside spelling leaves config.local too, or DVC would still read it.
    outside = tmp_path / "shared-remote"
    versioning.configure_remote(moved, versioning.RemoteSpec(url=str(outside)))
    assert _remote_urls(moved) == (str(outside), None) and versioning.remote_url(moved) == str(outside)
