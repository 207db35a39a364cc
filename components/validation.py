"""Validation of a task drop: a Great Expectations suite on the manifest and on per-image facts,
plus the checks that span tasks (scenario and class consistency). The result is a :class:`Report`
(JSON) and GX's HTML data docs.

Images are decoded here, in our own code, and never by anything that trusts the file extension:
the format is taken from the magic bytes and only allow-listed formats reach Pillow (restricted to
that one plugin); the pixel count is read from the header and checked before any decoding
(decompression bombs); a full decode with truncation treated as an error catches damaged files.
GX then validates the table of facts, so every rule's failures come back as rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from components import storage
from components.config import ValidationConfig
from components.tasks import (DropError, DropSource, Manifest, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, SPLITS, TaskSpec,
                              normalise_class_name, path_problem)

MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"BM", "BMP"),
)
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}

RULES: dict[str, str] = {
    "task-yaml": "task.yaml is present and follows the schema",
    "manifest-readable": "manifest.csv is present and readable CSV",
    "columns": "manifest.csv has exactly the columns path,label,split[,domain]",
    "required-values": "path, label and split are filled in on every row",
    "split-value": "split is 'train' or 'test'",
    "split-nonempty": "both the train and the test split have rows",
    "label-declared": "every label is a class declared in task.yaml",
    "duplicate-rows": "each image path is listed once",
    "path-safe": "paths stay inside the task root (no '..', absolute paths or symbolic links)",
    "image-readable": "every listed image exists and decodes completely to one still picture",
    "image-format": "images are JPEG, PNG or WebP (by their content, not their name)",
    "pixel-limit": "images are within the pixel limit (decompression-bomb guard)",
    "image-min-side": "images are at least the minimum width and height",
    "train-test-leak": "no image content is in both train and test",
    "seen-before": "no image content was already ingested by an earlier task",
    "class-has-train": "every declared class has training images",
    "scenario-classes": "classes are consistent with the scenario (new for class-incremental, "
                        "the known set for domain-incremental)",
}


def sniff_format(data: bytes) -> str | None:
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height from the file header alone (no decoding), or None if the header is unreadable.

    Lets the pixel limit be enforced before any decoder sees the file.
    """
    try:
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                return None
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if fmt == "JPEG":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                    i += 2
                    continue
                length = int.from_bytes(data[i + 2:i + 4], "big")
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
                i += 2 + length
            return None
        if fmt == "WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
            if kind == b"VP8 ":
                return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                        int.from_bytes(data[28:30], "little") & 0x3FFF)
    except (IndexError, ValueError):
        return None
    return None


@dataclass
class ImageProbe:
    format: str | None
    width: int | None = None
    height: int | None = None
    error: str | None = None


def probe_image(data: bytes, allowed: list[str], max_pixels: int) -> ImageProbe:
    """Identify, size-check and fully decode an image held in memory. Never raises."""
    from PIL import Image

    fmt = sniff_format(data)
    if fmt not in allowed:
        # Not handed to Pillow at all: a TIFF or EPS named .jpg must not reach its plugin.
        return ImageProbe(fmt or "unknown")
    size = header_size(data, fmt)
    if size is not None and size[0] * size[1] > max_pixels:
        return ImageProbe(fmt, size[0], size[1])  # over the limit: reported by pixel-limit, never decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return ImageProbe(fmt, width, height)  # over the limit: reported by pixel-limit, not decoded
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # which frame is the labelled picture is anyone's guess: refused, not guessed
                    return ImageProbe(fmt, width, height, error=f"is animated ({frames} frames); a training image "
                                                                "must be a single still picture")
                im.load()
    except Image.DecompressionBombError as exc:
        return ImageProbe(fmt, error=f"refused by the decoder's pixel guard ({exc})")
    except Image.DecompressionBombWarning as exc:
        return ImageProbe(fmt, error=f"refused by the decoder's pixel guard ({exc})")
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        text = str(exc) or type(exc).__name__
        return ImageProbe(fmt, error=f"cannot be decoded ({text})")
    return ImageProbe(fmt, width, height)


@dataclass
class RowFacts:
    """One manifest row with what was found about its image."""

    line: int
    path: str | None
    label: str | None
    split: str | None
    domain: str | None
    path_problem: str | None = None
    image_error: str | None = None
    sha256: str | None = None
    size: int | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    leak_with: int | None = None  # line of a row in the other split with the same content
    seen_in: str | None = None  # id of an earlier task holding the same content

    @property
    def pixels(self) -> int | None:
        return self.width * self.height if self.width is not None and self.height is not None else None


ImageSink = Callable[[str, str, bytes], None]  # (sha256, suffix, bytes) -> None


def scan_images(source: DropSource, manifest: Manifest, cfg: ValidationConfig,
                sink: ImageSink | None = None) -> list[RowFacts]:
    """Read every listed image once, recording facts; accepted images are handed to ``sink`` (sharding)."""
    facts: list[RowFacts] = []
    probed: dict[str, RowFacts] = {}
    for row in manifest.rows:
        fact = RowFacts(row.line, row.path or None, row.label or None, row.split or None, row.domain)
        facts.append(fact)
        if not row.path:
            continue
        if row.path in probed:  # a duplicate row: same facts, reported by duplicate-rows
            first = probed[row.path]
            for name in ("path_problem", "image_error", "sha256", "size", "format", "width", "height"):
                setattr(fact, name, getattr(first, name))
            continue
        probed[row.path] = fact
        fact.path_problem = path_problem(row.path)
        if fact.path_problem:
            continue
        try:
            data = source.read(row.path, cfg.max_image_bytes)
        except PermissionError as exc:
            fact.path_problem = f"refused: {exc}"
            continue
        except FileNotFoundError:
            fact.image_error = "the file is not in the drop"
            continue
        except (OSError, storage.StorageError) as exc:
            fact.image_error = f"cannot be read ({exc})"
            continue
        fact.sha256 = storage.sha256_bytes(data)
        fact.size = len(data)
        probe = probe_image(data, list(cfg.formats), cfg.max_pixels)
        fact.format, fact.width, fact.height, fact.image_error = probe.format, probe.width, probe.height, probe.error
        acceptable = (probe.error is None and probe.format in cfg.formats and fact.pixels is not None
                      and fact.pixels <= cfg.max_pixels)
        if acceptable and sink is not None:
            sink(fact.sha256, SUFFIX[probe.format], data)
    _mark_leaks(facts)
    return facts


def _mark_leaks(facts: list[RowFacts]) -> None:
    first_by_split: dict[tuple[str, str], int] = {}
    for fact in facts:
        if fact.sha256 and fact.split in SPLITS:
            first_by_split.setdefault((fact.sha256, fact.split), fact.line)
    for fact in facts:
        if fact.sha256 and fact.split in SPLITS:
            other = "test" if fact.split == "train" else "train"
            fact.leak_with = first_by_split.get((fact.sha256, other))


def content_digest(spec_bytes: bytes, manifest_bytes: bytes, facts: list[RowFacts]) -> str:
    """Identity of a drop's payload: its metadata files and the content of every listed image."""
    listing = {"task.yaml": storage.sha256_bytes(spec_bytes), "manifest.csv": storage.sha256_bytes(manifest_bytes),
               "images": sorted({(f.path, f.sha256 or f"unreadable:{f.image_error or f.path_problem}")
                                 for f in facts if f.path})}
    return storage.sha256_bytes(json.dumps(listing, sort_keys=True).encode())


# ---- the report ------------------------------------------------------------------------------------


@dataclass
class Failure:
    message: str
    line: int | None = None
    path: str | None = None


@dataclass
class RuleResult:
    rule: str
    success: bool
    description: str
    failures: list[Failure] = field(default_factory=list)
    skipped: str | None = None

    @property
    def count(self) -> int:
        return len(self.failures)


@dataclass
class Report:
    task_id: str
    source: str
    success: bool
    checked_at: str
    content_digest: str | None
    rules: list[RuleResult]
    stats: dict[str, Any] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    data_docs: str | None = None

    MAX_ROWS_PER_RULE = 200

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for rule in out["rules"]:
            rule["count"] = len(rule["failures"])
            rule["failures"] = rule["failures"][: self.MAX_ROWS_PER_RULE]
        return out

    def save(self, path: Path) -> Path:
        storage.atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]

    def summary(self, max_rows: int = 5) -> str:
        if self.success:
            return f"task {self.task_id}: valid ({len(self.rules)} rules passed)"
        lines = [f"task {self.task_id}: INVALID ({len(self.failed_rules)} rule(s) failed)"]
        for rule in self.failed_rules:
            lines.append(f"  ✗ [{rule.rule}] {rule.description}: {rule.count} problem(s)")
            for failure in rule.failures[:max_rows]:
                lines.append(f"      {failure.message}")
            if rule.count > max_rows:
                lines.append(f"      … and {rule.count - max_rows} more (see the report)")
        return "\n".join(lines)


def _where(fact: RowFacts) -> str:
    return f"manifest.csv line {fact.line} ({fact.path})" if fact.path else f"manifest.csv line {fact.line}"


@dataclass
class TaskContext:
    """What validation needs to know about earlier tasks."""

    known_classes: dict[str, str] = field(default_factory=dict)  # normalised class name -> task id
    seen_images: dict[str, str] = field(default_factory=dict)  # sha256 -> task id


def report_for_drop_error(task_id: str, source: str, error: DropError, checked_at: str) -> Report:
    rule = error.rule if error.rule in RULES else ("task-yaml" if "yaml" in error.rule else "manifest-readable")
    return Report(task_id=task_id, source=source, success=False, checked_at=checked_at, content_digest=None,
                  rules=[RuleResult(rule, False, RULES[rule], [Failure(str(error))])])


def validate(spec: TaskSpec, manifest: Manifest, facts: list[RowFacts], cfg: ValidationConfig, ctx: TaskContext,
             *, source: str, checked_at: str, digest: str | None, docs_dir: Path | None = None) -> Report:
    for fact in facts:
        if fact.sha256 and fact.sha256 in ctx.seen_images:
            fact.seen_in = ctx.seen_images[fact.sha256]
    results: dict[str, RuleResult] = {name: RuleResult(name, True, text) for name, text in RULES.items()
                                      if name not in ("task-yaml", "manifest-readable")}

    def fail(rule: str, message: str, fact: RowFacts | None = None) -> None:
        res = results[rule]
        res.success = False
        if fact is not None and any(f.line == fact.line for f in res.failures):
            return  # one message per row and rule
        res.failures.append(Failure(message, fact.line if fact else None, fact.path if fact else None))

    by_line = {f.line: f for f in facts}
    expectations = _run_gx(spec, manifest, facts, cfg, docs_dir)
    missing, extra = manifest.missing_columns, manifest.extra_columns
    declared = {normalise_class_name(n) for n in spec.class_names}
    lines_of: dict[str, list[int]] = {}
    for f in facts:
        if f.path:
            lines_of.setdefault(f.path, []).append(f.line)

    for exp in expectations:
        if exp["success"]:
            continue
        rule = exp["rule"]
        if rule == "columns":
            parts = []
            if missing:
                parts.append(f"missing column(s): {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected column(s): {', '.join(extra)}")
            fail("columns", f"manifest.csv: {'; '.join(parts) or 'columns do not match'} "
                            f"(expected path,label,split[,domain]; found {','.join(manifest.columns)})")
            continue
        if rule == "split-nonempty":
            continue  # phrased below from the counts
        for line in exp["lines"]:
            fact = by_line.get(line)
            if fact is None:
                continue
            fail(rule, _row_message(rule, fact, exp, cfg, spec, lines_of), fact)

    counts = {split: sum(1 for f in facts if f.split == split) for split in SPLITS}
    if not missing:
        for split in SPLITS:
            if counts[split] == 0:
                fail("split-nonempty", f"manifest.csv: the {split} split is empty (no row has split={split})")
        train_per_class = {key: 0 for key in declared}
        for f in facts:
            if f.split == "train" and f.label and normalise_class_name(f.label) in train_per_class:
                train_per_class[normalise_class_name(f.label)] += 1
        for name in spec.class_names:
            n = train_per_class[normalise_class_name(name)]
            if n < max(1, cfg.min_images_per_class):
                fail("class-has-train", f"task.yaml: class {name!r} has {n} training image(s); "
                                        f"at least {max(1, cfg.min_images_per_class)} needed")
    else:
        for rule in results.values():
            if rule.rule != "columns" and rule.success and rule.rule not in ("scenario-classes",):
                rule.skipped = "manifest columns are missing"

    _scenario_checks(spec, ctx, fail)
    rules = list(results.values())
    stats = {"rows": len(facts), "train": counts["train"], "test": counts["test"],
             "classes": len(spec.classes), "unique_images": len({f.sha256 for f in facts if f.sha256}),
             "bytes": sum(f.size or 0 for f in {f.path: f for f in facts if f.path}.values())}
    return Report(task_id=spec.task_id, source=source, success=all(r.success for r in rules), checked_at=checked_at,
                  content_digest=digest, rules=rules, stats=stats,
                  expectations=[{k: v for k, v in e.items() if k != "lines"} for e in expectations],
                  data_docs=str(docs_dir / "index.html") if docs_dir and (docs_dir / "index.html").exists() else None)


def _row_message(rule: str, fact: RowFacts, exp: dict, cfg: ValidationConfig, spec: TaskSpec,
                 lines_of: dict[str, list[int]]) -> str:
    where = _where(fact)
    if rule == "required-values":
        return f"{where}: column '{exp['column']}' is empty"
    if rule == "split-value":
        return f"{where}: split {fact.split!r} is not 'train' or 'test'"
    if rule == "label-declared":
        shown = ", ".join(spec.class_names[:10]) + (" …" if len(spec.classes) > 10 else "")
        return f"{where}: label {fact.label!r} is not declared in task.yaml (declared: {shown})"
    if rule == "duplicate-rows":
        others = [str(n) for n in lines_of.get(fact.path or "", []) if n != fact.line]
        return f"{where}: the same path is also listed on line(s) {', '.join(others)}"
    if rule == "path-safe":
        return f"{where}: {fact.path_problem}"
    if rule == "image-readable":
        return f"{where}: {fact.image_error or 'cannot be read'}"
    if rule == "image-format":
        return f"{where}: content is {fact.format}, not one of {', '.join(cfg.formats)}"
    if rule == "pixel-limit":
        return (f"{where}: {fact.width}×{fact.height} = {fact.pixels:,} pixels, over the limit of "
                f"{cfg.max_pixels:,} (validation.max_pixels)")
    if rule == "image-min-side":
        return f"{where}: {fact.width}×{fact.height} is smaller than {cfg.min_side} pixels on a side"
    if rule == "train-test-leak":
        return f"{where}: same image content as line {fact.leak_with}, which is in the other split"
    if rule == "seen-before":
        return f"{where}: same image content was already ingested in task {fact.seen_in}"
    return f"{where}: fails {rule}"


def _scenario_checks(spec: TaskSpec, ctx: TaskContext, fail: Callable[..., None]) -> None:
    declared = {normalise_class_name(n): n for n in spec.class_names}
    known = ctx.known_classes
    if spec.scenario == "class-incremental":
        for key, name in declared.items():
            if key in known:
                fail("scenario-classes", f"task.yaml: class {name!r} was already learned in task {known[key]} "
                                         f"of dataset {spec.dataset!r}; a class-incremental task brings new "
                                         f"classes only "
                                         f"(use scenario: domain-incremental for new data of known classes)")
    elif known:  # domain-incremental: same label space as the dataset's earlier tasks
        new = sorted(name for key, name in declared.items() if key not in known)
        absent = sorted(key for key in known if key not in declared)
        if new:
            fail("scenario-classes", f"task.yaml: domain-incremental task declares class(es) unknown to dataset "
                                     f"{spec.dataset!r}: {', '.join(new)}")
        if absent:
            fail("scenario-classes", f"task.yaml: domain-incremental task lacks known class(es) of dataset "
                                     f"{spec.dataset!r}: {', '.join(absent)}")


# ---- Great Expectations ----------------------------------------------------------------------------


def _run_gx(spec: TaskSpec, manifest: Manifest, facts: list[RowFacts], cfg: ValidationConfig,
            docs_dir: Path | None) -> list[dict[str, Any]]:
    """Run the suites; return one dict per expectation: rule, type, column, success, failing manifest lines."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    x = gx.expectations
    declared = spec.class_names
    manifest_cols = list(manifest.columns)
    rows = []
    for f in facts:
        row = {"line": f.line, "path": f.path, "label": f.label, "split": f.split}
        if "domain" in manifest.columns:
            row["domain"] = f.domain
        rows.append(row)
    kept = [c for c in manifest_cols if c in ("path", "label", "split", "domain")]
    manifest_df = pd.DataFrame(rows, columns=["line", *kept])
    present_extra = [c for c in manifest_cols if c not in manifest_df.columns]
    for col in present_extra:  # keep unexpected columns visible to the column check
        manifest_df[col] = None

    def meta(rule: str) -> dict:
        return {"rule": rule}

    expected_cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in manifest_cols]
    manifest_suite = [x.ExpectTableColumnsToMatchSet(column_set=["line", *expected_cols], exact_match=True,
                                                     meta=meta("columns"))]
    for col in REQUIRED_COLUMNS:
        if col in manifest_cols:
            manifest_suite.append(x.ExpectColumnValuesToNotBeNull(column=col, meta=meta("required-values")))
    if "split" in manifest_cols:
        manifest_suite += [x.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                                         meta=meta("split-value")),
                           x.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS),
                                                                    meta=meta("split-nonempty"))]
    if "label" in manifest_cols:
        # Labels match declared classes exactly as written; a near-miss ("Cat" vs "cat") is an error to fix.
        manifest_suite.append(x.ExpectColumnValuesToBeInSet(column="label", value_set=declared,
                                                             meta=meta("label-declared")))
    if "path" in manifest_cols:
        manifest_suite.append(x.ExpectColumnValuesToBeUnique(column="path", meta=meta("duplicate-rows")))

    image_rows = [{"line": f.line, "path": f.path, "path_problem": f.path_problem, "image_error": f.image_error,
                   "format": f.format if f.image_error is None and f.path_problem is None else None,
                   "pixels": f.pixels, "min_side": min(f.width, f.height) if f.width and f.height else None,
                   "leak": f.leak_with is not None, "seen_in": f.seen_in}
                  for f in facts if f.path]
    image_df = pd.DataFrame(image_rows, columns=["line", "path", "path_problem", "image_error", "format", "pixels",
                                                 "min_side", "leak", "seen_in"])
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
        context.add_data_docs_site(site_name="cliploop", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = context.data_sources.add_pandas(f"task-{spec.task_id}")
    definitions = []
    frames = {}
    for name, frame, expectations in (("manifest", manifest_df, manifest_suite), ("images", image_df, image_suite)):
        if not expectations:
            continue
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}-all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.task_id}.{name}", expectations=expectations))
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{spec.task_id}.{name}", data=batch, suite=suite)))
        frames[name] = frame
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if docs_dir is not None else []
    out: list[dict[str, Any]] = []
    # One checkpoint per table: a checkpoint run binds a single dataframe through its batch parameters.
    with contextlib.redirect_stderr(io.StringIO()):  # GX draws progress bars on stderr
        for definition in definitions:
            name = definition.name.rsplit(".", 1)[1]
            single = context.checkpoints.add(gx.Checkpoint(
                name=f"{definition.name}.cp", validation_definitions=[definition], actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]}))
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
                    out.append({"rule": (cfg_.meta or {}).get("rule"), "type": cfg_.type,
                                "column": cfg_.kwargs.get("column"), "success": bool(res.success),
                                "unexpected_count": (res.result or {}).get("unexpected_count"),
                                "lines": lines, "error": error or None})
    return out
