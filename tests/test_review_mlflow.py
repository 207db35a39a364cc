"""A reviewer decides in MLflow: the ``champion`` alias moved to a waiting version, or its ``cliploop.review``
tag set, is recorded like ``cliploop approve|reject``; an alias moved by hand when nobody waited is recorded as
``review=manual-alias``; auto-promotion says ``review=auto``. Real MLflow on SQLite. The night that waits for
a decision taken in MLflow is in ``tests/test_flows.py`` (it needs the Prefect API that module starts).
"""

from __future__ import annotations

import shutil

import pytest

from components.pipeline import review
from components.registry.lineage import build_lineage
from components.registry.registry import from_config
from components.settings.config_loading import load_config
from tests.conftest import _empty_mlflow_store
from tests.test_registry import _register


@pytest.fixture
def workspace(tmp_path):
    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)
    (cfg.workspace_path / ".cliploop").mkdir(parents=True)
    shutil.copyfile(_empty_mlflow_store(), cfg.workspace_path / ".cliploop" / "mlflow.db")
    return cfg, from_config(cfg)


def _mlflow_tags(registry, version: int, **tags: str) -> None:
    """Tags set as a reviewer does in the MLflow UI (the review last)."""
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.model_name, str(version), f"cliploop.{key}", value)


def test_approving_a_champion_moved_by_hand_records_the_reviewer(workspace, tmp_path):
    cfg, registry = workspace
    _, _, v1 = _register(registry, tmp_path, "t1")
    review.decide(cfg, v1, "approve", "rita")
    _, _, v2 = _register(registry, tmp_path, "t2", parent=v1)
    registry.client.set_registered_model_alias(registry.model_name, "champion", str(v2))  # as the MLflow UI does

    result = review.decide(cfg, v2, "approve", "sam", "checked in MLflow")
    tags = registry.version_tags(v2)
    assert result["changed"] is True and result["previous"] == v1
    assert (tags["review"], tags["reviewer"], tags["review_note"]) == ("approved", "sam", "checked in MLflow")
    assert tags["review_at"] and registry.alias("previous-champion") == v1 and registry.alias("challenger") is None
    # A repeat changes nothing: the first reviewer's record stays.
    assert review.decide(cfg, v2, "approve", "tom")["changed"] is False
    assert registry.version_tags(v2)["reviewer"] == "sam"

    # Promotion by rule (approval.auto_promote) says so.
    _, _, v3 = _register(registry, tmp_path, "t3", parent=v2)
    review.decide(cfg, v3, "approve", review.REVIEWER_AUTO, "gate passed")
    tags = registry.version_tags(v3)
    assert (tags["review"], tags["reviewer"]) == ("auto", review.REVIEWER_AUTO) and registry.alias("champion") == v3
    assert review.review_outcome(cfg, v3) == "promoted" and review.record_manual_alias(cfg) == []


def test_decisions_read_from_mlflow_and_an_alias_moved_without_review(workspace, tmp_path):
    cfg, registry = workspace
    _, _, v1 = _register(registry, tmp_path, "t1")
    assert review.registry_decision(cfg, v1) is None
    review.review_requested(cfg, v1)
    assert review.review_timed_out(cfg, v1)  # nobody answered: it stays challenger

    # The champion alias moved by hand while no run waited: recorded once, as such.
    registry.client.set_registered_model_alias(registry.model_name, "champion", str(v1))
    assert review.registry_decision(cfg, v1)["decision"] == "approve"
    assert review.record_manual_alias(cfg) == [
        f"v{v1}: champion without a review (alias moved by hand): review=manual-alias"
    ]
    tags = registry.version_tags(v1)
    assert (tags["review"], tags["reviewer"]) == ("manual-alias", "unknown") and tags["review_at"]
    assert "review was timed-out" in tags["review_note"] and review.record_manual_alias(cfg) == []
    assert build_lineage(registry, "champion", cfg.workspace_path)["chain"][0]["review"]["decided"] is True

    # A pending version may have a run waiting for it (which records the move as an approval): a night,
    # which holds the chain lock, records it.
    _, _, v2 = _register(registry, tmp_path, "t2", parent=v1)
    review.review_requested(cfg, v2)
    registry.client.set_registered_model_alias(registry.model_name, "champion", str(v2))
    assert review.record_manual_alias(cfg) == [] and registry.version_tags(v2)["review"] == "pending"
    assert review.record_manual_alias(cfg, waiting=False) and registry.version_tags(v2)["review"] == "manual-alias"

    # A reject tagged in MLflow is read as the reviewer's answer and applied like `cliploop reject`.
    _, _, v3 = _register(registry, tmp_path, "t3", parent=v2)
    _mlflow_tags(registry, v3, reviewer="sam", review_note="forgets cats", review="rejected")
    answer = review.registry_decision(cfg, v3)
    assert answer == {"decision": "reject", "reviewer": "sam", "note": "forgets cats"}
    assert review.decide(cfg, v3, **answer)["changed"] is True
    assert registry.version_tags(v3)["review_at"] and registry.alias("challenger") is None
    assert review.decide(cfg, v3, **answer)["changed"] is False  # recorded: a repeat is a no-op

    # Rejected by hand in MLflow while no run waited: the next night records it (alias, review_at).
    _, _, v4 = _register(registry, tmp_path, "t4", parent=v2)
    _mlflow_tags(registry, v4, review="rejected")
    assert review.record_registry_changes(cfg) == [f"v{v4}: rejected in MLflow by unknown: recorded"]
    assert registry.version_tags(v4)["review_at"] and registry.alias("challenger") is None
    assert review.record_registry_changes(cfg) == []
