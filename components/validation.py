"""Validation of a task drop: the facts about every listed image, Great Expectations suites over them
and over the manifest, plus the checks that span tasks (scenario and class consistency). The result is
a :class:`~components.validation_report.Report` (JSON, its rule catalogue and phrasing of a result live in
:mod:`components.validation_report`) and GX's HTML data docs.

Each image is read once and probed by :mod:`components.images` (format by content, pixel limit before
decoding, a full decode); :mod:`components.expectations` then validates the tables of facts, so every
rule's failures come back as rows, which are phrased here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import storage
from components.config import ValidationConfig
from components.expectations import IMAGE_COLUMNS, run_expectations
from components.images import SUFFIX, probe_image
from components.tasks import SPLITS, DropSource, Manifest, TaskSpec, normalise_class_name, path_problem
from components.validation_report import RULES, Failure, Report, RuleResult


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


def scan_images(
    source: DropSource, manifest: Manifest, cfg: ValidationConfig, sink: ImageSink | None = None
) -> list[RowFacts]:
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
        except storage.StorageUnavailable:  # the store did not answer: say so (exit 4), never quarantine the task
            raise
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
        acceptable = (
            probe.error is None
            and probe.format in cfg.formats
            and fact.pixels is not None
            and fact.pixels <= cfg.max_pixels
        )
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
    listing = {
        "task.yaml": storage.sha256_bytes(spec_bytes),
        "manifest.csv": storage.sha256_bytes(manifest_bytes),
        "images": sorted(
            {(f.path, f.sha256 or f"unreadable:{f.image_error or f.path_problem}") for f in facts if f.path}
        ),
    }
    return storage.sha256_bytes(json.dumps(listing, sort_keys=True).encode())


def _where(fact: RowFacts) -> str:
    return f"manifest.csv line {fact.line} ({fact.path})" if fact.path else f"manifest.csv line {fact.line}"


@dataclass
class TaskContext:
    """What validation needs to know about earlier tasks."""

    known_classes: dict[str, str] = field(default_factory=dict)  # normalised class name -> task id
    seen_images: dict[str, str] = field(default_factory=dict)  # sha256 -> task id

    @classmethod
    def from_ledger(cls, ledger, dataset: str, task_id: str, facts: list[RowFacts]) -> TaskContext:
        """The classes and images the ledger's other tasks already hold (a task never clashes with itself)."""
        return cls(
            known_classes=ledger.known_classes(dataset, exclude_task=task_id),
            seen_images=ledger.tasks_holding([f.sha256 for f in facts if f.sha256], exclude_task=task_id),
        )


def validate(
    spec: TaskSpec,
    manifest: Manifest,
    facts: list[RowFacts],
    cfg: ValidationConfig,
    ctx: TaskContext,
    *,
    source: str,
    checked_at: str,
    digest: str | None,
    docs_dir: Path | None = None,
) -> Report:
    for fact in facts:
        if fact.sha256 and fact.sha256 in ctx.seen_images:
            fact.seen_in = ctx.seen_images[fact.sha256]
    results: dict[str, RuleResult] = {
        name: RuleResult(name, True, text)
        for name, text in RULES.items()
        if name not in ("task-yaml", "manifest-readable")
    }

    def fail(rule: str, message: str, fact: RowFacts | None = None) -> None:
        res = results[rule]
        res.success = False
        if fact is not None and any(f.line == fact.line for f in res.failures):
            return  # one message per row and rule
        res.failures.append(Failure(message, fact.line if fact else None, fact.path if fact else None))

    by_line = {f.line: f for f in facts}
    expectations = run_expectations(spec, manifest, *_tables(manifest, facts), cfg, docs_dir)
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
            fail(
                "columns",
                f"manifest.csv: {'; '.join(parts) or 'columns do not match'} "
                f"(expected path,label,split[,domain]; found {','.join(manifest.columns)})",
            )
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
                fail(
                    "class-has-train",
                    f"task.yaml: class {name!r} has {n} training image(s); "
                    f"at least {max(1, cfg.min_images_per_class)} needed",
                )
    else:
        for rule in results.values():
            if rule.rule != "columns" and rule.success and rule.rule not in ("scenario-classes",):
                rule.skipped = "manifest columns are missing"

    _scenario_checks(spec, ctx, fail)
    rules = list(results.values())
    stats = {
        "rows": len(facts),
        "train": counts["train"],
        "test": counts["test"],
        "classes": len(spec.classes),
        "unique_images": len({f.sha256 for f in facts if f.sha256}),
        "bytes": sum(f.size or 0 for f in {f.path: f for f in facts if f.path}.values()),
    }
    return Report(
        task_id=spec.task_id,
        source=source,
        success=all(r.success for r in rules),
        checked_at=checked_at,
        content_digest=digest,
        rules=rules,
        stats=stats,
        expectations=[{k: v for k, v in e.items() if k != "lines"} for e in expectations],
        data_docs=str(docs_dir / "index.html") if docs_dir and (docs_dir / "index.html").exists() else None,
    )


def _tables(manifest: Manifest, facts: list[RowFacts]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows the expectations run on: the manifest as read, and the facts of each listed image."""
    manifest_rows = []
    for f in facts:
        row = {"line": f.line, "path": f.path, "label": f.label, "split": f.split}
        if "domain" in manifest.columns:
            row["domain"] = f.domain
        manifest_rows.append(row)
    # format only for an image that was read and decoded: a refused file is reported by its own rule
    image_rows = [
        dict(
            zip(
                IMAGE_COLUMNS,
                (
                    f.line,
                    f.path,
                    f.path_problem,
                    f.image_error,
                    f.format if f.image_error is None and f.path_problem is None else None,
                    f.pixels,
                    min(f.width, f.height) if f.width and f.height else None,
                    f.leak_with is not None,
                    f.seen_in,
                ),
            )
        )
        for f in facts
        if f.path
    ]
    return manifest_rows, image_rows


def _row_message(
    rule: str, fact: RowFacts, exp: dict, cfg: ValidationConfig, spec: TaskSpec, lines_of: dict[str, list[int]]
) -> str:
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
        return (
            f"{where}: {fact.width}×{fact.height} = {fact.pixels:,} pixels, over the limit of "
            f"{cfg.max_pixels:,} (validation.max_pixels)"
        )
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
                fail(
                    "scenario-classes",
                    f"task.yaml: class {name!r} was already learned in task {known[key]} "
                    f"of dataset {spec.dataset!r}; a class-incremental task brings new "
                    f"classes only "
                    f"(use scenario: domain-incremental for new data of known classes)",
                )
    elif known:  # domain-incremental: same label space as the dataset's earlier tasks
        new = sorted(name for key, name in declared.items() if key not in known)
        absent = sorted(key for key in known if key not in declared)
        if new:
            fail(
                "scenario-classes",
                f"task.yaml: domain-incremental task declares class(es) unknown to dataset "
                f"{spec.dataset!r}: {', '.join(new)}",
            )
        if absent:
            fail(
                "scenario-classes",
                f"task.yaml: domain-incremental task lacks known class(es) of dataset "
                f"{spec.dataset!r}: {', '.join(absent)}",
            )
