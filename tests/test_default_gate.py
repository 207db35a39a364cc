"""The gate a new workspace starts with, and what a version's page says when no rule judged it
(``components/settings/config_file.py``, ``components/registry/gate.py``, ``components/registry/review_page.py``;
docs/configuration.md, "The default gate").

`cliploop init` used to write every gate rule as null, and the version page then said "Gate: PASS - every
configured rule passed" for a version that nothing had checked. Expected verdicts come from the rules' wording
(``GateConfig``) applied by hand to the figures measured on the demo's night (docs/configuration.md), not from
the gate's output.
"""

from __future__ import annotations

from components.registry import review_page
from components.registry.gate import evaluate_gate
from components.settings.config import GateConfig
from components.settings.config_loading import load_config
from flows.console import night_text

# The demo's LVP night (measured; docs/configuration.md, "The default gate"): accuracy per task after each version.
V1 = {"digits-0-4": 96.0}
V2 = {"digits-0-4": 89.33, "digits-5-9": 90.67}
V3 = {"digits-0-4": 84.0, "digits-5-9": 90.67, "digits-chalk": 42.0}


def _init_gate(tmp_path) -> GateConfig:
    from components.intake.workspace import config_text

    (tmp_path / "cliploop.yaml").write_text(config_text({}))  # what `cliploop init` writes (flows/commands.py)
    return load_config(env={}, cwd=tmp_path).gate


def test_init_writes_two_guards_against_forgetting_with_their_explanation(tmp_path):
    gate = _init_gate(tmp_path)
    assert (gate.max_forgetting, gate.max_drop_vs_champion) == (10.0, 10.0)
    assert (gate.min_zero_shot_retention, gate.min_new_task_accuracy, gate.min_last_accuracy) == (None, None, None)
    text = (tmp_path / "cliploop.yaml").read_text()
    note = text[: text.index("\ngate:\n")].rsplit("\n# The promotion gate", 1)[1]
    assert "max_drop_vs_champion" in note and "max_forgetting" in note and "--override-gate" in note
    assert "nothing was checked" in note
    assert GateConfig() == GateConfig(**dict.fromkeys(("max_forgetting", "max_drop_vs_champion")))  # no file: no rule


def test_the_starter_gate_passes_the_demos_chain_and_stops_plain_fine_tuning(tmp_path):
    gate = _init_gate(tmp_path)
    # v2: forgetting (96 - 89.33) / 1 = 6.67 <= 10; digits-0-4 fell 6.67 <= 10 against the champion v1.
    v2 = evaluate_gate(gate, {"cl.forgetting": 6.67}, V2, "digits-5-9", V1)
    assert (
        v2.passed
        and v2.checked
        and [c.rule for c in v2.checks]
        == [
            "max_forgetting",
            "max_drop_vs_champion[digits-0-4]",
        ]
    )
    # v3: forgetting ((96 - 84) + (90.67 - 90.67)) / 2 = 6 <= 10; against v2: 5.33 and 0 <= 10. The chalk task's
    # 42% lowers cl.last from 90 to 64.67, and no rule of the starter gate reads that as forgetting.
    v3 = evaluate_gate(gate, {"cl.forgetting": 6.0, "cl.last": 64.67}, V3, "digits-chalk", V2)
    assert v3.passed and all(c.passed for c in v3.checks) and len(v3.checks) == 3
    # Plain fine-tuning of digits 5-9 on v1 forgets 25.3 points of digits 0-4 (docs/demo.md): both guards fail.
    finetune = evaluate_gate(gate, {"cl.forgetting": 25.3}, {"digits-0-4": 70.7, "digits-5-9": 82.0}, "digits-5-9", V1)
    assert not finetune.passed
    assert [c.rule for c in finetune.checks if c.passed is False] == [
        "max_forgetting",
        "max_drop_vs_champion[digits-0-4]",
    ]


def _page(gate) -> str:
    metrics = {"cl.last": 60.0, "acc.t-a": 60.0}
    return review_page.description(
        version=1, task_id="t-a", parent_version=None, method="lvp", run_id="r1", metrics=metrics, gate=gate
    )


def test_a_version_no_rule_judged_is_not_said_to_pass(tmp_path):
    none = _page(evaluate_gate(GateConfig(), {"cl.last": 60.0}, {"t-a": 60.0}, "t-a").to_dict())
    assert "**Gate: nothing checked**" in none and "no gate rule is configured" in none
    assert "PASS" not in none and "every configured rule passed" not in none
    # The first version of a chain under the starter gate: nothing to forget, no champion to compare with.
    first = evaluate_gate(_init_gate(tmp_path), {"cl.forgetting": None}, {"t-a": 60.0}, "t-a", None)
    assert first.passed and not first.checked
    page = _page(first.to_dict())
    assert "**Gate: nothing checked**" in page and "PASS" not in page
    assert "`max_forgetting` (first task: no earlier task to forget)" in page
    assert "`max_drop_vs_champion` (no champion to compare with)" in page
    assert first.markdown().startswith("# Promotion gate: **PASS, NOTHING CHECKED**")
    # A rule that judged it: PASS, with the rule, its value and threshold.
    judged = evaluate_gate(GateConfig(max_forgetting=10), {"cl.forgetting": 6.0}, {"t-a": 60.0, "t-b": 1.0}, "t-b")
    page = _page(judged.to_dict())
    assert "**Gate: PASS**" in page and "  - `max_forgetting`: 6 (threshold 10)" in page


def test_the_nights_summary_says_unchecked_instead_of_pass():
    row = {"task_id": "t-a", "version": 1, "gate": "pass", "outcome": "awaiting-review", "metrics": {"cl.last": 60.0}}
    summary = {"reconciled": [], "ingested": [], "updates": [row | {"gate_checked": False}], "stopped": None}
    assert _row(night_text(summary)) == ["t-a", "1", "unchecked", "awaiting-review"]
    summary["updates"] = [row | {"gate_checked": True}]
    assert _row(night_text(summary)) == ["t-a", "1", "pass", "awaiting-review"]


def _row(text: str) -> list[str]:
    """The first four columns of the summary table's row of task t-a."""
    return next(line.split()[:4] for line in text.splitlines() if line.startswith("t-a "))
