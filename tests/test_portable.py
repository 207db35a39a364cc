"""Keys without places: no run key, cache key or MLflow tag holds a workspace path, so a workspace moved to
another folder (or an orchestrator restarted on another machine) reuses every step it had completed."""

from __future__ import annotations

import json
import shutil

from components import chain, steps
from components.lineage import build_lineage
from components.registry import from_config
from tests.conftest import pipeline_config
from tests.drops import make_task


def _registry_outside(tmp_path) -> list[str]:
    """The registry lives outside the workspace, as an MLflow server does on a cluster."""
    root = tmp_path / "registry"
    root.mkdir(exist_ok=True)
    return [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"mlflow.artifact_root={(root / 'art').as_uri()}"]


def test_a_moved_workspace_reuses_every_completed_step(tmp_path, tiny_checkpoint):
    first = pipeline_config(tmp_path / "one", tiny_checkpoint, *_registry_outside(tmp_path))
    make_task(tmp_path / "one" / "incoming", "t-a", ["cat", "dog"], train=3, test=2)
    make_task(tmp_path / "one" / "incoming", "t-b", ["emu", "owl"], train=3, test=2)
    for location in steps.discover(first):
        steps.ingest(location, first)
    chain.start_learning(first, "t-a")
    pools = {t: steps.build_pool(first, t)["pool_dir"] for t in ("t-a", "t-b")}
    update = steps.run_update(first, "t-a", None, {"t-a": pools["t-a"]})
    assert update["cached"] is False
    before = {t: steps.pool_dir(first, t).name for t in pools} | {"run": steps.update_dir(first, "t-a", None).name}

    # The orchestrator's folder moves; its config names the new place and nothing else changes.
    (tmp_path / "two").mkdir()
    shutil.move(tmp_path / "one" / "ws", tmp_path / "two" / "ws")
    moved = pipeline_config(tmp_path / "two", tiny_checkpoint, *_registry_outside(tmp_path))
    assert moved.sha256() == first.sha256()
    after = {t: steps.pool_dir(moved, t).name for t in pools} | {"run": steps.update_dir(moved, "t-a", None).name}
    assert after == before

    rebuilt = {t: steps.build_pool(moved, t) for t in ("t-a", "t-b")}
    assert all(r["cached"] for r in rebuilt.values())
    assert all(r["pool_dir"].startswith(str(tmp_path / "two")) for r in rebuilt.values())
    again = steps.run_update(moved, "t-a", None, {"t-a": rebuilt["t-a"]["pool_dir"]})
    assert again["cached"] is True and again["out_dir"].startswith(str(tmp_path / "two"))
    version = steps.register_update(moved, again)["version"]

    registry = from_config(moved)
    run = registry.client.get_run(registry.model_version(version).run_id)
    texts = [json.dumps(run.data.tags), json.dumps(registry.version_tags(version))]
    texts += [json.dumps([t.key + "=" + t.value for t in i.tags]) for i in run.inputs.dataset_inputs]
    texts += [i.dataset.source for i in run.inputs.dataset_inputs]
    for text in texts:
        assert str(tmp_path / "one") not in text and str(tmp_path / "two") not in text, text
    record = build_lineage(registry, version, moved.workspace_path, verify=True)
    assert record["verified"] is True
