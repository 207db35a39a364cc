"""The validation report: the rule catalogue (id and meaning of every check), the per-rule results with
their failing rows, and the report's JSON and console summary.

Kept apart from the checks (:mod:`components.intake.validation`) because it is a contract read elsewhere: ingestion
writes it as ``report.json`` beside each task, the command line prints its summary, and a drop whose metadata
cannot be read at all gets a report without any check being run (:func:`report_for_drop_error`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.intake import report_page
from components.intake.tasks import DropError
from components.support import storage

RULES: dict[str, str] = {
    "task-yaml": "task.yaml is present and follows the schema",
    "manifest-readable": "manifest.csv is present and readable CSV",
    "columns": "manifest.csv has exactly the columns path,label,split[,domain]",
    "required-values": "path, label and split are filled in on every row",
    "split-value": "split is 'train' or 'test'",
    "split-nonempty": "both the train and the test split have rows",
    "label-declared": "every label is a class declared in task.yaml",
    "duplicate-rows": "each image path is listed once",
    "path-safe": "paths stay inside the task root (no '..', absolute paths or symbolic links)",
    "image-readable": "every listed image exists and decodes completely to one still picture",
    "image-format": "images are JPEG, PNG or WebP (by their content, not their name)",
    "pixel-limit": "images are within the pixel limit (decompression-bomb guard)",
    "image-min-side": "images are at least the minimum width and height",
    "train-test-leak": "no image content is in both train and test",
    "seen-before": "no image content was already ingested by an earlier task",
    "class-has-train": "every declared class has training images",
    "scenario-classes": "classes are consistent with the scenario (new for class-incremental, "
    "the known set for domain-incremental)",
    "label-doubt": "the model does not contradict more training labels with high confidence than "
    "validation.label_doubt_max_share allows (a warning unless validation.label_doubt is quarantine)",
}


# A rule keeps the messages of its first failing rows and counts the rest: the report shows no more than these
# anyway, and keeping a message for every row of a million-row manifest would cost memory for nothing.
MAX_ROWS_PER_RULE = 200
MAX_LISTED = 10  # items one message names before "and N more"


def listing(items: list[str], total: int | None = None, limit: int = MAX_LISTED, sep: str = ", ") -> str:
    """``a, b, c and 1,234 more``: the first ``limit`` of ``items`` (``total`` of them in all, when only the
    first few were collected), so that no message grows with the manifest."""
    total = len(items) if total is None else total
    shown = sep.join(items[:limit])
    more = total - min(len(items), limit)
    return f"{shown} and {more:,} more" if more > 0 else shown


@dataclass
class Failure:
    message: str
    line: int | None = None
    path: str | None = None


@dataclass
class RuleResult:
    rule: str
    success: bool
    description: str
    failures: list[Failure] = field(default_factory=list)
    skipped: str | None = None
    warning: str | None = None  # a check that only warns (label-doubt by default) and found something
    unlisted: int = 0  # failures counted beyond the first MAX_ROWS_PER_RULE kept in ``failures``

    @property
    def count(self) -> int:
        return len(self.failures) + self.unlisted

    def add(self, failure: Failure) -> None:
        self.success = False
        if len(self.failures) < MAX_ROWS_PER_RULE:
            self.failures.append(failure)
        else:
            self.unlisted += 1

    def add_unlisted(self, n: int) -> None:
        """Count ``n`` failures whose rows were not listed (Great Expectations returns only the first ones)."""
        if n > 0:
            self.success = False
            self.unlisted += n


@dataclass
class Report:
    task_id: str
    source: str
    success: bool
    checked_at: str
    content_digest: str | None
    rules: list[RuleResult]
    stats: dict[str, Any] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    data_docs: str | None = None
    label_doubt: dict[str, Any] | None = None  # components.intake.label_doubt.LabelDoubts, as a dict

    MAX_ROWS_PER_RULE = MAX_ROWS_PER_RULE

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for rule in out["rules"]:
            rule["count"] = len(rule["failures"]) + rule.pop("unlisted")
            rule["failures"] = rule["failures"][: self.MAX_ROWS_PER_RULE]
        return out

    def save(self, path: Path) -> Path:
        """``report.json`` at ``path``, and beside it ``report.html``: the same report as a page that renders
        offline (:mod:`components.intake.report_page`)."""
        doc = self.to_dict()
        storage.atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        report_page.write_page(doc, path.with_name(report_page.PAGE_NAME))
        return path

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]

    def summary(self, max_rows: int = 5) -> str:
        warned = [f"  ! [{r.rule}] {r.warning}" for r in self.rules if r.warning]
        if self.success:
            return "\n".join([f"task {self.task_id}: valid ({len(self.rules)} rules passed)", *warned])
        lines = [f"task {self.task_id}: INVALID ({len(self.failed_rules)} rule(s) failed)", *warned]
        for rule in self.failed_rules:
            lines.append(f"  ✗ [{rule.rule}] {rule.description}: {rule.count} problem(s)")
            for failure in rule.failures[:max_rows]:
                lines.append(f"      {failure.message}")
            if rule.count > max_rows:
                lines.append(f"      … and {rule.count - max_rows:,} more (see the report)")
        return "\n".join(lines)


def report_for_drop_error(task_id: str, source: str, error: DropError, checked_at: str) -> Report:
    rule = error.rule if error.rule in RULES else ("task-yaml" if "yaml" in error.rule else "manifest-readable")
    return Report(
        task_id=task_id,
        source=source,
        success=False,
        checked_at=checked_at,
        content_digest=None,
        rules=[RuleResult(rule, False, RULES[rule], [Failure(str(error))])],
    )
