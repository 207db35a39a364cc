"""Promotion-gate rules on hand-made metrics."""

from __future__ import annotations

from components.registry.gate import evaluate_gate
from components.settings.config import GateConfig

METRICS = {"cl.forgetting": 6.0, "zs.retention_rel": 0.97, "cl.last": 71.0}
ROW = {"t1": 70.0, "t2": 80.0, "t3": 60.0}


def test_no_rules_passes():
    verdict = evaluate_gate(GateConfig(), METRICS, ROW, "t3")
    assert verdict.passed and verdict.reasons == [] and verdict.checks == []


def test_each_rule_fails_with_a_reason_naming_value_and_threshold():
    cfg = GateConfig(
        max_forgetting=5,
        min_zero_shot_retention=0.98,
        min_new_task_accuracy=65,
        min_last_accuracy=70,
        max_drop_vs_champion=3,
    )
    verdict = evaluate_gate(cfg, METRICS, ROW, "t3", champion_row={"t1": 74.0, "t2": 81.0})
    assert verdict.verdict == "fail"
    failed = {c.rule for c in verdict.checks if c.passed is False}
    assert failed == {"max_forgetting", "min_zero_shot_retention", "min_new_task_accuracy", "max_drop_vs_champion[t1]"}
    assert any("cl.forgetting" in r and "6 vs 5" in r for r in verdict.reasons)
    assert any(r.startswith("max_drop_vs_champion[t1]") and "champion 74.00%" in r for r in verdict.reasons)
    assert "**FAIL**" in verdict.markdown() and "min_last_accuracy" in verdict.markdown()


def test_thresholds_are_inclusive_and_missing_metrics_follow_the_policy():
    cfg = GateConfig(max_forgetting=6, min_zero_shot_retention=0.97)
    assert evaluate_gate(cfg, METRICS, ROW, "t3").passed
    unmeasured = {"cl.forgetting": 6.0, "zs.retention_rel": None}
    assert not evaluate_gate(cfg, unmeasured, ROW, "t3").passed  # no held-out set: cannot vouch for retention
    skipped = evaluate_gate(cfg.model_copy(update={"on_missing": "skip"}), unmeasured, ROW, "t3")
    assert skipped.passed and [c.passed for c in skipped.checks] == [True, None]
