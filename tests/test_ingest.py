"""Ingestion against real git, real DVC (local folder and S3 remotes) and a real S3-compatible server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

from components.intake import ingestion, versioning, workspace
from components.intake.shards import StoredTask
from components.settings.config_loading import load_config
from flows.cli import main
from tests.drops import append_rows, make_task, png_bytes


def _config(ws: Path, *overrides: str):
    return load_config(overrides=[f"workspace={ws}", *overrides], env={}, cwd=ws)


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout


def _upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_same_task_twice_is_one_entry_and_one_dvc_version(tmp_path):
    ws = tmp_path / "ws"
    cfg = _config(ws)
    drop = make_task(tmp_path / "drops", "t1", ["cat", "dog"])

    first = ingestion.ingest(str(drop), cfg)
    commits_after_first = _git(ws, "log", "--oneline", "--", "data.dvc")
    dvc_after_first = (ws / "data.dvc").read_text()
    second = ingestion.ingest(str(drop), cfg)

    assert (first.status, second.status) == ("accepted", "unchanged")
    assert _git(ws, "log", "--oneline", "--", "data.dvc") == commits_after_first
    assert (ws / "data.dvc").read_text() == dvc_after_first
    rows = workspace.status(cfg)
    assert [r["task_id"] for r in rows] == ["t1"]
    record = rows[0]
    assert record["state"] == "validated"
    assert record["dvc_md5"] == versioning.task_md5(ws, "t1")
    assert record["workspace_commit"] == _git(ws, "rev-parse", "HEAD").strip()
    # The task hash is what `dvc add` of the task folder alone would give.
    assert versioning.verify_task(ws, "t1", record["dvc_md5"]).ok
    # The data is in the local DVC remote (pushed), and the stored shards read back with checksums.
    assert any((ws / ".cliploop" / "dvc-remote").rglob("*.dir"))
    stored = StoredTask(ws / "data" / "tasks" / "t1")
    assert len(stored.rows) == 10
    assert all(stored.read(r["path"], 10**6) for r in stored.rows)
    stored.close()


def test_changed_payload_under_known_id_is_refused(tmp_path, capsys):
    ws = tmp_path / "ws"
    cfg = _config(ws)
    drop = make_task(tmp_path / "drops", "t1", ["cat"])
    assert ingestion.ingest(str(drop), cfg).status == "accepted"
    head = _git(ws, "rev-parse", "HEAD")
    (drop / "img" / "train-cat-0.png").write_bytes(png_bytes(123456))

    with pytest.raises(ingestion.IngestRefused, match="never overwritten"):
        ingestion.ingest(str(drop), cfg)
    assert main(["ingest", str(drop), "-w", str(ws)]) == 3
    assert "REFUSED" in capsys.readouterr().err
    assert _git(ws, "rev-parse", "HEAD") == head
    assert len(workspace.status(cfg)) == 1


def test_corrected_drop_after_quarantine_is_accepted(tmp_path):
    ws = tmp_path / "ws"
    cfg = _config(ws)
    drop = make_task(tmp_path / "drops", "t1", ["cat"])
    append_rows(drop, [["img/missing.png", "cat", "train"]])
    assert ingestion.ingest(str(drop), cfg).status == "quarantined"
    make_task(tmp_path / "drops", "t1", ["cat"])  # the data team fixes the manifest

    outcome = ingestion.ingest(str(drop), cfg)

    assert outcome.status == "accepted"
    assert outcome.record.attempts == 2
    with workspace.open_ledger(cfg) as ledger:
        states = [e["to_state"] for e in ledger.events("t1")]
    assert states == ["ingested", "quarantined", "ingested", "validated"]


def test_crash_during_dvc_step_is_resumed_by_rerun(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    cfg = _config(ws)
    workspace.ensure_workspace(cfg)
    drop = make_task(tmp_path / "drops", "t1", ["cat"])
    real_track = versioning.track_data

    def crash(_ws):
        raise versioning.VersioningError("simulated crash: disk full")

    monkeypatch.setattr(versioning, "track_data", crash)
    with pytest.raises(versioning.VersioningError):
        ingestion.ingest(str(drop), cfg)
    assert workspace.status(cfg)[0]["state"] == "ingested"
    monkeypatch.setattr(versioning, "track_data", real_track)

    outcome = ingestion.ingest(str(drop), cfg)

    assert outcome.status == "resumed" and outcome.state == "validated"
    assert len(_git(ws, "log", "--oneline", "--", "data.dvc").splitlines()) == 2  # init + this task, once
    assert versioning.verify_task(ws, "t1", outcome.record.dvc_md5).ok


def test_s3_drop_zone_is_discovered_and_matches_a_local_drop(tmp_path, s3_bucket, s3_env):
    client = boto3.client("s3")
    drops = tmp_path / "drops"
    make_task(drops, "s3-a", ["cat", "dog"])
    make_task(drops, "s3-b", ["emu"], salt="b")
    _upload_folder(client, drops / "s3-a", s3_bucket, "incoming/s3-a")
    _upload_folder(client, drops / "s3-b", s3_bucket, "incoming/s3-b")
    client.put_object(Bucket=s3_bucket, Key="incoming/not-a-task/readme.txt", Body=b"x")
    ws = tmp_path / "ws"

    code = main(["ingest", f"s3://{s3_bucket}/incoming/", "-w", str(ws), "--json"])

    assert code == 0
    rows = {r["task_id"]: r for r in workspace.status(_config(ws))}
    assert set(rows) == {"s3-a", "s3-b"} and {r["state"] for r in rows.values()} == {"validated"}
    assert rows["s3-a"]["source"] == f"s3://{s3_bucket}/incoming/s3-a/"
    # Same payload from a folder has the same identity.
    local_ws = tmp_path / "local"
    local = ingestion.ingest(str(drops / "s3-a"), _config(local_ws))
    assert local.record.content_digest == rows["s3-a"]["content_digest"]
    assert local.record.dvc_md5 == rows["s3-a"]["dvc_md5"]


def test_s3_dvc_remote_receives_the_data_and_a_clone_can_pull_it(tmp_path, s3_bucket, s3_env):
    ws = tmp_path / "ws"
    cfg = _config(ws, f"dvc.remote=s3://{s3_bucket}/dvc", f"s3.endpoint_url={s3_env}")
    drop = make_task(tmp_path / "drops", "t1", ["cat"])
    outcome = ingestion.ingest(str(drop), cfg)
    assert outcome.status == "accepted"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="dvc/")["Contents"]]
    assert any(k.endswith(".dir") for k in keys)
    assert "endpointurl" not in (ws / ".dvc" / "config").read_text()  # per-machine, kept in config.local

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    versioning.dvc(["remote", "modify", "--local", "storage", "endpointurl", s3_env], clone)
    versioning.dvc(["pull", "-q"], clone)
    assert versioning.verify_task(clone, "t1", outcome.record.dvc_md5).ok


def test_verify_detects_one_changed_byte(tmp_path):
    ws = tmp_path / "ws"
    outcome = ingestion.ingest(str(make_task(tmp_path / "drops", "t1", ["cat"])), _config(ws))
    shard = next((ws / "data" / "tasks" / "t1" / "shards").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    result = versioning.verify_task(ws, "t1", outcome.record.dvc_md5)
    assert not result.ok
    assert any("shards/shard-00000.tar: changed" in p for p in result.problems)


def test_status_json_and_table(tmp_path, capsys):
    ws = tmp_path / "ws"
    drops = tmp_path / "drops"
    make_task(drops, "a-good", ["cat"])
    bad = make_task(drops, "b-bad", ["dog"])
    append_rows(bad, [["img/nope.png", "dog", "train"]])
    assert main(["ingest", str(drops), "-w", str(ws)]) == 1  # one task quarantined
    capsys.readouterr()
    assert main(["status", "-w", str(ws), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    states = {t["task_id"]: (t["state"], Path(t["report"]).is_file()) for t in payload["tasks"]}
    assert states == {"a-good": ("validated", True), "b-bad": ("quarantined", True)}
    assert main(["status", "-w", str(ws)]) == 0
    table = capsys.readouterr().out
    assert "a-good" in table and "quarantined" in table


def test_init_writes_a_commented_config_and_a_workspace(tmp_path, capsys):
    target = tmp_path / "new"
    assert main(["init", str(target)]) == 0
    text = (target / "cliploop.yaml").read_text()
    assert "# largest accepted image in pixels" in text
    assert (target / ".git").is_dir() and (target / ".dvc").is_dir() and (target / "data.dvc").is_file()
    assert (target / "incoming").is_dir()
    # Committed: the absolute path, which a clone on this machine reaches; the workspace's own config.local (read
    # first, never committed) names it relative to .dvc/, so the workspace moved elsewhere keeps its remote.
    assert f"url = {target.resolve() / '.cliploop' / 'dvc-remote'}\n" in (target / ".dvc" / "config").read_text()
    assert "url = ../.cliploop/dvc-remote\n" in (target / ".dvc" / "config.local").read_text()
    assert _git(target, "status", "--porcelain") == ""
    assert main(["init", str(target)]) == 0  # a second init is harmless
    assert "kept the existing" in capsys.readouterr().out


@pytest.mark.slow  # init, ingest and status through the CLI, twice
def test_ingest_with_w_reads_that_workspaces_config_and_keeps_its_remote(tmp_path, monkeypatch, capsys):
    """``cliploop ingest DROP -w WS`` run from another workspace's folder: WS's own cliploop.yaml is the one
    read (its remote, not the current folder's default), and no ingest repoints WS's DVC remote, even one run
    with no config at all."""
    ws, other, remote = tmp_path / "ws", tmp_path / "other", tmp_path / "elsewhere" / "remote"
    assert main(["init", str(ws), "--remote", str(remote)]) == 0
    assert main(["init", str(other)]) == 0
    before = (ws / ".dvc" / "config").read_text()
    assert str(remote) in before and "dvc-remote" not in before
    make_task(tmp_path / "drops", "t-a", ["cat", "dog"], train=2, test=1)
    monkeypatch.chdir(other)  # the current folder is another workspace, with its own cliploop.yaml

    assert main(["ingest", str(tmp_path / "drops" / "t-a"), "-w", str(ws)]) == 0
    assert (ws / ".dvc" / "config").read_text() == before
    assert "dvc-remote" not in _git(ws, "log", "-p", "--", ".dvc/config")
    assert any(remote.rglob("*")) and not (ws / ".cliploop" / "dvc-remote").exists()  # pushed where WS says

    (ws / "cliploop.yaml").rename(tmp_path / "moved.yaml")  # no config for WS at all: the remote still stays
    make_task(tmp_path / "drops", "t-b", ["emu", "owl"], train=2, test=1)
    assert main(["ingest", str(tmp_path / "drops" / "t-b"), "-w", str(ws)]) == 0
    assert (ws / ".dvc" / "config").read_text() == before
    assert not (ws / ".cliploop" / "dvc-remote").exists()


def test_demo_drop_zone_is_deterministic_and_meaningful(tmp_path):
    from components.scenarios import demo

    first = demo.build_drop_zone(tmp_path / "a")
    second = demo.build_drop_zone(tmp_path / "b")
    for x, y in zip(first, second):
        files_x = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
        assert files_x == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file())
        assert all((x / f).read_bytes() == (y / f).read_bytes() for f in files_x)
    specs = [yaml.safe_load((f / "task.yaml").read_text()) for f in first]
    assert [s["scenario"] for s in specs[:3]] == ["class-incremental", "class-incremental", "domain-incremental"]
    assert [c["name"] for c in specs[0]["classes"]] == ["zero", "one", "two", "three", "four"]


def test_module_entry_point_runs_without_the_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "-w", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "no tasks" in proc.stdout


def test_a_symlink_in_the_drop_zone_is_reported_and_not_followed(tmp_path, capsys, caplog):
    """A link out of the drop zone could lead anywhere on the machine: it is not followed, and it is said."""
    from components.intake import tasks

    ws, zone = tmp_path / "ws", tmp_path / "zone"
    make_task(zone, "a-real", ["cat"])
    elsewhere = make_task(tmp_path / "elsewhere", "b-linked", ["dog"])
    (zone / "b-linked").symlink_to(elsewhere, target_is_directory=True)

    assert main(["ingest", str(zone), "-w", str(ws)]) == 0
    err = capsys.readouterr().err
    assert f"{zone / 'b-linked'}: skipped: a symbolic link" in err
    assert [r["task_id"] for r in workspace.status(_config(ws))] == ["a-real"]
    # The nightly flow's discovery (no one to print to) logs it as a warning instead.
    with caplog.at_level("WARNING", logger="cliploop"):
        assert tasks.discover(str(zone)) == [str(zone / "a-real")]
    assert any("b-linked: skipped: a symbolic link" in r.getMessage() for r in caplog.records)
