"""What `cliploop metrics MATRIX.json` shows an auditor (components/training/metrics.py, `format_table` and
`main`): the matrix with its orientation, null entries as "-" (docs/metrics.md: a missing entry is never
estimated), the metrics with how to read them (docs/metrics.md, "Definitions": forgetting higher is worse,
BWT negative means forgetting, the retention as points and as a ratio), and one-line errors naming the file.
The expected text is written out by hand from a 2-task matrix whose metrics are worked out below."""

from __future__ import annotations

import json

import pytest

from components.training.metrics import AccuracyMatrix, MatrixError, format_table, main

# a[1] = (80, 10), a[2] = (60, 90); b = (5, null); zero-shot 50 before, 45 then 40 after.
DOC = {
    "tasks": ["t1", "t2"],
    "matrix": [[80.0, 10.0], [60.0, 90.0]],
    "initial": [5.0, None],
    "zero_shot": {"name": "H", "initial": 50.0, "after": [45.0, 40.0]},
}
# By hand: A_1 = 80, A_2 = (60 + 90) / 2 = 75, so avg_incremental 77.5 and last 75; forgetting 80 - 60 = 20;
# BWT 60 - 80 = -20; FWT needs b_2 (null): null; transfer a[1][2] = 10; Avg: columns (80 + 60) / 2 = 70 and
# (10 + 90) / 2 = 50, so 60; Last (60 + 90) / 2 = 75; retention 40 - 50 = -10 points, 40 / 50 = 0.8.
# Columns are 8 wide (a task id is shorter), each row label 8 wide then two spaces.
TABLE = [
    "accuracy (%): rows = after learning task i, columns = task j",
    " " * 16 + "t1" + " " * 7 + "t2",
    " initial" + " " * 6 + "5.00" + " " * 8 + "-",
    " " * 6 + "t1" + " " * 5 + "80.00" + " " * 4 + "10.00",
    " " * 6 + "t2" + " " * 5 + "60.00" + " " * 4 + "90.00",
    "",
    "cl.avg_incremental" + " " * 7 + "77.50",
    "cl.last" + " " * 18 + "75.00",
    "cl.forgetting" + " " * 12 + "20.00  higher is worse",
    "cl.bwt" + " " * 18 + "-20.00  negative = forgetting",
    "cl.fwt" + " " * 23 + "-",
    "mtil.transfer" + " " * 12 + "10.00",
    "mtil.avg" + " " * 17 + "60.00",
    "mtil.last" + " " * 16 + "75.00",
    "zs.retention_abs" + " " * 8 + "-10.00  points",
    "zs.retention_rel" + " " * 8 + "0.8000  ratio",
]


def test_the_table_of_a_two_task_matrix_line_by_line():
    assert format_table(AccuracyMatrix.from_dict(DOC)).splitlines() == TABLE


def test_the_table_shows_the_metrics_it_is_given_not_its_own():
    m = AccuracyMatrix.from_dict({"tasks": ["t1"], "matrix": [[50.0]]})
    lines = format_table(m, {"cl.last": 12.5}).splitlines()
    assert "cl.last" + " " * 18 + "12.50" in lines  # the file's 50 would show 50.00
    assert "cl.avg_incremental" + " " * 11 + "-" in lines  # not given: shown as missing, not recomputed
    assert not any(line.startswith(" initial") for line in lines)  # no initial row without `initial`


def test_a_long_task_id_widens_every_column_to_it():
    m = AccuracyMatrix.from_dict({"tasks": ["mnist-digits", "t2"], "matrix": [[100.0, None]]})
    lines = format_table(m).splitlines()
    assert lines[1] == " " * 14 + "mnist-digits" + " " * 11 + "t2"
    assert lines[2] == "mnist-digits" + "  " + "      100.00" + " " + " " * 11 + "-"


def test_the_command_prints_the_table_and_the_json(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(DOC))
    assert main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == TABLE
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["t1", "t2"]
    assert out["metrics"]["cl.bwt"] == -20.0 and out["metrics"]["cl.fwt"] is None


def test_errors_are_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main([str(missing)]) == 2
    assert capsys.readouterr().err == f"cliploop metrics: {missing}: no such file\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": ["a"], "matrix": [[101.0]]}))
    with pytest.raises(MatrixError) as raised:
        AccuracyMatrix.load(bad)
    assert str(raised.value) == f"{bad}: matrix[0][0]: 101.0 is outside 0..100 (accuracies are percentages)"


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"tasks": ["a", "a"], "matrix": []}, "tasks: task ids must be unique"),
        ([], "an accuracy matrix file holds a JSON object with 'tasks' and 'matrix'"),
        ({"tasks": [], "matrix": [], "size": 1, "colour": 2}, "unknown keys: colour, size"),
        ({"tasks": [], "matrix": [], "zero_shot": 5}, "zero_shot: expected {name, initial, after: [...]}"),
    ],
)
def test_a_refused_file_gets_exactly_its_reason(doc, message):
    with pytest.raises(MatrixError) as raised:
        AccuracyMatrix.from_dict(doc)
    assert str(raised.value) == message


def test_the_usage_names_the_command_and_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].startswith("usage: cliploop metrics ")
    assert "recompute every continual-learning metric from an accuracy matrix" in lines
    assert "matrix      accuracy_matrix.json" in lines  # what the one argument is
