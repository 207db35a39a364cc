"""What the flow tests share (``tests/test_flows.py``, ``tests/test_flows_review.py``): the test's config, a drop,
the ledger's states and the registry's versions."""

from __future__ import annotations

from components.intake.ledger import Ledger
from tests.conftest import pipeline_config
from tests.drops import make_task


def flow_cfg(tmp_path, ckpt, *extra):
    return pipeline_config(tmp_path, ckpt, *extra)


def flow_drop(tmp_path, task_id, classes, **kw):
    return make_task(tmp_path / "incoming", task_id, classes, train=3, test=2, **kw)


def flow_states(cfg) -> dict[str, str]:
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        return {r.task_id: r.state for r in ledger.all()}


def flow_versions(registry) -> list[int]:
    return sorted(int(v.version) for v in registry.client.search_model_versions(f"name = '{registry.model_name}'"))
