"""Every validation rule fails on a drop that breaks it, alone, with a message naming the row and the rule
(the cases: tests/bad_drops.py), and a bad drop is quarantined with nothing else changed.

Real git, real DVC (local remote), real Great Expectations. One workspace with an accepted earlier task is built
per module: the rule cases validate against it as `cliploop validate` does (it only reads; no data docs are
rendered, which is most of what an ingest's validation costs), and each quarantine test ingests into a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from components.intake import ingestion, workspace
from components.settings.config_loading import load_config
from flows.cli import main
from tests.bad_drops import ALSO_FAILS, BAD_ROWS, CASES, GX_RULES, NOT_ROWS, image_of, undeclared_label
from tests.drops import make_task, read_manifest, write_manifest


def _config(ws: Path, *overrides: str):
    return load_config(overrides=[f"workspace={ws}", *overrides], env={}, cwd=ws)


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    ws = root / "ws"
    drops = root / "drops"
    cfg = _config(ws)
    workspace.ensure_workspace(cfg)
    first = make_task(drops, "toy-a", ["cat", "dog"])
    outcome = ingestion.ingest(str(first), cfg)
    assert outcome.status == "accepted", outcome.message
    return ws, first


@pytest.fixture
def ws(base_workspace, tmp_path):
    src, _ = base_workspace
    dst = tmp_path / "ws"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(ws: Path) -> dict:
    """Everything a bad task must not touch: git, data.dvc, data/, the DVC remote and cache, other entries."""
    import subprocess

    def tree(root: Path) -> dict[str, str]:
        if not root.exists():
            return {}
        return {
            str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    git = lambda *a: subprocess.run(["git", *a], cwd=ws, capture_output=True, text=True).stdout  # noqa: E731
    cfg = _config(ws)
    others = [r for r in workspace.status(cfg) if r["task_id"] == "toy-a"]
    return {
        "head": git("rev-parse", "HEAD"),
        "status": git("status", "--porcelain"),
        "log": git("log", "--oneline"),
        "data.dvc": (ws / "data.dvc").read_text(),
        "data": tree(ws / "data"),
        "remote": tree(ws / ".cliploop" / "dvc-remote"),
        "cache": tree(ws / ".dvc" / "cache"),
        "others": others,
    }


def _bad_drop(case: str, tmp_path: Path, base_workspace) -> tuple[Path, dict]:
    drop = make_task(tmp_path / "drops", "toy-b", ["bird", "fish"])
    ctx = {"earlier": base_workspace[1]}
    CASES[case][0](drop, ctx)
    return drop, ctx


def _expected_text(text: str, drop: Path, ctx: dict) -> str:
    if "{row}" in text:
        line = next(i for i, r in enumerate(read_manifest(drop), start=1) if r and r[0] == ctx["row"])
        text = text.replace("{row}", f"manifest.csv line {line} ({ctx['row']})")
    return text.replace("{line}", str(ctx.get("line")))


def test_every_rule_has_a_case_of_its_own():
    """label-doubt needs a model's scores: its cases are in tests/test_label_doubt.py."""
    from components.intake.validation_report import RULES

    assert {rule for _, rule, _, _ in CASES.values()} == set(RULES) - {"label-doubt"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_fails_on_its_own_case_and_nothing_else_fails(case, base_workspace, tmp_path):
    """Each case breaks one rule, and the report fails exactly that rule (and those its definition drags along),
    with a message naming the row; a rule that Great Expectations decides is there as a failed expectation. So
    removing any one rule from the suite, or making one fire where it should not, fails a case. Checked with
    `cliploop validate`'s function, which runs the same validation as an ingest but writes nothing (the
    quarantine itself: the next test)."""
    from components.intake.drop_check import validate_location

    _, rule, expected, overrides = CASES[case]
    drop, ctx = _bad_drop(case, tmp_path, base_workspace)
    report = validate_location(str(drop), _config(base_workspace[0], *overrides)).to_dict()

    assert report["success"] is False
    failed = {r["rule"]: r for r in report["rules"] if not r["success"]}
    assert set(failed) == {rule} | ALSO_FAILS.get(case, set()), sorted(failed)
    messages = [f["message"] for f in failed[rule]["failures"]]
    for text in expected:
        text = _expected_text(text, drop, ctx)
        assert any(text in m for m in messages), f"{text!r} not in {messages}"
    if rule in GX_RULES:
        (exp,) = [e for e in report["expectations"] if e["rule"] == rule and not e["success"]]
        if rule not in NOT_ROWS:
            assert exp["unexpected_count"] == BAD_ROWS.get(case, 1) == failed[rule]["count"]
    # Every other expectation ran and passed.
    assert all(e["success"] for e in report["expectations"] if e["rule"] != rule)


# One case down each road a bad drop takes through an ingest: refused before validation (task.yaml, manifest), a
# manifest rule, an image rule (the drop's good images already staged into shards), and a check across tasks.
QUARANTINED = ["bad-task-yaml", "no-manifest", "undeclared-label", "seen-in-earlier-task", "class-overlap"]


@pytest.mark.parametrize("case", QUARANTINED)
def test_bad_input_is_quarantined_and_nothing_else_changes(case, ws, base_workspace, tmp_path):
    _, rule, expected, overrides = CASES[case]
    drop, ctx = _bad_drop(case, tmp_path, base_workspace)
    cfg = _config(ws, *overrides)
    before = snapshot(ws)

    outcome = ingestion.ingest(str(drop), cfg)

    assert outcome.status == "quarantined", outcome.message
    assert snapshot(ws) == before
    report = json.loads(Path(outcome.report_path).read_text())
    assert report["success"] is False
    failed = {r["rule"]: r for r in report["rules"] if not r["success"]}
    assert set(failed) == {rule} | ALSO_FAILS.get(case, set()), sorted(failed)
    messages = [f["message"] for f in failed[rule]["failures"]]
    for text in expected:
        text = _expected_text(text, drop, ctx)
        assert any(text in m for m in messages), f"{text!r} not in {messages}"
    assert Path(outcome.report_path).is_relative_to(ws / ".cliploop" / "quarantine")
    if rule not in ("task-yaml", "manifest-readable"):  # the suites ran: their data docs are kept with the report
        assert Path(report["data_docs"]).is_file()
    with workspace.open_ledger(cfg) as ledger:
        task_id = "toy-b" if rule not in ("task-yaml",) else drop.name
        assert ledger.get(task_id).state == "quarantined"


def test_the_size_rules_hold_at_their_bounds(base_workspace, tmp_path):
    """image-min-side: "at least the minimum width and height", so a side of exactly min_side passes; pixel-limit:
    "within the limit", so exactly max_pixels passes (16×16 = 256 pixels here), one pixel less fails."""
    from components.intake.drop_check import validate_location

    ws = base_workspace[0]
    drop = make_task(tmp_path / "drops", "toy-b", ["bird", "fish"])
    image_of(8, 40)(drop, {})
    report = validate_location(str(drop), _config(ws, "validation.max_pixels=320"))  # 8×40 = 320
    assert report.success, report.to_dict()
    failed = {r.rule for r in validate_location(str(drop), _config(ws, "validation.min_side=9")).failed_rules}
    assert failed == {"image-min-side"}
    failed = {r.rule for r in validate_location(str(drop), _config(ws, "validation.max_pixels=319")).failed_rules}
    assert failed == {"pixel-limit"}


def test_cli_exit_code_and_message_for_quarantine(ws, tmp_path, capsys):
    drop = make_task(tmp_path / "drops", "toy-c", ["owl"])
    undeclared_label(drop, {})
    assert main(["ingest", str(drop), "-w", str(ws)]) == 1
    out = capsys.readouterr().out
    assert "QUARANTINED toy-c" in out and "[label-declared]" in out and "label 'zebra'" in out
    # Re-validating by id re-reads the drop and fails the same way; a dry run on a good drop passes.
    assert main(["validate", "toy-c", "-w", str(ws)]) == 1
    good = make_task(tmp_path / "drops", "toy-d", ["owl"])
    assert main(["validate", str(good), "-w", str(ws), "--report-dir", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["success"] is True
    assert (tmp_path / "r" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "r" / "config.resolved.yaml").is_file()


def test_accepted_task_revalidates_from_its_shards(base_workspace, capsys):
    ws, _ = base_workspace
    assert main(["validate", "toy-a", "-w", str(ws)]) == 0
    assert "task toy-a: valid" in capsys.readouterr().out


def test_gx_all_null_column_does_not_pass_silently(base_workspace, tmp_path):
    """GX range/set checks pass on nulls; our suite pairs them with not-null checks (docs/reliability.md,
    "Great Expectations"): every label empty fails required-values on every row, and leaves the class without
    training images, though label-declared (a set check) passes them."""
    from components.intake.drop_check import validate_location

    drop = make_task(tmp_path / "drops", "toy-e", ["owl"])
    rows = read_manifest(drop)
    write_manifest(drop, [[r[0], "", r[2]] for r in rows[1:]])
    report = validate_location(str(drop), _config(base_workspace[0]))
    assert {r.rule for r in report.failed_rules} == {"required-values", "class-has-train"}
    (required,) = [r for r in report.failed_rules if r.rule == "required-values"]
    assert required.count == len(rows) - 1 == 5  # 3 train and 2 test rows
    assert {e["column"] for e in report.expectations if e["rule"] == "required-values" and not e["success"]} == {
        "label"
    }
