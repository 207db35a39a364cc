"""The gate's verdict as it is recorded (components/registry/gate.py): the dict the update flow reads
(``verdict["checked"]`` becomes the night's ``gate_checked``), the note on a configured rule that had nothing
to compare with, and the Markdown page a reviewer reads in MLflow, which must render as one table
(docs/contracts.md, "MLflow": the page says ``nothing checked``, not PASS, when no rule judged the version).
Expected values come from those documents, not from the gate's output."""

from __future__ import annotations

from components.registry.gate import evaluate_gate
from components.settings.config import GateConfig

ROW = {"t1": 70.0, "t2": 80.0}


def test_the_recorded_dict_says_whether_any_rule_judged_the_version():
    judged = evaluate_gate(GateConfig(min_last_accuracy=50), {"cl.last": 75.0}, ROW, "t2").to_dict()
    unjudged = evaluate_gate(GateConfig(), {"cl.last": 75.0}, ROW, "t2").to_dict()
    skipped = evaluate_gate(GateConfig(min_last_accuracy=50, on_missing="skip"), {}, ROW, "t2").to_dict()
    assert (judged["checked"], unjudged["checked"], skipped["checked"]) == (True, False, False)
    assert set(judged) == {"verdict", "reasons", "checks", "configured", "not_applied", "checked"}


def test_a_drop_rule_without_a_measured_champion_says_so_and_only_then():
    cfg = GateConfig(max_drop_vs_champion=2)
    measured = evaluate_gate(cfg, {}, ROW, "t2", champion_row={"t1": 71.0})
    assert measured.not_applied == {}
    assert [c.rule for c in measured.checks] == ["max_drop_vs_champion[t1]"]
    for champion in (None, {}, {"t1": None}):
        verdict = evaluate_gate(cfg, {}, ROW, "t2", champion_row=champion)
        assert verdict.not_applied == {"max_drop_vs_champion": "no champion to compare with"}, champion
    # No drop rule configured: nothing to say about a missing champion.
    assert evaluate_gate(GateConfig(min_last_accuracy=1), {"cl.last": 5.0}, ROW, "t2").not_applied == {}


def test_the_page_is_a_title_then_one_markdown_table_then_the_reasons():
    cfg = GateConfig(min_last_accuracy=80)
    lines = evaluate_gate(cfg, {"cl.last": 75.0}, ROW, "t2").markdown("Promotion gate, version 3").splitlines()
    assert lines == [
        "# Promotion gate, version 3: **FAIL**",
        "",  # a table right under a heading line is not a table in every renderer
        "| rule | value | threshold | result |",
        "|---|---|---|---|",
        "| min_last_accuracy | 75 | 80 | **fail** |",
        "",  # without it the reasons would be read as rows of the table
        "Reasons:",
        "- min_last_accuracy: cl.last must be at least the threshold (75 vs 80)",
    ]


def test_the_page_of_a_gate_with_no_rules_says_nothing_was_checked():
    lines = evaluate_gate(GateConfig(), {}, ROW, "t2").markdown().splitlines()
    assert lines == [
        "# Promotion gate: **PASS, NOTHING CHECKED**",
        "",
        "| rule | value | threshold | result |",
        "|---|---|---|---|",
        "| (no rules configured) | | | nothing checked |",
    ]
