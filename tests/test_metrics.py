"""Metric definitions on hand-made matrices, the published ZSCL numbers, the CLI and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.training import plots
from components.training.metrics import METRIC_NAMES, AccuracyMatrix, MatrixError, compute_all, seen_accuracy
from flows.cli import main
from tests.cl_reference import NAMES, expected_metrics

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


# Built so that each plausible slip moves a number: task 1's best accuracy before the end is on the diagonal and
# the last row beats it (forgetting's rows: j <= l < T, never T itself); the test sets differ in size.
SKEWED = AccuracyMatrix(
    tasks=["t1", "t2", "t3"],
    matrix=[[80.0, 20.0, 10.0], [60.0, 70.0, 40.0], [85.0, 40.0, 50.0]],
    initial=[5.0, 15.0, 25.0],
    test_sizes=[100, 300, 100],
    zero_shot={"name": "held-out", "initial": 50.0, "after": [49.0, 45.0, 40.0]},
)
# By hand, from docs/metrics.md ("Definitions"):
SKEWED_BY_HAND = {
    # A_1 = 80; A_2 = (100*60 + 300*70) / 400 = 67.5; A_3 = (100*85 + 300*40 + 100*50) / 500 = 51.
    "cl.avg_incremental": (80 + 67.5 + 51) / 3,  # 66.1666...
    "cl.last": 51.0,
    # f_1 = max(a11, a21) - a31 = 80 - 85 = -5 (a gain); f_2 = max(a22) - a32 = 70 - 40 = 30; F = 12.5.
    # (Counting row 3 in the max would give f_1 = 0 and F = 15; starting one row late, f_1 = 60 - 85.)
    "cl.forgetting": 12.5,
    # BWT = ((a31 - a11) + (a32 - a22)) / 2 = (5 - 30) / 2.
    "cl.bwt": -12.5,
    # FWT = ((a12 - b2) + (a23 - b3)) / 2 = ((20 - 15) + (40 - 25)) / 2.
    "cl.fwt": 10.0,
    # Transfer = mean(mean(a12), mean(a13, a23)) = mean(20, 25).
    "mtil.transfer": 22.5,
    # Avg = mean of column means = mean((80+60+85)/3, (20+70+40)/3, (10+40+50)/3) = (225 + 130 + 100) / 9.
    "mtil.avg": 455 / 9,
    # Last = mean(a31, a32, a33), unweighted.
    "mtil.last": 175 / 3,
    # h_3 - h_0 and h_3 / h_0 with h_0 = 50, h_3 = 40 (h_1, h_2 do not count).
    "zs.retention_abs": -10.0,
    "zs.retention_rel": 0.8,
}


def test_every_metric_of_a_skewed_matrix_by_hand():
    assert set(METRIC_NAMES) == set(SKEWED_BY_HAND) == set(NAMES)
    assert (seen_accuracy(SKEWED, 1), seen_accuracy(SKEWED, 2), seen_accuracy(SKEWED, 3)) == (80.0, 67.5, 51.0)
    metrics = compute_all(SKEWED)
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx(SKEWED_BY_HAND, abs=1e-6)
    # The tests' second implementation of the definitions agrees with the hand (it checks the pipeline elsewhere).
    assert expected_metrics(SKEWED.to_dict()) == pytest.approx(SKEWED_BY_HAND, abs=1e-9)
    assert expected_metrics(HAND.to_dict()) == pytest.approx(compute_all(HAND), abs=1e-6)


def test_four_tasks_forgetting_takes_the_best_row_before_the_last():
    """4x4: task a peaks at row 2, task b at row 3, task c at its own row (its 95 at row 1 came before it was
    learned: not a peak to forget from); row 4 is the one compared."""
    m = AccuracyMatrix(
        tasks=["a", "b", "c", "d"],
        matrix=[
            [50.0, 0.0, 95.0, 0.0],
            [90.0, 60.0, 0.0, 0.0],
            [70.0, 80.0, 40.0, 0.0],
            [30.0, 20.0, 35.0, 10.0],
        ],
    )
    metrics = compute_all(m)
    # f_a = max(50, 90, 70) - 30 = 60; f_b = max(60, 80) - 20 = 60; f_c = 40 - 35 = 5; F = 125 / 3.
    assert metrics["cl.forgetting"] == pytest.approx(125 / 3)
    # BWT = ((30 - 50) + (20 - 60) + (35 - 40)) / 3 = -65 / 3.
    assert metrics["cl.bwt"] == pytest.approx(-65 / 3)
    # A_i (equal sizes): 50, 75, 190/3, 95/4.
    assert metrics["cl.avg_incremental"] == pytest.approx((50 + 75 + 190 / 3 + 95 / 4) / 4)
    # Transfer = mean(a_1b, mean(a_1c, a_2c), mean(a_1d, a_2d, a_3d)) = mean(0, 47.5, 0).
    assert metrics["mtil.transfer"] == pytest.approx(47.5 / 3) and metrics["mtil.last"] == 23.75
    # Avg: column sums 240, 160, 170, 10 (the entries above the diagonal included), over 16 entries.
    assert metrics["mtil.avg"] == pytest.approx(580 / 16)
    assert metrics == pytest.approx(expected_metrics(m.to_dict()), abs=1e-6)


def test_mid_stream_only_the_learned_block_counts():
    """Two of three tasks learned; the third column holds zero-shot accuracy on a task not learned yet
    (docs/metrics.md: the MTIL metrics use columns 1..T only)."""
    m = AccuracyMatrix(
        tasks=["a", "b", "c"],
        matrix=[[50.0, 20.0, 10.0], [45.0, 70.0, 12.0]],
        initial=[5.0, 15.0, 25.0],
        test_sizes=[1, 3, 1000],
    )
    metrics = compute_all(m)
    # Avg over the 2x2 block: mean((50 + 45) / 2, (20 + 70) / 2) = 46.25; with column c it would be 34.5.
    assert metrics["mtil.avg"] == 46.25
    assert metrics["mtil.last"] == 57.5  # mean(45, 70), not mean(45, 70, 12)
    assert metrics["mtil.transfer"] == 20.0  # a12 only: c's column is not a learned task's yet
    assert metrics["cl.fwt"] == 5.0  # a12 - b2 = 20 - 15; a23 - b3 is not a learned task's
    # A_1 = 50, A_2 = (1*45 + 3*70) / 4 = 63.75: task c's test set (1000 images) weighs nothing yet.
    assert metrics["cl.last"] == 63.75 and metrics["cl.avg_incremental"] == 56.875
    assert metrics["cl.forgetting"] == 5.0 and metrics["cl.bwt"] == -5.0  # 50 - 45, 45 - 50
    assert metrics == pytest.approx(expected_metrics(m.to_dict()), abs=1e-6)


@pytest.mark.parametrize(
    "where, missing",
    [
        # a13 sits above the diagonal: only the MTIL means over the columns read it.
        ((0, 2), {"mtil.transfer", "mtil.avg"}),
        # a21 is in A_2 and in task 1's history before the end (not in BWT: a31 - a11).
        ((1, 0), {"cl.avg_incremental", "cl.forgetting", "mtil.avg"}),
        # a22 is task 2's accuracy when learned: A_2, forgetting, BWT and Avg read it.
        ((1, 1), {"cl.avg_incremental", "cl.forgetting", "cl.bwt", "mtil.avg"}),
        # a23: FWT (a23 - b3), Transfer (mean(a13, a23)), Avg.
        ((1, 2), {"cl.fwt", "mtil.transfer", "mtil.avg"}),
        # a33: the last row's own task: A_3 and both Lasts, Avg; forgetting and BWT look at tasks 1..2 only.
        ((2, 2), {"cl.avg_incremental", "cl.last", "mtil.avg", "mtil.last"}),
    ],
)
def test_a_missing_entry_nulls_exactly_the_metrics_that_need_it(where, missing):
    rows = [list(r) for r in SKEWED.matrix]
    rows[where[0]][where[1]] = None
    m = AccuracyMatrix(SKEWED.tasks, rows, SKEWED.initial, SKEWED.test_sizes, SKEWED.zero_shot)
    metrics = compute_all(m)
    assert {k for k, v in metrics.items() if v is None} == missing
    for name in set(METRIC_NAMES) - missing:
        assert metrics[name] == pytest.approx(SKEWED_BY_HAND[name], abs=1e-6), name


def test_missing_inputs_beside_the_matrix_null_only_their_metrics():
    no_b2 = compute_all(AccuracyMatrix(SKEWED.tasks, SKEWED.matrix, [5.0, None, 25.0], SKEWED.test_sizes))
    assert no_b2["cl.fwt"] is None and no_b2["cl.forgetting"] == 12.5
    assert no_b2["zs.retention_abs"] is None and no_b2["zs.retention_rel"] is None  # no held-out set
    for zero_shot in (
        {"name": "h", "initial": 50.0, "after": [49.0, None]},
        {"name": "h", "initial": None, "after": [40.0]},
        {"name": "h", "initial": 50.0, "after": []},
    ):
        got = compute_all(AccuracyMatrix(SKEWED.tasks, SKEWED.matrix, zero_shot=zero_shot))
        assert (got["zs.retention_abs"], got["zs.retention_rel"]) == (None, None), zero_shot
    # h_0 = 0: the difference is defined, the ratio is not.
    zero = compute_all(AccuracyMatrix(SKEWED.tasks, SKEWED.matrix, zero_shot={"initial": 0.0, "after": [30.0]}))
    assert (zero["zs.retention_abs"], zero["zs.retention_rel"]) == (30.0, None)


def test_one_task_and_no_task():
    one = compute_all(AccuracyMatrix(tasks=["a", "b"], matrix=[[70.0, 30.0]], initial=[10.0, 20.0]))
    assert {k for k, v in one.items() if v is None} == {
        "cl.forgetting",
        "cl.bwt",
        "cl.fwt",
        "mtil.transfer",
        "zs.retention_abs",
        "zs.retention_rel",
    }
    assert one["cl.last"] == one["cl.avg_incremental"] == one["mtil.avg"] == one["mtil.last"] == 70.0
    assert set(compute_all(AccuracyMatrix(tasks=["a"], matrix=[])).values()) == {None}


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
        ({"tasks": ["a"], "matrix": [[1.0], [2.0]]}, "matrix: 2 rows but only 1 tasks"),
        ({"tasks": ["a"], "matrix": [1.0]}, "matrix row 0: expected a list of 1"),
        ({"tasks": ["a"], "matrix": [[True]]}, r"matrix\[0\]\[0\]: True is not a number"),
        ({"tasks": ["a"], "matrix": [[float("nan")]]}, "not a number"),
        ({"tasks": ["a"], "matrix": [[-0.5]]}, r"matrix\[0\]\[0\]: -0.5 is outside 0..100"),
        ({"tasks": ["a", "b"], "matrix": [[1.0, 100.5]]}, r"matrix\[0\]\[1\]"),
        ({"tasks": "a", "matrix": []}, "'tasks' is missing or not a list"),
        ([1, 2], "a JSON object with 'tasks' and 'matrix'"),
        ({"tasks": ["a", "b"], "matrix": [], "initial": [1.0]}, "initial: expected 2 values, got 1"),
        ({"tasks": ["a"], "matrix": [], "initial": [200]}, r"initial\[0\]: 200 is outside"),
        ({"tasks": ["a", "b"], "matrix": [], "test_sizes": [1]}, "test_sizes: expected 2 positive integers"),
        ({"tasks": ["a"], "matrix": [], "test_sizes": [0]}, "test_sizes: expected 1 positive integers"),
        ({"tasks": ["a"], "matrix": [], "test_sizes": [2.5]}, "test_sizes"),
        ({"tasks": ["a"], "matrix": [], "zero_shot": [50.0]}, "zero_shot: expected"),
        ({"tasks": ["a"], "matrix": [], "zero_shot": {"after": 5}}, "zero_shot: expected"),
        ({"tasks": ["a"], "matrix": [], "zero_shot": {"after": [101]}}, r"zero_shot.after\[0\]: 101 is outside"),
        ({"tasks": ["a"], "matrix": [], "zero_shot": {"initial": "x"}}, "zero_shot.initial: 'x' is not a number"),
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
