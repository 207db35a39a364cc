"""Validation of a task drop: the facts about every listed image, Great Expectations suites over them
and over the manifest, plus the checks that span tasks (scenario and class consistency, in
:mod:`components.intake.cross_task`). The result is
a :class:`~components.intake.validation_report.Report` (JSON, its rule catalogue and phrasing of a result live in
:mod:`components.intake.validation_report`) and GX's HTML data docs.

Each image is read once and probed by :mod:`components.intake.images` (format by content, pixel limit before
decoding, a full decode); :mod:`components.intake.expectations` then validates the tables of facts, so every
rule's failures come back as rows, which are phrased here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter
from pathlib import Path

from components.intake.cross_task import TaskContext, scenario_checks
from components.intake.expectations import run_expectations
from components.intake.images import SUFFIX, probe_image
from components.intake.label_doubt import LabelDoubts
from components.intake.label_doubt import judge as judge_doubts
from components.intake.tasks import (
    SPLITS,
    DropSource,
    Manifest,
    ManifestRow,
    TaskSpec,
    normalise_class_name,
    path_problem,
)
from components.intake.validation_report import (
    MAX_LISTED,
    MAX_ROWS_PER_RULE,
    RULES,
    Failure,
    Report,
    RuleResult,
    listing,
)
from components.settings.config import ValidationConfig
from components.support import storage


@dataclass(slots=True)
class RowFacts:
    """One manifest row with what was found about its image.

    One lives for every row while a drop is validated, a million of them for a million-row manifest, so they
    are lean: slots rather than a ``__dict__`` each, and the row's own fields read from its manifest row rather
    than copied.
    """

    row: ManifestRow
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
    def line(self) -> int:
        return self.row.line

    @property
    def path(self) -> str | None:
        return self.row.path or None

    @property
    def label(self) -> str | None:
        return self.row.label or None

    @property
    def split(self) -> str | None:
        return self.row.split or None

    @property
    def domain(self) -> str | None:
        return self.row.domain

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
    # Widths and heights repeat across a dataset; past 256 each int is an object of its own, so one is kept
    # per distinct value (56 bytes a row saved: 56 MB at a million rows of 224×224 images).
    sides: dict[int | None, int | None] = {}
    for row in manifest.rows:
        fact = RowFacts(row)
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
        fact.format, fact.image_error = probe.format, probe.error
        fact.width, fact.height = (
            sides.setdefault(probe.width, probe.width),
            sides.setdefault(probe.height, probe.height),
        )
        acceptable = (
            probe.error is None
            and probe.format in cfg.formats
            and fact.pixels is not None
            and fact.pixels <= cfg.max_pixels
        )
        if acceptable and sink is not None:
            sink(fact.sha256, SUFFIX[probe.format], data)
    del probed  # a row's worth of memory for every path: freed before the leak check builds its own
    _mark_leaks(facts)
    return facts


def _mark_leaks(facts: list[RowFacts]) -> None:
    # content -> first line, one dict per split (not one keyed by (content, split): a tuple per row)
    first_line: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for fact in facts:
        if fact.sha256 and fact.split in SPLITS:
            first_line[fact.split].setdefault(fact.sha256, fact.line)
    for fact in facts:
        if fact.sha256 and fact.split in SPLITS:
            other = "test" if fact.split == "train" else "train"
            fact.leak_with = first_line[other].get(fact.sha256)


def content_digest(spec_bytes: bytes, manifest_bytes: bytes, facts: list[RowFacts]) -> str:
    """Identity of a drop's payload: its metadata files and the content of every listed image.

    The SHA-256 of ``json.dumps({"images": sorted({(path, sha256 or "unreadable:<why>")}), "manifest.csv":
    <sha256>, "task.yaml": <sha256>}, sort_keys=True)``, hashed piece by piece as that text would be written:
    built whole, the text and its bytes took 200 MB at a million rows. (The ledger compares digests across
    runs, so the text may never change.)"""
    digest = hashlib.sha256(b'{"images": [')
    pieces: list[str] = []
    for item in _listed_images(facts):
        pieces.append(json.dumps(item))
        if len(pieces) == 10_000:
            digest.update((", ".join(pieces) + ", ").encode())
            pieces = []
    digest.update(", ".join(pieces).encode())
    metadata = {"manifest.csv": storage.sha256_bytes(manifest_bytes), "task.yaml": storage.sha256_bytes(spec_bytes)}
    digest.update(("], " + json.dumps(metadata, sort_keys=True)[1:]).encode())
    return digest.hexdigest()


def _listed_images(facts: list[RowFacts]) -> Iterator[tuple[str, str]]:
    """The distinct (path, sha256 or "unreadable:<why>") of the listed images, in sorted order."""
    listed = sorted((f for f in facts if f.path), key=attrgetter("path"))
    for path, rows in groupby(listed, key=attrgetter("path")):
        for content in sorted({f.sha256 or f"unreadable:{f.image_error or f.path_problem}" for f in rows}):
            yield path, content


def _where(fact: RowFacts) -> str:
    return f"manifest.csv line {fact.line} ({fact.path})" if fact.path else f"manifest.csv line {fact.line}"


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
    doubts: LabelDoubts | None = None,
) -> Report:
    """Every rule of :data:`~components.intake.validation_report.RULES` but the two about reading the metadata;
    ``doubts``: the training rows a model scored (:func:`components.intake.label_doubt.check_labels`; without
    them the ``label-doubt`` rule is skipped)."""
    for fact in facts:
        if fact.sha256 and fact.sha256 in ctx.seen_images:
            fact.seen_in = ctx.seen_images[fact.sha256]
    results: dict[str, RuleResult] = {
        name: RuleResult(name, True, text)
        for name, text in RULES.items()
        if name not in ("task-yaml", "manifest-readable")
    }

    def fail(rule: str, message: str, fact: RowFacts | None = None) -> None:
        results[rule].add(Failure(message, fact.line if fact else None, fact.path if fact else None))

    counts = {split: sum(1 for f in facts if f.split == split) for split in SPLITS}
    # Before the suites run, not after: the sets these take at a million rows then come and go while the memory
    # GX will need is still free.
    stats = {
        "rows": len(facts),
        "train": counts["train"],
        "test": counts["test"],
        "classes": len(spec.classes),
        "unique_images": len({f.sha256 for f in facts if f.sha256}),
        "bytes": sum(f.size or 0 for f in {f.path: f for f in facts if f.path}.values()),
    }
    expectations = run_expectations(spec, manifest, facts, cfg, docs_dir, MAX_ROWS_PER_RULE, doubts)
    missing, extra = manifest.missing_columns, manifest.extra_columns
    declared = {normalise_class_name(n) for n in spec.class_names}
    failed = [exp for exp in expectations if not exp["success"]]
    # Great Expectations lists the first failing rows of each expectation and counts the rest; only the listed
    # rows are phrased, so only they are looked up (a dict of every row would be as large as the facts).
    wanted = {line for exp in failed for line in exp["lines"]}
    by_line = {f.line: f for f in facts if f.line in wanted}
    duplicated = {
        by_line[n].path for exp in failed if exp["rule"] == "duplicate-rows" for n in exp["lines"] if n in by_line
    }
    lines_of = _lines_listing(facts, duplicated)

    for exp in failed:
        rule = exp["rule"]
        if rule == "columns":
            parts = []
            if missing:
                parts.append(f"missing column(s): {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected column(s): {listing(extra)}")
            fail(
                "columns",
                f"manifest.csv: {'; '.join(parts) or 'columns do not match'} "
                f"(expected path,label,split[,domain]; found {listing(list(manifest.columns), sep=',')})",
            )
            continue
        if rule in ("split-nonempty", "label-doubt"):
            continue  # phrased below, from the counts and from the doubts
        listed = 0
        for line in exp["lines"]:
            fact = by_line.get(line)
            if fact is None:
                continue
            fail(rule, _row_message(rule, fact, exp, cfg, spec, lines_of), fact)
            listed += 1
        # One problem per failing row and expectation (a row missing both label and split has two).
        results[rule].add_unlisted((exp["unexpected_count"] or 0) - listed)

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

    scenario_checks(spec, ctx, fail)
    judge_doubts(results["label-doubt"], doubts, expectations, cfg)
    rules = list(results.values())
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
        label_doubt=doubts.to_dict() if doubts is not None else None,
    )


def _lines_listing(facts: list[RowFacts], paths: set[str]) -> dict[str, tuple[list[int], int]]:
    """For each of ``paths``: its first lines (enough to name MAX_LISTED besides any one of them) and how many
    rows list it. One pass, whatever the number of duplicates: naming every other line in every duplicate
    row's message made a manifest of one path listed n times cost n² in time and memory."""
    first: dict[str, list[int]] = {p: [] for p in paths}
    total = dict.fromkeys(paths, 0)
    for f in facts:
        if f.path in first:
            total[f.path] += 1
            if len(first[f.path]) <= MAX_LISTED:
                first[f.path].append(f.line)
    return {p: (first[p], total[p]) for p in paths}


def _row_message(
    rule: str,
    fact: RowFacts,
    exp: dict,
    cfg: ValidationConfig,
    spec: TaskSpec,
    lines_of: dict[str, tuple[list[int], int]],
) -> str:
    where = _where(fact)
    if rule == "required-values":
        return f"{where}: column '{exp['column']}' is empty"
    if rule == "split-value":
        return f"{where}: split {fact.split!r} is not 'train' or 'test'"
    if rule == "label-declared":
        return f"{where}: label {fact.label!r} is not declared in task.yaml (declared: {listing(spec.class_names)})"
    if rule == "duplicate-rows":
        first, total = lines_of.get(fact.path or "", ([], 1))
        others = [str(n) for n in first if n != fact.line]
        return f"{where}: the same path is also listed on line(s) {listing(others, total - 1)}"
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
