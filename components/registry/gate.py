"""The promotion gate: rules from ``gate:`` in the config, applied to a challenger's metrics.

A verdict is ``pass`` or ``fail`` with one reason per failed rule, each naming the rule, the measured
value and the threshold, so a reviewer can read why without opening a notebook. A rule left ``null``
is not applied; a rule whose metric could not be measured fails the gate unless ``on_missing: skip``.
A verdict no rule judged (none configured, or none that applies, as for the first version of a chain) passes,
since nothing stops it, but says that nothing was checked (``Verdict.checked``), never just PASS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from components.settings.config import GateConfig

RULES = [name for name in GateConfig.model_fields if name != "on_missing"]  # every rule a config can set


@dataclass
class Check:
    rule: str
    passed: bool | None  # None: skipped (not measured and on_missing is skip)
    value: float | None
    threshold: float
    detail: str


@dataclass
class Verdict:
    verdict: str  # "pass" | "fail"
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)  # the rules set in the config
    not_applied: dict[str, str] = field(default_factory=dict)  # a configured rule that made no check: why

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def checked(self) -> bool:
        """Some rule judged the version. A pass with nothing checked is no evidence: the version page and the
        night's summary say so instead of PASS."""
        return any(c.passed is not None for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
            "configured": self.configured,
            "not_applied": self.not_applied,
            "checked": self.checked,
        }

    def markdown(self, title: str = "Promotion gate") -> str:
        headline = self.verdict.upper() if self.checked or not self.passed else "PASS, NOTHING CHECKED"
        lines = [
            f"# {title}: **{headline}**",
            "",
            "| rule | value | threshold | result |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            result = "skipped" if c.passed is None else ("pass" if c.passed else "**fail**")
            value = "not measured" if c.value is None else f"{c.value:.4g}"
            lines.append(f"| {c.rule} | {value} | {c.threshold:g} | {result} |")
        if not self.configured:
            lines.append("| (no rules configured) | | | nothing checked |")
        lines += [f"| {rule} | | | not applied: {why} |" for rule, why in self.not_applied.items()]
        if self.reasons:
            lines += ["", "Reasons:", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines)


def evaluate_gate(
    cfg: GateConfig,
    metrics: dict[str, float | None],
    final_row: dict[str, float | None],
    new_task: str,
    champion_row: dict[str, float | None] | None = None,
) -> Verdict:
    """Apply the rules. ``final_row``/``champion_row``: accuracy per task id after the last step."""
    checks: list[Check] = []

    def rule(name: str, value: float | None, threshold: float | None, ok, detail: str) -> None:
        if threshold is None:
            return
        if value is None:
            passed = None if cfg.on_missing == "skip" else False
            checks.append(Check(name, passed, None, threshold, f"{detail}: not measured"))
        else:
            checks.append(Check(name, bool(ok(value, threshold)), value, threshold, detail))

    if len(final_row) > 1 or metrics.get("cl.forgetting") is not None:
        rule(
            "max_forgetting",
            metrics.get("cl.forgetting"),
            cfg.max_forgetting,
            lambda v, t: v <= t,
            "cl.forgetting must be at most the threshold",
        )
    elif cfg.max_forgetting is not None:  # the first task of a chain: nothing learned before it to forget
        checks.append(Check("max_forgetting", None, None, cfg.max_forgetting, "first task: no earlier task to forget"))
    rule(
        "min_zero_shot_retention",
        metrics.get("zs.retention_rel"),
        cfg.min_zero_shot_retention,
        lambda v, t: v >= t,
        "zs.retention_rel must be at least the threshold",
    )
    rule(
        "min_new_task_accuracy",
        final_row.get(new_task),
        cfg.min_new_task_accuracy,
        lambda v, t: v >= t,
        f"accuracy on the new task {new_task} must be at least the threshold",
    )
    rule(
        "min_last_accuracy",
        metrics.get("cl.last"),
        cfg.min_last_accuracy,
        lambda v, t: v >= t,
        "cl.last must be at least the threshold",
    )
    configured = [name for name in RULES if getattr(cfg, name) is not None]
    not_applied = {}
    if cfg.max_drop_vs_champion is not None and not any(v is not None for v in (champion_row or {}).values()):
        not_applied["max_drop_vs_champion"] = "no champion to compare with"
    if cfg.max_drop_vs_champion is not None and champion_row:
        for task_id, before in sorted(champion_row.items()):
            if before is None:
                continue
            after = final_row.get(task_id)
            drop = None if after is None else before - after
            rule(
                f"max_drop_vs_champion[{task_id}]",
                drop,
                cfg.max_drop_vs_champion,
                lambda v, t: v <= t,
                f"{task_id}: champion {before:.2f}%, challenger {'-' if after is None else f'{after:.2f}'}%",
            )
    reasons = [
        f"{c.rule}: {c.detail} ({'not measured' if c.value is None else f'{c.value:.4g}'} vs {c.threshold:g})"
        for c in checks
        if c.passed is False
    ]
    return Verdict("fail" if reasons else "pass", reasons, checks, configured, not_applied)
