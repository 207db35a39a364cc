"""Continual-learning metrics from an accuracy matrix (docs/metrics.md), in one tested place.

The accuracy-matrix file (``eval/accuracy_matrix.json``; ``cliploop metrics FILE`` recomputes
everything from it)::

    {"tasks":   ["t1", "t2", "t3"],                  # columns, in learning order
     "matrix":  [[a11, a12, a13], [a21, ...], ...],  # row i = after learning task i; null = not evaluated
     "initial": [b1, b2, b3],                          # optional: the starting model, for FWT
     "test_sizes": [n1, n2, n3],                       # optional: weights of A_i (else equal)
     "zero_shot": {"name": "H", "initial": h0, "after": [h1, h2, h3]}}   # optional held-out set

Accuracies are percentages. With ``a[i][j]`` the accuracy on task j after learning task i (1-based,
T rows learned so far):

- ``cl.avg_incremental`` = mean_i A_i, with A_i = test-size-weighted mean of a[i][1..i] (the accuracy
  on the union of the seen tasks' test sets);  ``cl.last`` = A_T;
- ``cl.forgetting`` = mean_{j<T} (max_{j<=l<T} a[l][j] - a[T][j])  (Chaudhry et al.; higher is worse);
- ``cl.bwt`` = mean_{j<T} (a[T][j] - a[j][j])  (Lopez-Paz & Ranzato; negative means forgetting);
- ``cl.fwt`` = mean_{j>=2} (a[j-1][j] - b_j)  (needs ``initial``);
- ``mtil.transfer`` = mean_{j>=2} mean_{i<j} a[i][j]; ``mtil.avg`` = mean_j mean_i a[i][j];
  ``mtil.last`` = mean_j a[T][j]  (ZSCL's Transfer / Avg / Last, over the T learned tasks);
- ``zs.retention_abs`` = h_T - h_0 and ``zs.retention_rel`` = h_T / h_0 on the held-out set.

A metric whose entries are missing (``null``) is ``null``, never a guess.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRIC_NAMES = (
    "cl.avg_incremental",
    "cl.last",
    "cl.forgetting",
    "cl.bwt",
    "cl.fwt",
    "mtil.transfer",
    "mtil.avg",
    "mtil.last",
    "zs.retention_abs",
    "zs.retention_rel",
)


class MatrixError(ValueError):
    pass


Number = float | None


@dataclass
class AccuracyMatrix:
    tasks: list[str]
    matrix: list[list[Number]]
    initial: list[Number] | None = None
    test_sizes: list[int] | None = None
    zero_shot: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        n = len(self.tasks)
        if len(set(self.tasks)) != n:
            raise MatrixError("tasks: task ids must be unique")
        if len(self.matrix) > n:
            raise MatrixError(f"matrix: {len(self.matrix)} rows but only {n} tasks")
        for i, row in enumerate(self.matrix):
            if not isinstance(row, list) or len(row) != n:
                raise MatrixError(f"matrix row {i}: expected a list of {n} values (one per task)")
            for j, value in enumerate(row):
                _check_accuracy(value, f"matrix[{i}][{j}]")
        if self.initial is not None:
            if len(self.initial) != n:
                raise MatrixError(f"initial: expected {n} values, got {len(self.initial)}")
            for j, value in enumerate(self.initial):
                _check_accuracy(value, f"initial[{j}]")
        if self.test_sizes is not None and (
            len(self.test_sizes) != n or any(not isinstance(s, int) or s <= 0 for s in self.test_sizes)
        ):
            raise MatrixError(f"test_sizes: expected {n} positive integers")

    # ---- file format ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": self.tasks, "matrix": self.matrix}
        if self.initial is not None:
            out["initial"] = self.initial
        if self.test_sizes is not None:
            out["test_sizes"] = self.test_sizes
        if self.zero_shot is not None:
            out["zero_shot"] = self.zero_shot
        return out

    @classmethod
    def from_dict(cls, doc: Any) -> AccuracyMatrix:
        if not isinstance(doc, dict):
            raise MatrixError("an accuracy matrix file holds a JSON object with 'tasks' and 'matrix'")
        unknown = set(doc) - {"tasks", "matrix", "initial", "test_sizes", "zero_shot"}
        if unknown:
            raise MatrixError(f"unknown keys: {', '.join(sorted(unknown))}")
        for key in ("tasks", "matrix"):
            if not isinstance(doc.get(key), list):
                raise MatrixError(f"'{key}' is missing or not a list")
        zero_shot = doc.get("zero_shot")
        if zero_shot is not None:
            if not isinstance(zero_shot, dict) or not isinstance(zero_shot.get("after", []), list):
                raise MatrixError("zero_shot: expected {name, initial, after: [...]}")
            for k, v in enumerate(zero_shot.get("after", [])):
                _check_accuracy(v, f"zero_shot.after[{k}]")
            _check_accuracy(zero_shot.get("initial"), "zero_shot.initial")
        return cls(
            tasks=[str(t) for t in doc["tasks"]],
            matrix=doc["matrix"],
            initial=doc.get("initial"),
            test_sizes=doc.get("test_sizes"),
            zero_shot=zero_shot,
        )

    def save(self, path: Path) -> None:
        from components.support.storage import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> AccuracyMatrix:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MatrixError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MatrixError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(doc)
        except MatrixError as exc:
            raise MatrixError(f"{path}: {exc}") from None

    def a(self, i: int, j: int) -> Number:
        """1-based a[i][j]."""
        return self.matrix[i - 1][j - 1]


def _check_accuracy(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MatrixError(f"{where}: {value!r} is not a number or null")
    if not 0 <= value <= 100:
        raise MatrixError(f"{where}: {value} is outside 0..100 (accuracies are percentages)")


def _mean(values: list[Number]) -> Number:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


# ---- the definitions ------------------------------------------------------------------------------------


def seen_accuracy(m: AccuracyMatrix, i: int) -> Number:
    """A_i: accuracy over the test sets of tasks 1..i after learning task i (test-size weighted)."""
    values = [m.a(i, j) for j in range(1, i + 1)]
    if any(v is None for v in values):
        return None
    weights = m.test_sizes[:i] if m.test_sizes else [1] * i
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def avg_incremental(m: AccuracyMatrix) -> Number:
    return _mean([seen_accuracy(m, i) for i in range(1, len(m.matrix) + 1)])


def last(m: AccuracyMatrix) -> Number:
    return seen_accuracy(m, len(m.matrix)) if m.matrix else None


def forgetting(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    if T < 2:
        return None
    per_task = []
    for j in range(1, T):
        history = [m.a(row, j) for row in range(j, T)]
        if any(v is None for v in history) or m.a(T, j) is None:
            return None
        per_task.append(max(history) - m.a(T, j))
    return _mean(per_task)


def backward_transfer(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    if T < 2:
        return None
    return _mean([None if m.a(T, j) is None or m.a(j, j) is None else m.a(T, j) - m.a(j, j) for j in range(1, T)])


def forward_transfer(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    if T < 2 or m.initial is None:
        return None
    return _mean(
        [
            None if m.a(j - 1, j) is None or m.initial[j - 1] is None else m.a(j - 1, j) - m.initial[j - 1]
            for j in range(2, T + 1)
        ]
    )


def mtil_transfer(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    if T < 2:
        return None
    return _mean([_mean([m.a(i, j) for i in range(1, j)]) for j in range(2, T + 1)])


def mtil_avg(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    if T == 0:
        return None
    return _mean([_mean([m.a(i, j) for i in range(1, T + 1)]) for j in range(1, T + 1)])


def mtil_last(m: AccuracyMatrix) -> Number:
    T = len(m.matrix)
    return _mean([m.a(T, j) for j in range(1, T + 1)]) if T else None


def zero_shot_retention(m: AccuracyMatrix) -> tuple[Number, Number]:
    zs = m.zero_shot or {}
    before, after = zs.get("initial"), (zs.get("after") or [None])[-1]
    if before is None or after is None:
        return None, None
    return after - before, (after / before if before else None)


def compute_all(m: AccuracyMatrix) -> dict[str, Number]:
    zs_abs, zs_rel = zero_shot_retention(m)
    values = {
        "cl.avg_incremental": avg_incremental(m),
        "cl.last": last(m),
        "cl.forgetting": forgetting(m),
        "cl.bwt": backward_transfer(m),
        "cl.fwt": forward_transfer(m),
        "mtil.transfer": mtil_transfer(m),
        "mtil.avg": mtil_avg(m),
        "mtil.last": mtil_last(m),
        "zs.retention_abs": zs_abs,
        "zs.retention_rel": zs_rel,
    }
    return {k: (None if v is None else round(v, 6)) for k, v in values.items()}


# ---- presentation -------------------------------------------------------------------------------------


def format_table(m: AccuracyMatrix, metrics: dict[str, Number] | None = None) -> str:
    metrics = metrics if metrics is not None else compute_all(m)
    width = max(8, *(len(t) for t in m.tasks))
    cell = lambda v: f"{'-' if v is None else f'{v:.2f}':>{width}}"  # noqa: E731
    lines = [
        "accuracy (%): rows = after learning task i, columns = task j",
        " " * (width + 2) + " ".join(f"{t:>{width}}" for t in m.tasks),
    ]
    if m.initial is not None:
        lines.append(f"{'initial':>{width}}  " + " ".join(cell(v) for v in m.initial))
    for task, row in zip(m.tasks, m.matrix):
        lines.append(f"{task:>{width}}  " + " ".join(cell(v) for v in row))
    lines.append("")
    notes = {
        "cl.forgetting": "higher is worse",
        "cl.bwt": "negative = forgetting",
        "zs.retention_rel": "ratio",
        "zs.retention_abs": "points",
    }
    for name in METRIC_NAMES:
        value = metrics.get(name)
        shown = "-" if value is None else (f"{value:.4f}" if name == "zs.retention_rel" else f"{value:.2f}")
        lines.append(f"{name:<20} {shown:>9}  {notes.get(name, '')}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cliploop metrics", description="recompute every continual-learning metric from an accuracy matrix"
    )
    parser.add_argument("matrix", help="accuracy_matrix.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        m = AccuracyMatrix.load(Path(args.matrix))
    except MatrixError as exc:
        print(f"cliploop metrics: {exc}", file=sys.stderr)
        return 2
    metrics = compute_all(m)
    if args.json:
        print(json.dumps({"tasks": m.tasks, "metrics": metrics}, indent=2))
    else:
        print(format_table(m, metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
