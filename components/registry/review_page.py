"""What a reviewer reads on a model version's page in MLflow: its description (markdown) and its key metrics
as version tags. Pure functions of what the version, its run and the champion's run recorded; the MLflow
reads and writes are ``RunLog.write_review_page``'s (``components/registry/registry_runs.py``).

The description is written at registration (gate not yet run) and again once the gate's verdict is known.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Version tag (after the ``cliploop.`` prefix) <- run metric. ``metric.new_task`` is ``acc.<the version's task>``.
METRIC_TAGS: dict[str, str] = {
    "metric.last": "cl.last",
    "metric.avg": "cl.avg_incremental",
    "metric.forgetting": "cl.forgetting",
    "metric.bwt": "cl.bwt",
    "metric.zs_retention": "zs.retention_rel",
}
NEW_TASK_TAG = "metric.new_task"

# The continual metrics compared with the champion, in the order a reviewer reads them.
KEY_METRICS: list[tuple[str, str]] = [
    ("cl.last", "accuracy over every learned task, now (%)"),
    ("cl.avg_incremental", "average incremental accuracy (%)"),
    ("cl.forgetting", "forgetting (points, lower is better)"),
    ("cl.bwt", "backward transfer (points, negative is forgetting)"),
    ("zs.retention_rel", "zero-shot retention (ratio to the base model)"),
]

# Run artifacts a reviewer opens, in reading order: (artifact path, what it is).
ARTIFACTS: list[tuple[str, str]] = [
    ("eval/heatmap.png", "accuracy-matrix heatmap"),
    ("eval/curves.png", "accuracy per task after each step"),
    ("eval/accuracy_matrix.json", "the accuracy matrix"),
    ("eval/metrics.json", "every metric and the step's timings"),
    ("validation/report.html", "the task's data-validation report, one page that opens offline"),
    ("validation/report.json", "the same report as JSON"),
    ("validation/data_docs/index.html", "the task's Great Expectations Data Docs (their styles come from the network)"),
    ("lineage.json", "lineage: task data, config, code and parents"),
]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def metric_tags(metrics: dict[str, float], task_id: str) -> dict[str, str]:
    """The version tags (without the ``cliploop.`` prefix) of the key metrics this version's run measured."""
    tags = {tag: _fmt(metrics[name]) for tag, name in METRIC_TAGS.items() if metrics.get(name) is not None}
    if metrics.get(f"acc.{task_id}") is not None:
        tags[NEW_TASK_TAG] = _fmt(metrics[f"acc.{task_id}"])
    return tags


def _delta(mine: float | None, theirs: float | None) -> str:
    return "" if mine is None or theirs is None else f"{mine - theirs:+.3g}"


def description(
    *,
    version: int,
    task_id: str,
    parent_version: int | None,
    method: str,
    run_id: str,
    metrics: dict[str, float],
    champion: int | None = None,
    champion_metrics: dict[str, float] | None = None,
    gate: dict[str, Any] | None = None,
    artifacts: Iterable[str] = (),
) -> str:
    """The version's description (markdown). ``gate``: the verdict's dict (``Verdict.to_dict``), None
    before the gate ran; ``champion``: the champion it is compared with (None: none, or this version);
    ``artifacts``: the run's artifact paths (only those listed in ``ARTIFACTS`` are named)."""
    parent = f"version {parent_version}" if parent_version is not None else "the base model"
    lines = [
        f"## Version {version}: task `{task_id}`",
        "",
        f"Learned task `{task_id}` on top of {parent} with method `{method}` (MLflow run `{run_id}`).",
        "",
    ]
    lines += gate_lines(gate)
    lines.append("")

    compare = champion is not None and champion != version and champion_metrics is not None
    theirs = champion_metrics if compare else {}
    rows = [(name, meaning) for name, meaning in KEY_METRICS if name in metrics or name in theirs]
    tasks = sorted({k[len("acc.") :] for k in (*metrics, *theirs) if k.startswith("acc.")})
    rows += [(f"acc.{t}", "accuracy on this task (%)" + (", the new task" if t == task_id else "")) for t in tasks]
    if compare:
        lines += [
            f"### Metrics against the champion (version {champion})",
            "",
            f"| metric | meaning | this version | champion v{champion} | change |",
            "|---|---|---|---|---|",
        ]
        for name, meaning in rows:
            mine, other = metrics.get(name), theirs.get(name)
            lines.append(f"| `{name}` | {meaning} | {_fmt(mine)} | {_fmt(other)} | {_delta(mine, other)} |")
    else:
        lines += ["### Metrics (no champion to compare with)", "", "| metric | meaning | value |", "|---|---|---|"]
        lines += [f"| `{name}` | {meaning} | {_fmt(metrics.get(name))} |" for name, meaning in rows]
    if not rows:
        lines.append("| (none measured) | | |")
    lines.append("")

    present = set(artifacts)
    found = [(path, what) for path, what in ARTIFACTS if path in present]
    if found:
        lines += ["### Where to look", "", f"In the run's artifacts (`runs:/{run_id}/<path>`):", ""]
        lines += [f"- `{path}`: {what}" for path, what in found]
        lines.append("")
    if gate is not None and gate.get("verdict") == "fail":
        lines.append(
            f"The gate rejected this version: `cliploop approve {version} --reviewer NAME --override-gate` promotes "
            f"it anyway; `cliploop requeue {task_id}` learns the task again."
        )
    else:
        lines += decide_here(version)
    return "\n".join(lines)


def gate_lines(gate: dict[str, Any] | None) -> list[str]:
    """The gate's verdict as the page says it. A version no rule judged is not said to pass: with no rule
    configured, or none that applied to it (the first version of a chain has no champion and nothing to forget),
    the page says that nothing was checked."""
    if gate is None:
        return ["**Gate:** not run yet."]
    reasons = list(gate.get("reasons") or [])
    if gate.get("verdict") == "fail":
        return ["**Gate: FAIL**", *(f"- {r}" for r in reasons)]
    checks = gate.get("checks") or []
    applied = [c for c in checks if c.get("passed") is not None]
    # Configured rules that judged nothing: skipped checks, and rules that made no check (no champion, say).
    idle = [f"`{c['rule']}` ({c['detail']})" for c in checks if c.get("passed") is None]
    idle += [f"`{rule}` ({why})" for rule, why in (gate.get("not_applied") or {}).items()]
    if applied:
        lines = ["**Gate: PASS**", "- every configured rule passed:"]
        lines += [f"  - `{c['rule']}`: {_fmt(c['value'])} (threshold {c['threshold']:g})" for c in applied]
        return lines + ([f"- not applied: {'; '.join(idle)}"] if idle else [])
    if not gate.get("configured"):
        why = "no gate rule is configured (`gate:` in the workspace's cliploop.yaml)"
    else:
        why = f"no configured rule applied to this version: {'; '.join(idle)}"
    return ["**Gate: nothing checked**", f"- {why}; nothing stopped this version: judge it on the metrics below"]


def decide_here(version: int) -> list[str]:
    """How to decide on this version, first in MLflow itself (the reviewer is reading this page there), then from a
    shell; the MLflow ways are those ``components/pipeline/review.py`` reads (``registry_decision``)."""
    return [
        "### Decide here, in MLflow",
        "",
        "- **Approve**: set this version's tag `cliploop.review` to `approved`, or add the alias `champion` to it "
        "(Aliases, at the top of this page).",
        "- **Reject**: set this version's tag `cliploop.review` to `rejected`.",
        "- Set the tags `cliploop.reviewer` (your name) and `cliploop.review_note` first, and `cliploop.review` last: "
        "the decision records them (MLflow does not record who moved an alias).",
        "",
        "A night waiting for this review (tag `cliploop.review` is `pending`) takes the decision within seconds; "
        "otherwise the next night does (an alias moved while no night waits is recorded as `manual-alias`, not as "
        "an approval: use the tag then).",
        "",
        f"From a shell: `cliploop approve {version} --reviewer NAME` or `cliploop reject {version} --reviewer NAME "
        "--reason '...'`. The decision is recorded in the tags `cliploop.review`, `cliploop.reviewer` and "
        "`cliploop.review_note`.",
    ]
