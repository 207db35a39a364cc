"""Promotion-gate rules (``components/registry/gate.py``, ``gate:`` in docs/configuration.md) on hand-made metrics.

Every rule is pinned at its threshold (inclusive: "at most" / "at least"), a quarter point inside and a quarter
point outside (quarters are exact in binary floating point, so no rounding decides a boundary), and with its
measurement missing. Expected verdicts come from the rules' wording in ``GateConfig``, not from the gate's output.
"""

from __future__ import annotations

import pytest

from components.registry.gate import Check, evaluate_gate
from components.settings.config import GateConfig

METRICS = {"cl.forgetting": 6.0, "zs.retention_rel": 0.97, "cl.last": 71.0}
ROW = {"t1": 70.0, "t2": 80.0, "t3": 60.0}


def _only(verdict, rule: str) -> Check:
    """The one check of a verdict that applied a single rule."""
    assert [c.rule for c in verdict.checks] == [rule]
    return verdict.checks[0]


def test_no_rules_passes():
    verdict = evaluate_gate(GateConfig(), METRICS, ROW, "t3", champion_row={"t1": 99.0})
    assert verdict.passed and verdict.verdict == "pass" and verdict.reasons == [] and verdict.checks == []
    assert "(no rules configured)" in verdict.markdown()


# (rule, metrics, final row) for a measured value v, against a threshold of 5 (0.5 for the retention ratio).
def _max_forgetting(v):
    return {"cl.forgetting": v}, ROW


def _min_retention(v):
    return {"zs.retention_rel": v}, ROW


def _min_new_task(v):
    return {}, {"t1": 0.0, "t3": v}


def _min_last(v):
    return {"cl.last": v}, ROW


BOUNDARIES = [
    # rule, threshold, how to build the inputs, values that pass, values that fail
    ("max_forgetting", 5.0, _max_forgetting, [0.0, 4.75, 5.0], [5.25, 40.0]),
    ("min_zero_shot_retention", 0.5, _min_retention, [0.5, 0.75, 1.25], [0.25, 0.0]),
    ("min_new_task_accuracy", 5.0, _min_new_task, [5.0, 5.25, 100.0], [4.75, 0.0]),
    ("min_last_accuracy", 5.0, _min_last, [5.0, 5.25, 100.0], [4.75, 0.0]),
]


@pytest.mark.parametrize("rule, threshold, inputs, passing, failing", BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_rule_is_inclusive_at_its_threshold(rule, threshold, inputs, passing, failing):
    cfg = GateConfig(**{rule: threshold})
    for value in passing:
        metrics, row = inputs(value)
        verdict = evaluate_gate(cfg, metrics, row, "t3")
        check = _only(verdict, rule)
        assert verdict.verdict == "pass" and verdict.reasons == [], (rule, value)
        assert (check.passed, check.value, check.threshold) == (True, value, threshold), (rule, value)
    for value in failing:
        metrics, row = inputs(value)
        verdict = evaluate_gate(cfg, metrics, row, "t3")
        check = _only(verdict, rule)
        assert verdict.verdict == "fail" and not verdict.passed, (rule, value)
        assert (check.passed, check.value) == (False, value), (rule, value)
        assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(f"{rule}: "), verdict.reasons


def test_drop_vs_champion_is_inclusive_for_every_task():
    """The champion's tasks each get a rule; a drop of exactly the threshold passes, a quarter point more fails."""
    cfg = GateConfig(max_drop_vs_champion=3)
    champion = {"t2": 81.0, "t1": 74.5}  # checked in task order, whatever order the registry returned
    # t1: 74.5 - 71.5 = 3 (at the threshold); t2: 81 - 78.25 = 2.75 (inside); a gain is no drop.
    at = evaluate_gate(cfg, {}, {"t1": 71.5, "t2": 78.25, "t3": 60.0}, "t3", champion)
    assert at.passed and [(c.rule, c.passed, c.value) for c in at.checks] == [
        ("max_drop_vs_champion[t1]", True, 3.0),
        ("max_drop_vs_champion[t2]", True, 2.75),
    ]
    gain = evaluate_gate(cfg, {}, {"t1": 90.0, "t2": 81.0}, "t2", champion)
    assert gain.passed and [c.value for c in gain.checks] == [-15.5, 0.0]
    # t2 alone goes a quarter point past the threshold: 81 - 77.75 = 3.25.
    over = evaluate_gate(cfg, {}, {"t1": 71.5, "t2": 77.75}, "t3", champion)
    assert [(c.rule, c.passed) for c in over.checks] == [
        ("max_drop_vs_champion[t1]", True),
        ("max_drop_vs_champion[t2]", False),
    ]
    assert over.reasons == ["max_drop_vs_champion[t2]: t2: champion 81.00%, challenger 77.75% (3.25 vs 3)"]


def test_a_champion_task_the_challenger_did_not_measure_fails_not_measured():
    """Absent from the challenger's row or null in it: the gate cannot vouch for it, so it fails (on_missing fail)."""
    cfg = GateConfig(max_drop_vs_champion=3)
    champion = {"t1": 70.0, "t2": 80.0}
    for row in ({"t1": 70.0, "t3": 90.0}, {"t1": 70.0, "t2": None, "t3": 90.0}):
        verdict = evaluate_gate(cfg, {}, row, "t3", champion)
        assert verdict.verdict == "fail", row
        assert [(c.rule, c.passed, c.value) for c in verdict.checks] == [
            ("max_drop_vs_champion[t1]", True, 0.0),
            ("max_drop_vs_champion[t2]", False, None),
        ]
        assert verdict.reasons == [
            "max_drop_vs_champion[t2]: t2: champion 80.00%, challenger -%: not measured (not measured vs 3)"
        ]
    skipped = evaluate_gate(cfg.model_copy(update={"on_missing": "skip"}), {}, {"t1": 70.0}, "t3", champion)
    assert skipped.passed and [c.passed for c in skipped.checks] == [True, None]


def test_a_task_the_champion_did_not_measure_is_not_compared_and_later_tasks_still_are():
    cfg = GateConfig(max_drop_vs_champion=3)
    # "a0" sorts first: a champion task without a value must not end the comparison of the tasks after it.
    verdict = evaluate_gate(cfg, {}, {"a0": 10.0, "t1": 60.0}, "t1", {"a0": None, "t1": 70.0})
    assert [(c.rule, c.passed, c.value) for c in verdict.checks] == [("max_drop_vs_champion[t1]", False, 10.0)]
    assert verdict.reasons == ["max_drop_vs_champion[t1]: t1: champion 70.00%, challenger 60.00% (10 vs 3)"]
    for champion in (None, {}):  # the first version of a chain has no champion to compare with
        assert evaluate_gate(cfg, {}, {"t1": 0.0}, "t1", champion).checks == []


@pytest.mark.parametrize(
    "rule, threshold, metrics, row",
    [
        ("max_forgetting", 5.0, {"cl.forgetting": None}, ROW),
        ("min_zero_shot_retention", 0.5, {"zs.retention_rel": None}, ROW),
        ("min_zero_shot_retention", 0.5, {}, ROW),
        ("min_new_task_accuracy", 5.0, {}, {"t1": 50.0, "t3": None}),
        ("min_new_task_accuracy", 5.0, {}, {"t1": 50.0, "t2": 50.0}),
        ("min_last_accuracy", 5.0, {"cl.last": None}, ROW),
    ],
)
def test_a_rule_whose_value_is_missing_fails_unless_on_missing_skip(rule, threshold, metrics, row):
    failed = evaluate_gate(GateConfig(**{rule: threshold}), metrics, row, "t3")
    check = _only(failed, rule)
    assert failed.verdict == "fail" and (check.passed, check.value, check.threshold) == (False, None, threshold)
    assert check.detail.endswith(": not measured")
    assert len(failed.reasons) == 1 and failed.reasons[0].endswith(f": not measured (not measured vs {threshold:g})")
    assert failed.reasons[0].startswith(f"{rule}: ")
    skipped = evaluate_gate(GateConfig(**{rule: threshold, "on_missing": "skip"}), metrics, row, "t3")
    assert skipped.verdict == "pass" and skipped.reasons == [] and _only(skipped, rule).passed is None


def test_forgetting_on_the_first_task_is_skipped_but_a_missing_value_later_fails():
    cfg = GateConfig(max_forgetting=5)
    first = evaluate_gate(cfg, {"cl.forgetting": None}, {"t1": 50.0}, "t1")
    check = _only(first, "max_forgetting")
    assert first.passed and check.passed is None and check.detail == "first task: no earlier task to forget"
    # Two tasks learned: forgetting is defined, so a missing value is "not measured", not "first task".
    second = evaluate_gate(cfg, {"cl.forgetting": None}, {"t1": 50.0, "t2": 50.0}, "t2")
    assert not second.passed and _only(second, "max_forgetting").detail.endswith("not measured")
    # A value given with a one-task row is still judged (a row may list only the tasks evaluated).
    judged = evaluate_gate(cfg, {"cl.forgetting": 10.0}, {"t1": 50.0}, "t1")
    assert not judged.passed and _only(judged, "max_forgetting").value == 10.0
    assert evaluate_gate(GateConfig(), {"cl.forgetting": None}, {"t1": 50.0}, "t1").checks == []


def test_each_rule_fails_with_a_reason_naming_rule_value_and_threshold():
    cfg = GateConfig(
        max_forgetting=5,
        min_zero_shot_retention=0.98,
        min_new_task_accuracy=65,
        min_last_accuracy=72,
        max_drop_vs_champion=3,
    )
    verdict = evaluate_gate(cfg, METRICS, ROW, "t3", champion_row={"t1": 74.0, "t2": 81.0})
    assert verdict.verdict == "fail"
    assert [(c.rule, c.passed) for c in verdict.checks] == [
        ("max_forgetting", False),
        ("min_zero_shot_retention", False),
        ("min_new_task_accuracy", False),
        ("min_last_accuracy", False),
        ("max_drop_vs_champion[t1]", False),
        ("max_drop_vs_champion[t2]", True),
    ]
    assert verdict.reasons == [
        "max_forgetting: cl.forgetting must be at most the threshold (6 vs 5)",
        "min_zero_shot_retention: zs.retention_rel must be at least the threshold (0.97 vs 0.98)",
        "min_new_task_accuracy: accuracy on the new task t3 must be at least the threshold (60 vs 65)",
        "min_last_accuracy: cl.last must be at least the threshold (71 vs 72)",
        "max_drop_vs_champion[t1]: t1: champion 74.00%, challenger 70.00% (4 vs 3)",
    ]
    assert verdict.to_dict()["verdict"] == "fail" and verdict.to_dict()["reasons"] == verdict.reasons
    assert verdict.to_dict()["checks"][0] == {
        "rule": "max_forgetting",
        "passed": False,
        "value": 6.0,
        "threshold": 5,
        "detail": "cl.forgetting must be at most the threshold",
    }


def test_the_markdown_shows_each_rule_its_value_threshold_and_result():
    cfg = GateConfig(max_forgetting=5, min_last_accuracy=70, min_zero_shot_retention=0.5, on_missing="skip")
    verdict = evaluate_gate(cfg, {"cl.forgetting": 6.0, "cl.last": 71.0}, ROW, "t3")
    lines = verdict.markdown("Promotion gate, version 7").splitlines()
    assert lines[0] == "# Promotion gate, version 7: **FAIL**"
    assert "| max_forgetting | 6 | 5 | **fail** |" in lines
    assert "| min_zero_shot_retention | not measured | 0.5 | skipped |" in lines
    assert "| min_last_accuracy | 71 | 70 | pass |" in lines
    assert lines[-2:] == ["Reasons:", "- max_forgetting: cl.forgetting must be at most the threshold (6 vs 5)"]
    passed = evaluate_gate(GateConfig(min_last_accuracy=70), METRICS, ROW, "t3").markdown()
    assert passed.startswith("# Promotion gate: **PASS**") and "Reasons:" not in passed
