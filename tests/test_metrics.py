"""Metric definitions on hand-made matrices, the published ZSCL numbers, the CLI and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.training import plots
from components.training.metrics import AccuracyMatrix, MatrixError, compute_all, seen_accuracy
from flows.cli import main

DATA = Path(__file__).with_name("data")

# a[i][j]: rows = after learning task i, columns = task j.
HAND = AccuracyMatrix(
    tasks=["t1", "t2", "t3"],
    matrix=[[80.0, 10.0, 20.0], [60.0, 90.0, 30.0], [70.0, 50.0, 40.0]],
    initial=[5.0, 15.0, 25.0],
    test_sizes=[100, 100, 200],
    zero_shot={"name": "held-out", "initial": 50.0, "after": [49.0, 45.0, 40.0]},
)


def test_hand_made_matrix_by_definition():
    m = compute_all(HAND)
    # A_1 = 80; A_2 = (60 + 90) / 2 = 75; A_3 = (100*70 + 100*50 + 200*40) / 400 = 50.
    assert seen_accuracy(HAND, 2) == 75.0 and seen_accuracy(HAND, 3) == 50.0
    assert m["cl.avg_incremental"] == pytest.approx((80 + 75 + 50) / 3)
    assert m["cl.last"] == 50.0
    # f_1 = max(80, 60) - 70 = 10; f_2 = 90 - 50 = 40  ->  F = 25 (higher is worse).
    assert m["cl.forgetting"] == 25.0
    # BWT = ((70 - 80) + (50 - 90)) / 2 = -25 (negative = forgetting).
    assert m["cl.bwt"] == -25.0
    # FWT = ((a12 - b2) + (a23 - b3)) / 2 = ((10 - 15) + (30 - 25)) / 2 = 0.
    assert m["cl.fwt"] == 0.0
    # Transfer = mean(mean(a12), mean(a13, a23)) = mean(10, 25) = 17.5
    assert m["mtil.transfer"] == 17.5
    # Avg = mean over columns of column means = mean(70, 50, 30) = 50; Last = mean(70, 50, 40).
    assert m["mtil.avg"] == 50.0
    assert m["mtil.last"] == pytest.approx(160 / 3)
    assert m["zs.retention_abs"] == -10.0 and m["zs.retention_rel"] == 0.8


def test_unweighted_without_test_sizes_and_null_propagates():
    m = AccuracyMatrix(tasks=["a", "b"], matrix=[[50.0, None], [40.0, 80.0]])
    metrics = compute_all(m)
    assert metrics["cl.last"] == 60.0  # equal weights
    assert metrics["mtil.transfer"] is None  # a12 was not evaluated: no guess
    assert metrics["cl.fwt"] is None  # no initial row
    assert metrics["cl.forgetting"] == 10.0
    single = compute_all(AccuracyMatrix(tasks=["a"], matrix=[[70.0]]))
    assert single["cl.forgetting"] is None and single["cl.bwt"] is None and single["cl.last"] == 70.0


def test_partial_matrix_counts_only_learned_tasks():
    """During a stream, rows < tasks: metrics use the learned tasks only."""
    m = AccuracyMatrix(tasks=["a", "b", "c"], matrix=[[50.0, 20.0, 10.0], [45.0, 70.0, 12.0]])
    metrics = compute_all(m)
    assert metrics["mtil.last"] == 57.5 and metrics["cl.bwt"] == -5.0 and metrics["mtil.transfer"] == 20.0


@pytest.mark.parametrize(
    "run",
    [
        "order1/zscl",
        "order1/finetune",
        "order1/lwf",
        "order1/icarl",
        "order1/lwf-vr",
        "order1/wise-ft",
        "order1/zscl-star",
        "order2/zscl",
        "order2/lwf",
        "order2/wise-ft",
    ],
)
def test_reproduces_published_zscl_transfer_avg_last(run):
    """ZSCL's released accuracy matrices give its published Transfer/Avg/Last, to the rounding shown."""
    doc = json.loads((DATA / "zscl_mtil_results.json").read_text())
    cifar10 = doc["columns"].index("CIFAR10")
    rows = [[v for j, v in enumerate(row) if j != cifar10] for row in doc["runs"][run]["matrix"]]
    if run.startswith("order2"):  # stored in Order I index: permute rows and columns
        perm = [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]
        rows = [[rows[i][j] for j in perm] for i in perm]
    metrics = compute_all(AccuracyMatrix(tasks=[f"d{k}" for k in range(11)], matrix=rows))
    got = [round(metrics[k], 1) for k in ("mtil.transfer", "mtil.avg", "mtil.last")]
    assert got == doc["published_transfer_avg_last"][run]


def test_zero_shot_fixture_matrix():
    """docs/metrics.md, "Conventions to keep in mind": a zero-shot matrix (every row the same) has Transfer
    = mean of columns 2..11."""
    zs = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
    metrics = compute_all(AccuracyMatrix(tasks=[f"d{k}" for k in range(11)], matrix=[list(zs) for _ in zs]))
    assert round(metrics["mtil.transfer"], 1) == 69.4
    assert round(metrics["mtil.avg"], 1) == 65.3 and round(metrics["mtil.last"], 1) == 65.3


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"tasks": ["a"], "matrix": [[101.0]]}, "outside 0..100"),
        ({"tasks": ["a", "b"], "matrix": [[1.0]]}, "expected a list of 2"),
        ({"tasks": ["a"], "matrix": [["x"]]}, "not a number"),
        ({"tasks": ["a"]}, "'matrix' is missing"),
        ({"tasks": ["a"], "matrix": [[1.0]], "colour": 1}, "unknown keys: colour"),
        ({"tasks": ["a", "a"], "matrix": []}, "unique"),
    ],
)
def test_bad_matrix_files_are_rejected_with_the_reason(doc, message):
    with pytest.raises(MatrixError, match=message):
        AccuracyMatrix.from_dict(doc)


def test_metrics_cli(tmp_path, capsys):
    path = tmp_path / "m.json"
    HAND.save(path)
    assert main(["metrics", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == HAND.tasks and out["metrics"] == compute_all(HAND)
    assert main(["metrics", str(path)]) == 0
    table = capsys.readouterr().out
    assert "cl.forgetting" in table and "25.00" in table
    path.write_text("{not json")
    assert main(["metrics", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["metrics", str(tmp_path / "missing.json")]) == 2


def test_plots_are_png_files(tmp_path):
    for draw, name in ((plots.heatmap, "heat.png"), (plots.curves, "curves.png")):
        path = draw(HAND, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    partial = AccuracyMatrix(tasks=["a", "b"], matrix=[[50.0, None]])
    assert plots.heatmap(partial, tmp_path / "p.png").is_file()
