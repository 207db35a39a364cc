"""The continual-learning metrics of docs/metrics.md written a second time, for tests only, so a test can check
the pipeline's numbers against the definitions instead of against the same code's output.

Deliberately not shaped like ``components/training/metrics.py``: 0-based numpy slices, and a missing entry is
NaN, which every sum, max and mean carries through (docs/metrics.md: a metric that needs a missing entry is
null). tests/test_metrics.py checks this module on matrices computed by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NAMES = (
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


def _array(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def expected_metrics(doc: dict[str, Any]) -> dict[str, float | None]:
    """Every metric of an accuracy-matrix document (the JSON of docs/contracts.md, "The accuracy-matrix file")."""
    n = len(doc["tasks"])
    acc = _array(doc["matrix"]) if doc["matrix"] else np.zeros((0, n))
    T = acc.shape[0]
    sizes = np.array(doc.get("test_sizes") or [1] * n, dtype=float)
    out: dict[str, float] = dict.fromkeys(NAMES, np.nan)

    # A_t (0-based t): the union of the test sets of tasks 0..t after learning task t.
    union = [float(np.dot(acc[t, : t + 1], sizes[: t + 1]) / sizes[: t + 1].sum()) for t in range(T)]
    if T:
        out["cl.avg_incremental"] = float(np.mean(union))
        out["cl.last"] = union[-1]
        block = acc[:, :T]  # the learned tasks' columns only
        out["mtil.avg"] = float(block.mean())  # equal column lengths: the mean of column means
        out["mtil.last"] = float(block[-1].mean())
    if T >= 2:
        earlier = np.arange(T - 1)
        best_before_last = np.array([acc[j : T - 1, j].max() for j in earlier])
        out["cl.forgetting"] = float((best_before_last - acc[-1, earlier]).mean())
        out["cl.bwt"] = float((acc[-1, earlier] - acc[earlier, earlier]).mean())
        out["mtil.transfer"] = float(np.mean([acc[:j, j].mean() for j in range(1, T)]))
        if doc.get("initial") is not None:
            start = _array([doc["initial"]])[0]
            out["cl.fwt"] = float(np.mean([acc[j - 1, j] - start[j] for j in range(1, T)]))
    zero_shot = doc.get("zero_shot") or {}
    h0, after = zero_shot.get("initial"), zero_shot.get("after") or []
    if h0 is not None and after and after[-1] is not None:
        out["zs.retention_abs"] = after[-1] - h0
        out["zs.retention_rel"] = after[-1] / h0 if h0 else np.nan
    return {k: None if v is None or math.isnan(v) else float(v) for k, v in out.items()}
