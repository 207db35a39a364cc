"""Labels the model doubts (issue 24, item 7): the confident-learning rule on hand-computed cases, the label-doubt
expectation's verdict (a warning by default, quarantine when configured, a share that may pass), and ingestion with
the check on. No server: real Great Expectations, real git + DVC for ingestion.

Where a model must be confident, the scorer is a stand-in whose probabilities are set by hand: it reads an image's
colour and gives that colour's class 0.97. No real model here is confident on images a test can make in a second;
the real scorer (the champion, or the base model) is checked below for what it returns, and measured on planted
label noise in benchmarks/label_noise.py (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.intake import ingestion, workspace
from components.intake.label_doubt import check_labels, confident_doubts
from components.intake.tasks import open_drop, read_metadata
from components.intake.validation import TaskContext, scan_images, validate
from components.settings.config_loading import load_config
from tests.drops import write_manifest

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}

# Rows (label; p(class 0), p(class 1), p(class 2)), hand-made. Per-class thresholds t_j = mean p_j over the rows
# labelled j: t0 = (.95 + .93 + .02) / 3 = 0.633, t1 = (.94 + .92 + .50) / 3 = 0.787,
# t2 = (.95 + .93 + .20) / 3 = 0.693.
HAND = [
    (0, [0.95, 0.03, 0.02]),
    (0, [0.93, 0.04, 0.03]),
    (0, [0.02, 0.96, 0.02]),  # row 2: p1 = .96 >= t1, class 1 is not its label, .96 >= 0.9: doubted
    (1, [0.03, 0.94, 0.03]),
    (1, [0.05, 0.92, 0.03]),
    (1, [0.45, 0.50, 0.05]),  # row 5: no p_j reaches t_j: the rule does not place it at all
    (2, [0.02, 0.03, 0.95]),
    (2, [0.04, 0.03, 0.93]),
    (2, [0.70, 0.10, 0.20]),  # row 8: p0 = .70 >= t0, off the diagonal, but .70 < 0.9: only doubted at a lower floor
]


def test_confident_learning_flags_what_the_definition_says():
    labels = np.array([label for label, _ in HAND])
    probs = np.array([p for _, p in HAND])
    assert confident_doubts(labels, probs, 0.9).tolist() == [2]
    # At a floor of 0.6, row 8 joins, after row 2 (most confident contradiction first: .96, then .70).
    assert confident_doubts(labels, probs, 0.6).tolist() == [2, 8]


def test_an_unsure_model_doubts_nothing():
    """Near-uniform probabilities: the per-class thresholds sit near 1/3, so confident learning alone moves rows
    (row 0, labelled 0, reaches t1), but no probability reaches the 0.9 floor."""
    from cleanlab.filter import find_label_issues

    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[0.33, 0.34, 0.33], [0.34, 0.33, 0.33], [0.33, 0.33, 0.34]] * 2)
    assert find_label_issues(labels, probs, filter_by="confident_learning").any()  # the floor is what holds
    assert confident_doubts(labels, probs, 0.9).tolist() == []


class ColourModel:
    """The stand-in for a confident model (see the module's docstring): 0.97 for the class of the image's colour."""

    name = "colour reader"

    def __call__(self, dataset, class_names, images):
        out = []
        for data in images:
            mean = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(axis=0)
            colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
            out.append([0.97 if name == colour else 0.03 / (len(class_names) - 1) for name in class_names])
        return np.array(out)


class BrokenModel:
    name = "broken"

    def __call__(self, dataset, class_names, images):
        raise RuntimeError("no weights")


def colour_drop(root: Path, task_id: str) -> tuple[Path, set[int]]:
    """Four train and two test images of each colour, each labelled with its colour, except two planted flips: a
    red image labelled green and a blue image labelled red. Returns the folder and the flips' manifest lines."""
    folder = root / task_id
    (folder / "img").mkdir(parents=True)
    (folder / "task.yaml").write_text(
        yaml.safe_dump(
            {
                "task_id": task_id,
                "scenario": "class-incremental",
                "dataset": "paint",
                "classes": ["red", "green", "blue"],
            }
        )
    )
    rows, n = [], 0
    for colour, rgb in COLOURS.items():
        for split, count in (("train", 4), ("test", 2)):
            for _ in range(count):
                rows.append([_image(folder, n, rgb, task_id), colour, split])
                n += 1
    rows.append([_image(folder, n, COLOURS["red"], task_id), "green", "train"])
    rows.append([_image(folder, n + 1, COLOURS["blue"], task_id), "red", "train"])
    write_manifest(folder, rows)
    return folder, {len(rows), len(rows) + 1}  # header is line 1: the last two rows are lines len+0 and len+1


def _image(folder: Path, n: int, rgb, salt: str) -> str:
    pixels = np.full((16, 16, 3), rgb, dtype=np.uint8)
    pixels[0, 0] = (n, len(salt), 7)  # one pixel apart: every image has its own content
    rel = f"img/{n}.png"
    Image.fromarray(pixels, "RGB").save(folder / rel, format="PNG")
    return rel


def _validate(folder: Path, scorer, *overrides: str):
    cfg = load_config(overrides=list(overrides), env={}, cwd=folder)
    source = open_drop(str(folder))
    spec, manifest, _, _ = read_metadata(source)
    facts = scan_images(source, manifest, cfg.validation)
    doubts = check_labels(spec, facts, lambda f: source.read(f.path, 1 << 20), scorer, cfg.validation)
    report = validate(
        spec,
        manifest,
        facts,
        cfg.validation,
        TaskContext(),
        source=str(folder),
        checked_at="now",
        digest=None,
        doubts=doubts,
    )
    return report, next(r for r in report.rules if r.rule == "label-doubt")


def test_planted_flips_warn_by_default(tmp_path):
    folder, flips = colour_drop(tmp_path, "paint-a")
    report, rule = _validate(folder, ColourModel())
    assert {d["line"] for d in report.label_doubt["doubts"]} == flips
    assert report.label_doubt["scored"] == 14  # 12 clean training rows and the 2 flips
    assert {(d["label"], d["suggested"]) for d in report.label_doubt["doubts"]} == {("green", "red"), ("red", "blue")}
    assert report.success and rule.success and not rule.failures  # a warning, not a failure
    assert rule.warning and "2 of 14" in rule.warning
    assert "! [label-doubt]" in report.summary()
    expectation = next(e for e in report.expectations if e["rule"] == "label-doubt")
    assert expectation["success"] is False and expectation["unexpected_count"] == 2


def test_planted_flips_quarantine_when_configured(tmp_path):
    folder, flips = colour_drop(tmp_path, "paint-b")
    report, rule = _validate(folder, ColourModel(), "validation.label_doubt=quarantine")
    assert not report.success and not rule.success
    assert {f.line for f in rule.failures} == flips
    assert all("but the model gives" in f.message for f in rule.failures)


def test_a_share_under_the_threshold_passes(tmp_path):
    """2 doubted of 14 scored is 14.3%: under a 20% allowance the expectation passes (GX's mostly = 0.8)."""
    folder, flips = colour_drop(tmp_path, "paint-c")
    report, rule = _validate(
        folder, ColourModel(), "validation.label_doubt=quarantine", "validation.label_doubt_max_share=0.2"
    )
    assert report.success and rule.success and rule.warning is None
    assert {d["line"] for d in report.label_doubt["doubts"]} == flips  # still listed in the section


def test_clean_labels_are_left_alone(tmp_path):
    folder, _ = colour_drop(tmp_path, "paint-d")
    rows = (folder / "manifest.csv").read_text().splitlines()
    (folder / "manifest.csv").write_text("\n".join(rows[:-2]) + "\n")  # without the two flips
    report, rule = _validate(folder, ColourModel(), "validation.label_doubt=quarantine")
    assert report.success and rule.warning is None
    assert report.label_doubt["scored"] == 12 and report.label_doubt["doubts"] == []


@pytest.mark.parametrize(
    ("scorer", "overrides", "why"),
    [
        (BrokenModel(), [], "could not score the images: RuntimeError: no weights"),
        (ColourModel(), ["validation.label_doubt=off"], "validation.label_doubt is off"),
        (None, [], "no model scored this drop"),
    ],
)
def test_not_checked_says_why_and_blocks_nothing(tmp_path, scorer, overrides, why):
    folder, _ = colour_drop(tmp_path, "paint-e")
    report, rule = _validate(folder, scorer, "validation.label_doubt=quarantine", *overrides)
    assert report.success and rule.success
    assert why in rule.skipped and why in report.label_doubt["not_checked"]


def test_ingestion_warns_by_default_and_quarantines_when_configured(tmp_path):
    ws = tmp_path / "ws"
    cfg = load_config(overrides=[f"workspace={ws}"], env={}, cwd=tmp_path)
    workspace.ensure_workspace(cfg)
    warned, flips = colour_drop(tmp_path / "drops", "paint-w")
    outcome = ingestion.ingest(str(warned), cfg, scorer=ColourModel())
    assert outcome.status == "accepted", outcome.message
    first, *rest = outcome.message.splitlines()
    assert "WARNING label-doubt" in first and any("2 of 14 training labels doubted by colour reader" in r for r in rest)
    saved = json.loads(Path(outcome.report_path).read_text())
    assert {d["line"] for d in saved["label_doubt"]["doubts"]} == flips
    assert saved["label_doubt"]["model"] == "colour reader"

    strict = load_config(overrides=[f"workspace={ws}", "validation.label_doubt=quarantine"], env={}, cwd=tmp_path)
    refused, flips = colour_drop(tmp_path / "drops", "paint-q")
    outcome = ingestion.ingest(str(refused), strict, scorer=ColourModel())
    assert outcome.status == "quarantined"
    assert "[label-doubt]" in outcome.message
    assert not (ws / "data" / "tasks" / "paint-q").exists()


def test_the_base_model_scores_when_there_is_no_champion(tmp_path, tiny_checkpoint):
    """The real scorer on a workspace that registered nothing: the base model, one probability row per image."""
    from components.pipeline.label_scoring import champion_scorer
    from tests.conftest import tiny_overrides

    cfg = load_config(
        overrides=[f"workspace={tmp_path / 'ws'}", *tiny_overrides(tiny_checkpoint)], env={}, cwd=tmp_path
    )
    folder, _ = colour_drop(tmp_path, "paint-z")  # (the ledger, empty, is made on first use: no version)
    images = [p.read_bytes() for p in sorted((folder / "img").glob("*.png"))[:5]]
    scorer = champion_scorer(cfg)
    probs = scorer("paint", ["red", "green", "blue"], images)
    assert probs.shape == (5, 3) and np.allclose(probs.sum(axis=1), 1.0) and (probs >= 0).all()
    assert scorer.name.startswith("the base model")


def test_a_model_that_does_not_know_the_images_judges_nothing(tmp_path):
    """Every label rotated to the next colour: the model agrees with none of them (under the 50% floor), so its
    contradictions are not evidence and the drop is not judged on them."""
    folder, _ = colour_drop(tmp_path, "paint-r")
    rows = (folder / "manifest.csv").read_text().splitlines()
    turn = {"red": "green", "green": "blue", "blue": "red"}
    rotated = [",".join([*r.split(",")[:1], turn[r.split(",")[1]], r.split(",")[2]]) for r in rows[1:]]
    (folder / "manifest.csv").write_text("\n".join([rows[0], *rotated]) + "\n")
    report, rule = _validate(folder, ColourModel(), "validation.label_doubt=quarantine")
    assert report.success and rule.success and report.label_doubt["doubts"] == []
    assert report.label_doubt["agreement"] == 0.0 and "agrees with only 0%" in rule.skipped
