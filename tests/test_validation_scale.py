"""Validation stays linear in the manifest: messages name a few rows and count the rest, and the work done per
bad row does not grow with the number of bad rows before it.

Counts, never timings: speed and memory at a million rows are measured by benchmarks/validation_scale.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.intake import validation
from components.intake.drop_check import validate_location
from components.intake.tasks import ManifestRow
from components.intake.validation import RowFacts, content_digest
from components.intake.validation_report import Failure, Report
from components.settings.config_loading import load_config
from components.support import storage
from tests.drops import png_bytes, write_manifest


def _drop(root: Path, rows: list[list[str]], present: list[str]) -> Path:
    """A drop of one class whose manifest lists ``rows`` and which holds the images ``present``."""
    (root / "img").mkdir(parents=True)
    (root / "task.yaml").write_text("task_id: scale\nscenario: class-incremental\ndataset: toy\nclasses: [cat]\n")
    for i, rel in enumerate(present):
        (root / rel).write_bytes(png_bytes(i))
    write_manifest(root, rows)
    return root


def _validate(drop: Path, tmp_path: Path):
    return validate_location(str(drop), load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path))


def test_duplicate_rows_name_ten_other_lines_and_count_the_rest(tmp_path):
    """One path listed 299 times: each message names 10 of the 298 other lines and counts the 288 others; the
    rule counts all 299 rows and keeps the first Report.MAX_ROWS_PER_RULE messages."""
    rows = [["img/x.png", "cat", "train"]] * 299 + [["img/y.png", "cat", "test"]]
    report = _validate(_drop(tmp_path / "drop", rows, ["img/x.png", "img/y.png"]), tmp_path)

    rule = next(r for r in report.rules if r.rule == "duplicate-rows")
    assert not rule.success and rule.count == 299  # lines 2..300 list img/x.png
    assert len(rule.failures) == min(299, Report.MAX_ROWS_PER_RULE)
    first = rule.failures[0].message
    assert first == (
        "manifest.csv line 2 (img/x.png): the same path is also listed on line(s) "
        "3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 288 more"
    )
    # a row past the first ten names the first ten others, and still counts the rest
    assert rule.failures[20].message == (
        "manifest.csv line 22 (img/x.png): the same path is also listed on line(s) "
        "2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 288 more"
    )
    saved = report.to_dict()
    dup = next(r for r in saved["rules"] if r["rule"] == "duplicate-rows")
    assert dup["count"] == 299 and len(dup["failures"]) == Report.MAX_ROWS_PER_RULE and "unlisted" not in dup
    assert "… and 294 more (see the report)" in report.summary()


def test_missing_files_are_counted_exactly_past_the_listed_rows(tmp_path):
    rows = [[f"img/gone-{i}.png", "cat", "train"] for i in range(450)] + [["img/y.png", "cat", "test"]]
    report = _validate(_drop(tmp_path / "drop", rows, ["img/y.png"]), tmp_path)
    rule = next(r for r in report.rules if r.rule == "image-readable")
    assert rule.count == 450 and len(rule.failures) == Report.MAX_ROWS_PER_RULE
    assert rule.failures[0].message == "manifest.csv line 2 (img/gone-0.png): the file is not in the drop"
    assert [f.line for f in rule.failures] == list(range(2, 2 + Report.MAX_ROWS_PER_RULE))  # the first rows, in order


class _CountingFailure(Failure):
    """A Failure that counts how often its line is read: the old per-row check rescanned every earlier failure."""

    reads = 0

    def __getattribute__(self, name):
        if name == "line":
            type(self).reads += 1
        return super().__getattribute__(name)


def _work(tmp_path: Path, n: int, monkeypatch) -> dict[str, int]:
    """Validate a drop of ``n`` bad rows (half one path listed again and again, half files not in the drop)."""
    rows = [["img/x.png" if i % 2 else f"img/gone-{i}.png", "cat", "train"] for i in range(n)]
    drop = _drop(tmp_path / f"drop-{n}", [*rows, ["img/y.png", "cat", "test"]], ["img/x.png", "img/y.png"])
    _CountingFailure.reads = 0
    monkeypatch.setattr(validation, "Failure", _CountingFailure)
    report = _validate(drop, tmp_path)
    counts = {r.rule: r.count for r in report.failed_rules}
    assert counts["duplicate-rows"] == counts["image-readable"] == n // 2
    return {
        "line_reads": _CountingFailure.reads,
        "message_chars": sum(len(f.message) for r in report.rules for f in r.failures),
        "report_bytes": len(json.dumps(report.to_dict())),
    }


def test_work_and_output_grow_at_most_linearly_with_bad_rows(tmp_path, monkeypatch):
    """Four times the bad rows: at most 1.3 × four times the reads of earlier failures, the characters of the
    messages held and the bytes of the report (all were quadratic: n²/2 reads, n messages of n line numbers)."""
    small, big = _work(tmp_path, 160, monkeypatch), _work(tmp_path, 640, monkeypatch)
    for key in small:
        assert big[key] <= 1.3 * 4 * max(small[key], 1), (key, small[key], big[key])


def test_content_digest_is_the_hash_of_its_definition():
    """Hashed piece by piece, the digest is still that of the JSON text it is defined as (the ledger compares
    digests across runs): distinct (path, content) pairs in sorted order, then the metadata files' digests."""
    facts = []
    for i, (path, sha, error) in enumerate(
        [
            ("img/b.png", "22" * 32, None),
            ("img/é.png", "11" * 32, None),
            ("img/a.png", None, "the file is not in the drop"),
            ("img/b.png", "22" * 32, None),  # a duplicate row: one entry
            (None, None, None),  # no path: not listed
            ('img/"q".png', "33" * 32, None),
        ]
    ):
        fact = RowFacts(ManifestRow(i + 2, path or "", "cat", "train", None))
        fact.sha256, fact.image_error = sha, error
        facts.append(fact)
    text = (
        '{"images": [["img/\\"q\\".png", "' + "33" * 32 + '"], '
        '["img/a.png", "unreadable:the file is not in the drop"], '
        '["img/b.png", "' + "22" * 32 + '"], '
        '["img/\\u00e9.png", "' + "11" * 32 + '"]], '
        f'"manifest.csv": "{storage.sha256_bytes(b"m")}", "task.yaml": "{storage.sha256_bytes(b"s")}"}}'
    )
    assert content_digest(b"s", b"m", facts) == storage.sha256_bytes(text.encode())
    assert content_digest(b"s", b"m", []) == storage.sha256_bytes(
        f'{{"images": [], "manifest.csv": "{storage.sha256_bytes(b"m")}", '
        f'"task.yaml": "{storage.sha256_bytes(b"s")}"}}'.encode()
    )
