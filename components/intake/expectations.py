"""Great Expectations over a drop's two tables of facts (the manifest, and one row per listed image):
the tables made of the rows' facts, the suites that express the per-row validation rules, run in an ephemeral
GX context that also writes the HTML data docs. What the facts are and how failures are phrased is
:mod:`components.intake.validation`'s.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.intake.tasks import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SPLITS, Manifest, TaskSpec
from components.settings.config import ValidationConfig

if TYPE_CHECKING:
    from components.intake.label_doubt import LabelDoubts

IMAGE_COLUMNS = ("line", "path", "path_problem", "image_error", "format", "pixels", "min_side", "leak", "seen_in")

# Each column: how it is read off a row's facts (:class:`components.intake.validation.RowFacts`) and how it reaches
# pandas. The frames, and the filtered copies GX makes of them, are most of what a manifest of a million rows
# costs beyond its facts, so: repeated values as categories (a byte or two a row), numbers and flags as arrays,
# and paths as "object", which keeps the rows' own strings (pandas 3 would copy each into a new string array, in
# Arrow's memory pool, which keeps what it once held).
COLUMNS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "line": (attrgetter("line"), "int"),
    "path": (attrgetter("path"), "object"),
    "label": (attrgetter("label"), "category"),
    "split": (attrgetter("split"), "category"),
    "domain": (attrgetter("domain"), "category"),
    "path_problem": (attrgetter("path_problem"), "category"),
    "image_error": (attrgetter("image_error"), "category"),
    # format only for an image that was read and decoded: a refused file is reported by its own rule
    "format": (lambda f: f.format if f.image_error is None and f.path_problem is None else None, "category"),
    "pixels": (attrgetter("pixels"), "number"),
    "min_side": (lambda f: min(f.width, f.height) if f.width and f.height else None, "number"),
    "leak": (lambda f: f.leak_with is not None, "bool"),
    "seen_in": (attrgetter("seen_in"), "category"),
}


def _frame(facts: Sequence[Any], names: Sequence[str]):
    """One row per fact, the named columns: built a column at a time, never as a dict per row (which for a
    million rows would cost more memory than the facts it repeats)."""
    import numpy as np
    import pandas as pd

    def column(name: str):
        read, kind = COLUMNS[name]
        values = map(read, facts)
        if kind == "int":
            return np.fromiter(values, dtype=np.int64, count=len(facts))
        if kind == "bool":
            return np.fromiter(values, dtype=bool, count=len(facts))
        if kind == "number":
            floats = np.fromiter((np.nan if v is None else v for v in values), dtype=np.float64, count=len(facts))
            return pd.array(floats, dtype="Float64")  # NaN becomes <NA>: a missing size, not a number
        if kind == "category":  # coded here: pandas would first copy every value into an Arrow string array
            index: dict[Any, int] = {}
            codes = np.fromiter(
                (-1 if v is None else index.setdefault(v, len(index)) for v in values), dtype=np.int32, count=len(facts)
            )
            return pd.Categorical.from_codes(codes, categories=pd.Index(list(index), dtype=object))
        return pd.Series(list(values), dtype=object)

    return pd.DataFrame({name: column(name) for name in names}, columns=list(names), copy=False)


@contextlib.contextmanager
def _no_batch_fingerprint():
    """GX fingerprints every pandas batch (``pd.util.hash_pandas_object``) unless the frame is over its
    ``HASH_THRESHOLD`` bytes. Under pandas 3 that hash turns a million paths into a string index and back into
    a million new strings, about 250 MB and most of a suite's time at a million rows, for a batch marker that
    nothing here reads; so the threshold is 0 while our suites run."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    saved = getattr(engine, "HASH_THRESHOLD", None)
    if saved is not None:
        engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        if saved is not None:
            engine.HASH_THRESHOLD = saved


def _release(context) -> None:
    """GX keeps the context it made last as its global project, and with it our frames and the metrics it
    computed on them (as much memory again as the tables), until the next validation. Let it go now."""
    from great_expectations.data_context.data_context.context_factory import project_manager
    from great_expectations.exceptions import DataContextRequiredError

    try:
        current = project_manager.get_current_project()
    except DataContextRequiredError:  # none: nothing is held
        return
    if current is context:
        project_manager.set_project(None)
        gc.collect()  # GX's objects refer to each other in cycles: only the collector frees them


def _doubt_table(doubts: LabelDoubts | None, cfg: ValidationConfig, meta: dict):
    """The scored training rows and the label-doubt suite: at most ``label_doubt_max_share`` of them doubted
    (GX's ``mostly``: the share of rows that must pass). Neither when no row was scored."""
    import great_expectations as gx
    import pandas as pd

    if doubts is None or not doubts.scored:
        return None, []
    doubted = {d.line: d.suggested for d in doubts.doubts}
    frame = pd.DataFrame(
        {"line": doubts.lines, "doubted_as": pd.Series([doubted.get(n) for n in doubts.lines], dtype=object)}
    )
    suite = [
        gx.expectations.ExpectColumnValuesToBeNull(
            column="doubted_as", mostly=1.0 - cfg.label_doubt_max_share, meta=meta
        )
    ]
    return frame, suite


def run_expectations(
    spec: TaskSpec,
    manifest: Manifest,
    facts: Sequence[Any],
    cfg: ValidationConfig,
    docs_dir: Path | None,
    max_lines: int,
    doubts: LabelDoubts | None = None,
) -> list[dict[str, Any]]:
    """Run the suites; return one dict per expectation: rule, type, column, success, the number of failing rows
    (``unexpected_count``) and the manifest lines of the first ``max_lines`` of them (``lines``).

    ``facts``: one :class:`components.intake.validation.RowFacts` per manifest row. The suites run on two tables made
    of them: the manifest (line, path, label, split[, domain]) and the listed images (:data:`IMAGE_COLUMNS`); with
    ``doubts`` that scored rows, a third, the scored training rows (line, doubted_as: the class the model gives a
    doubted row, else empty), checked by the ``label-doubt`` expectation.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    x = gx.expectations
    declared = spec.class_names
    manifest_cols = list(manifest.columns)
    kept = [c for c in manifest_cols if c in ("path", "label", "split", "domain")]
    manifest_df = _frame(facts, ["line", *kept])
    present_extra = [c for c in manifest_cols if c not in manifest_df.columns]
    for col in present_extra:  # keep unexpected columns visible to the column check
        manifest_df[col] = None

    def meta(rule: str) -> dict:
        return {"rule": rule}

    expected_cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in manifest_cols]
    manifest_suite = [
        x.ExpectTableColumnsToMatchSet(column_set=["line", *expected_cols], exact_match=True, meta=meta("columns"))
    ]
    for col in REQUIRED_COLUMNS:
        if col in manifest_cols:
            manifest_suite.append(x.ExpectColumnValuesToNotBeNull(column=col, meta=meta("required-values")))
    if "split" in manifest_cols:
        manifest_suite += [
            x.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta=meta("split-value")),
            x.ExpectColumnDistinctValuesToContainSet(
                column="split", value_set=list(SPLITS), meta=meta("split-nonempty")
            ),
        ]
    if "label" in manifest_cols:
        # Labels match declared classes exactly as written; a near-miss ("Cat" vs "cat") is an error to fix.
        manifest_suite.append(
            x.ExpectColumnValuesToBeInSet(column="label", value_set=declared, meta=meta("label-declared"))
        )
    if "path" in manifest_cols:
        manifest_suite.append(x.ExpectColumnValuesToBeUnique(column="path", meta=meta("duplicate-rows")))

    image_df = _frame([f for f in facts if f.path], IMAGE_COLUMNS)
    image_suite = [
        x.ExpectColumnValuesToBeNull(column="path_problem", meta=meta("path-safe")),
        x.ExpectColumnValuesToBeNull(column="image_error", meta=meta("image-readable")),
        x.ExpectColumnValuesToBeInSet(column="format", value_set=list(cfg.formats), meta=meta("image-format")),
        x.ExpectColumnValuesToBeBetween(column="pixels", max_value=cfg.max_pixels, meta=meta("pixel-limit")),
        x.ExpectColumnValuesToBeBetween(column="min_side", min_value=cfg.min_side, meta=meta("image-min-side")),
        x.ExpectColumnValuesToBeInSet(column="leak", value_set=[False], meta=meta("train-test-leak")),
        x.ExpectColumnValuesToBeNull(column="seen_in", meta=meta("seen-before")),
    ]
    if "path" not in manifest_cols:
        image_suite = []
    doubt_df, doubt_suite = _doubt_table(doubts, cfg, meta("label-doubt"))

    context = gx.get_context(mode="ephemeral")
    try:
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            context.add_data_docs_site(
                site_name="cliploop",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        source = context.data_sources.add_pandas(f"task-{spec.task_id}")
        definitions = []
        frames = {}
        for name, frame, expectations in (
            ("manifest", manifest_df, manifest_suite),
            ("images", image_df, image_suite),
            ("label_doubt", doubt_df, doubt_suite),
        ):
            if not expectations:
                continue
            asset = source.add_dataframe_asset(name)
            batch = asset.add_batch_definition_whole_dataframe(f"{name}-all")
            suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.task_id}.{name}", expectations=expectations))
            definitions.append(
                context.validation_definitions.add(
                    gx.ValidationDefinition(name=f"{spec.task_id}.{name}", data=batch, suite=suite)
                )
            )
            frames[name] = frame
        out: list[dict[str, Any]] = []
        # One checkpoint per table: a checkpoint run binds a single dataframe through its batch parameters.
        with contextlib.redirect_stderr(io.StringIO()), _no_batch_fingerprint():  # GX draws progress bars on stderr
            for definition in definitions:
                name = definition.name.rsplit(".", 1)[1]
                single = context.checkpoints.add(
                    gx.Checkpoint(
                        name=f"{definition.name}.cp",
                        validation_definitions=[definition],
                        actions=[],
                        # SUMMARY, not COMPLETE: GX copies, stores and renders whatever it returns, so every failing
                        # row in the result made a manifest with many bad rows slow and large; the counts stay exact.
                        result_format={
                            "result_format": "SUMMARY",
                            "unexpected_index_column_names": ["line"],
                            "partial_unexpected_count": max_lines,
                            "return_unexpected_index_query": False,
                        },
                    )
                )
                result = single.run(batch_parameters={"dataframe": frames[name]})
                for run_result in result.run_results.values():
                    for res in run_result.results:
                        cfg_ = res.expectation_config
                        lines = []
                        for item in (res.result or {}).get("partial_unexpected_index_list") or []:
                            if isinstance(item, dict) and item.get("line") is not None:
                                lines.append(int(item["line"]))
                        info = getattr(res, "exception_info", None) or {}
                        error = info.get("exception_message")
                        out.append(
                            {
                                "rule": (cfg_.meta or {}).get("rule"),
                                "type": cfg_.type,
                                "column": cfg_.kwargs.get("column"),
                                "success": bool(res.success),
                                "unexpected_count": (res.result or {}).get("unexpected_count"),
                                "lines": lines,
                                "error": error or None,
                            }
                        )
            if docs_dir is not None:
                # Once for all the tables: a site update per checkpoint re-rendered the index and re-copied
                # GX's static files (about 4 MB) each time.
                context.build_data_docs(site_names=["cliploop"])
    finally:
        _release(context)
    return out
