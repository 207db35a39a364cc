"""Great Expectations over a drop's two tables of facts (the manifest, and one row per listed image):
the suites that express the per-row validation rules, run in an ephemeral GX context that also writes
the HTML data docs. What the facts are and how failures are phrased is :mod:`components.validation`'s.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from components.config import ValidationConfig
from components.tasks import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SPLITS, Manifest, TaskSpec

IMAGE_COLUMNS = ("line", "path", "path_problem", "image_error", "format", "pixels", "min_side", "leak", "seen_in")


def run_expectations(
    spec: TaskSpec,
    manifest: Manifest,
    manifest_rows: list[dict[str, Any]],
    image_rows: list[dict[str, Any]],
    cfg: ValidationConfig,
    docs_dir: Path | None,
) -> list[dict[str, Any]]:
    """Run the suites; return one dict per expectation: rule, type, column, success, failing manifest lines.

    ``manifest_rows``: line, path, label, split[, domain] of each manifest row; ``image_rows``: the facts
    of each listed image, keyed by :data:`IMAGE_COLUMNS`.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    x = gx.expectations
    declared = spec.class_names
    manifest_cols = list(manifest.columns)
    kept = [c for c in manifest_cols if c in ("path", "label", "split", "domain")]
    manifest_df = pd.DataFrame(manifest_rows, columns=["line", *kept])
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

    image_df = pd.DataFrame(image_rows, columns=list(IMAGE_COLUMNS))
    image_df["pixels"] = image_df["pixels"].astype("Float64")
    image_df["min_side"] = image_df["min_side"].astype("Float64")
    image_df["leak"] = image_df["leak"].astype(bool)
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

    context = gx.get_context(mode="ephemeral")
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
    for name, frame, expectations in (("manifest", manifest_df, manifest_suite), ("images", image_df, image_suite)):
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
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if docs_dir is not None else []
    out: list[dict[str, Any]] = []
    # One checkpoint per table: a checkpoint run binds a single dataframe through its batch parameters.
    with contextlib.redirect_stderr(io.StringIO()):  # GX draws progress bars on stderr
        for definition in definitions:
            name = definition.name.rsplit(".", 1)[1]
            single = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"{definition.name}.cp",
                    validation_definitions=[definition],
                    actions=actions,
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]},
                )
            )
            result = single.run(batch_parameters={"dataframe": frames[name]})
            for run_result in result.run_results.values():
                for res in run_result.results:
                    cfg_ = res.expectation_config
                    lines = []
                    for item in (res.result or {}).get("unexpected_index_list") or []:
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
    return out
