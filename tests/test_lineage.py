"""Lineage through parent versions on real parts: a DVC workspace with ingested tasks, MLflow on SQLite;
--verify re-hashes the task data and fails after one byte of a shard changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.intake import ingestion
from components.intake.ledger import Ledger
from components.model.state import LearnerState
from components.registry.lineage import LineageError, build_lineage, format_lineage
from components.registry.registry import Registry, run_key
from components.settings.config_loading import load_config
from tests.drops import make_task


@pytest.mark.slow  # three tasks ingested and registered
def test_chain_back_to_the_first_task_and_verification(tmp_path):
    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)
    for task_id, classes in (("t-a", ["cat", "dog"]), ("t-b", ["emu", "owl"])):
        assert ingestion.ingest(str(make_task(tmp_path / "drops", task_id, classes)), cfg).status == "accepted"
    ws = cfg.workspace_path
    registry = Registry(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "art"),
        lock_dir=tmp_path / "locks",
    )
    parent = None
    with Ledger(ws / ".cliploop" / "ledger.sqlite") as ledger:
        records = {t: ledger.get(t) for t in ("t-a", "t-b")}
    for task_id, record in records.items():
        out = tmp_path / f"out-{task_id}"
        LearnerState(method="lvp", backbone={"name": "cliploop-tiny"}).save(out / "state")
        cfg.write_resolved(out)
        run_id = registry.log_update(out, task_id, {}, {}, {}, {})
        tags = {
            "task_id": task_id,
            "parent_version": parent or "",
            "method": "lvp",
            "dvc_md5": record.dvc_md5,
            "workspace_commit": record.workspace_commit,
            "config_sha256": "c" * 64,
            "gate": "pass",
        }
        parent = registry.register(run_id, run_key(parent, task_id, record.dvc_md5, "c" * 64), tags)
    # Nobody decided on either version yet: --verify names both links and fails.
    undecided = build_lineage(registry, parent, ws, verify=True)
    assert undecided["verified"] is False
    assert undecided["problems"] == [f"version {v}: never reviewed (review unset)" for v in (2, 1)]
    assert "- (never reviewed)" in format_lineage(undecided)
    registry.promote(1, "rita", "fine")
    registry.promote(parent, "rita", "fine")

    lineage = build_lineage(registry, "champion", ws, verify=True)
    assert lineage["model"] == {"name": "cliploop", "version": 2, "aliases": ["champion"]}
    assert [link["task"]["id"] for link in lineage["chain"]] == ["t-b", "t-a"]
    assert [link["parent_version"] for link in lineage["chain"]] == [1, None]
    first = lineage["chain"][1]
    assert first["task"]["dvc_md5"] == records["t-a"].dvc_md5
    assert first["task"]["validation"]["success"] is True and first["mlflow_run_id"]
    assert lineage["chain"][0]["review"]["decision"] == "approved"
    assert lineage["verified"] is True
    assert "verified: yes" in format_lineage(lineage) and "review approved by rita" in format_lineage(lineage)
    assert build_lineage(registry, 2, ws)["verified"] is None  # not checked without --verify

    shard = next((ws / "data" / "tasks" / "t-a" / "shards").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01
    shard.write_bytes(bytes(data))
    tampered = build_lineage(registry, "champion", ws, verify=True)
    assert tampered["verified"] is False
    assert any(f"data/tasks/t-a/shards/{shard.name}: changed" in p for p in tampered["problems"])
    assert tampered["chain"][0]["task"]["verified"] is True  # t-b is intact

    with pytest.raises(LineageError, match="no model version holds alias"):
        build_lineage(registry, "challenger", ws)


def test_cli_lineage_uses_the_configured_registry(tmp_path, capsys):
    from components.registry.registry import from_config
    from flows.cli import main

    ws = tmp_path / "ws"
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=tmp_path)
    registry = from_config(cfg)
    out = tmp_path / "out"
    LearnerState(method="lvp", backbone={"name": "cliploop-tiny"}).save(out / "state")
    cfg.write_resolved(out)
    version = registry.register(registry.log_update(out, "t-x", {}, {}, {}, {}), "k", {"task_id": "t-x"})
    assert main(["lineage", "challenger", "-w", str(ws), "--json"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)
    assert record["model"]["version"] == version and record["chain"][0]["task"]["id"] == "t-x"
    # Recorded without a DVC hash: --verify cannot vouch for it and says so with a non-zero exit.
    assert main(["lineage", str(version), "-w", str(ws), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "no task id or DVC hash recorded" in out and f"version {version}: never reviewed" in out
    assert main(["lineage", "champion", "-w", str(ws)]) == 2


def test_verify_holds_the_kept_config_to_the_one_pinned_at_registration(tmp_path):
    """Issue 24, item 2: a version's lineage pins the exact configuration it ran with. Registration sets the
    SHA-256 of the ``config.resolved.yaml`` the step wrote as a version tag; ``--verify`` fails when the copy its
    run keeps (what the MLflow UI shows an auditor) is another one, naming the setting that differs. A version
    registered before the tag existed is held to its model's pinned manifest instead."""
    import hashlib
    from urllib.parse import urlparse

    import yaml

    from components.registry.model_pins import CONFIG_PIN_TAG
    from components.registry.registry_runs import TAG

    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}", "method.name=lvp"], env={}, cwd=tmp_path)
    registry = Registry(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "art"),
        lock_dir=tmp_path / "locks",
    )
    out = tmp_path / "out"
    LearnerState(method="lvp", backbone={"name": "cliploop-tiny"}).save(out / "state")
    ran_with = cfg.write_resolved(out).read_bytes()
    run_id = registry.log_update(out, "t-x", {}, {}, {}, {})
    version = registry.register(run_id, "k", {"task_id": "t-x"})

    def config_problems(record):
        return [p for p in record["problems"] if "configuration" in p]

    record = build_lineage(registry, version, cfg.workspace_path)
    assert record["chain"][0]["config_file_sha256"] == hashlib.sha256(ran_with).hexdigest()
    assert f"config {hashlib.sha256(ran_with).hexdigest()[:12]}" in format_lineage(record)
    checked = build_lineage(registry, version, cfg.workspace_path, verify=True)
    assert checked["chain"][0]["config_verified"] is True and config_problems(checked) == []

    # The copy the run keeps is rewritten in the artifact store: another method than the one it ran with.
    kept = Path(urlparse(registry.client.get_run(run_id).info.artifact_uri).path) / "config.resolved.yaml"
    assert kept.read_bytes() == ran_with
    doc = yaml.safe_load(ran_with)
    doc["method"]["name"] = "lwf"
    kept.write_text(yaml.safe_dump(doc, sort_keys=False))
    tampered = build_lineage(registry, version, cfg.workspace_path, verify=True)
    assert tampered["verified"] is False and tampered["chain"][0]["config_verified"] is False
    [line] = config_problems(tampered)
    assert line.startswith(f"version {version}: the config.resolved.yaml its run keeps")
    assert line.endswith('method.name: "lvp" -> "lwf"'), line

    # Registered before the tag existed: the model's manifest (pinned by artifacts_sha256) holds the same digest.
    registry.client.delete_model_version_tag(registry.model_name, str(version), TAG + CONFIG_PIN_TAG)
    assert build_lineage(registry, version, cfg.workspace_path)["chain"][0]["config_file_sha256"] is None
    [line] = config_problems(build_lineage(registry, version, cfg.workspace_path, verify=True))
    assert line.endswith('method.name: "lvp" -> "lwf"'), line
    kept.write_bytes(ran_with)
    assert config_problems(build_lineage(registry, version, cfg.workspace_path, verify=True)) == []
