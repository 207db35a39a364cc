"""The glyph proving ground's data: a pretraining corpus and a continual sequence, as ordinary task drops.

Everything follows from a :class:`GlyphBench` (a seed and every size), so the same settings write the same
bytes. From the look-alike-free glyph classes (``components.scenarios.glyphs.candidates``), shuffled by the seed:

- ``pretrain``: the corpus the base model is pretrained on (``pretrain_classes`` classes, in the
  pretraining domains: filled, outlined, blurred, faded);
- ``reference``: a few images per pretraining class, in the same domains (what ZSCL and GNSP distil on,
  ``method.settings.reference_set``);
- the continual sequence, on classes pretraining never saw and in domains it never saw (``domains``, taken
  in turn): ``tasks - 1`` class-incremental tasks (``task_classes`` new classes each, one new domain each),
  then one domain-incremental task (every class of those tasks again, in another new domain);
- ``heldout``: classes that neither pretraining nor any task uses, in the pretraining domains: the
  zero-shot set (``evaluation.zero_shot_set``), whose accuracy before and after shows what a method keeps.

Every image is rendered from a generator seeded by (seed, split, class, image), so a drop does not depend
on the order it is written in. Drops are written as ``cliploop scenario glyphs --out DIR`` does.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.scenarios import glyphs
from components.scenarios.glyphs import Glyph

DATASET = "glyphs"
# The held-out and reference sets are datasets of their own: cliploop scores a test set among the classes of
# its dataset that the learner knows, so under the tasks' name the held-out set's label space would grow
# with every task and its accuracy before and after would not compare.
HELDOUT_DATASET, REFERENCE_DATASET = "glyphs-heldout", "glyphs-pretraining"
PROMPT = "a glyph of {}"
SPLIT_CODES = {"pretrain": 1, "reference": 2, "task": 3, "heldout": 4}


class GlyphBench(BaseModel):
    """The benchmark's settings: a seed and every size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="the sequence: which classes its tasks and the held-out set get, and their images")
    pretrain_seed: int = Field(0, description="the pretraining classes and images (and so the base model)")
    pretrain_classes: int = Field(737, ge=2)
    pretrain_per_class: int = Field(48, ge=1, description="pretraining images per class")
    reference_per_class: int = Field(2, ge=1, description="reference-set images per pretraining class")
    tasks: int = Field(4, ge=2, description="tasks of the sequence: all but the last class-incremental")
    task_classes: int = Field(10, ge=2, description="new classes per class-incremental task")
    train_per_class: int = Field(40, ge=1)
    test_per_class: int = Field(15, ge=1)
    heldout_classes: int = Field(20, ge=2, description="classes of the zero-shot set (its label space)")
    heldout_per_class: int = Field(30, ge=1, description="zero-shot set test images per class")
    # Pixelated is left out by default: drawn at 10 x 10 and blown up to 32, little of a character's shape is left
    # (look at a drop's images), so a task in it tests the resolution more than the method.
    domains: tuple[str, ...] = Field(
        tuple(d for d in glyphs.NEW_DOMAINS if d != "pixelated"),
        min_length=2,
        description="the domains the sequence's tasks take, in turn from a seed-chosen start (none of pretraining's)",
    )

    @field_validator("domains")
    @classmethod
    def _new_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [d for d in value if d not in glyphs.NEW_DOMAINS]
        if unknown:
            raise ValueError(f"not a domain pretraining never saw: {unknown} (choose from {list(glyphs.NEW_DOMAINS)})")
        return value


@dataclass(frozen=True)
class TaskPlan:
    task_id: str
    scenario: str  # class-incremental | domain-incremental
    domain: str
    classes: tuple[int, ...]  # indices into glyphs.candidates()


@dataclass(frozen=True)
class Plan:
    pretrain: tuple[int, ...]
    tasks: tuple[TaskPlan, ...]
    heldout: tuple[int, ...]

    def task_classes(self) -> set[int]:
        return {c for t in self.tasks for c in t.classes}


def plan(bench: GlyphBench) -> Plan:
    """Which classes go where: disjoint by construction (pretraining, tasks, held-out)."""
    pool = glyphs.candidates()
    n_cil = bench.tasks - 1
    needed = bench.pretrain_classes + n_cil * bench.task_classes + bench.heldout_classes
    if needed > len(pool):
        raise ValueError(f"the benchmark needs {needed} classes; the packaged fonts give {len(pool)}")
    # The pretraining classes follow pretrain_seed alone, so one base model serves every sequence seed.
    order = [int(i) for i in np.random.default_rng([bench.pretrain_seed, 0]).permutation(len(pool))]
    pretrain, rest = order[: bench.pretrain_classes], order[bench.pretrain_classes :]
    if bench.seed != bench.pretrain_seed:
        rest = [rest[int(i)] for i in np.random.default_rng([bench.seed, 1]).permutation(len(rest))]
    domains = [bench.domains[(bench.seed + i) % len(bench.domains)] for i in range(bench.tasks)]
    tasks = []
    for i in range(n_cil):
        chosen = tuple(rest[i * bench.task_classes : (i + 1) * bench.task_classes])
        tasks.append(TaskPlan(f"glyphs-{i + 1}-{domains[i]}", "class-incremental", domains[i], chosen))
    last = domains[n_cil]
    # A domain-incremental task keeps the dataset's label space: every class learned so far, in a new domain.
    learned = tuple(c for t in tasks for c in t.classes)
    tasks.append(TaskPlan(f"glyphs-{bench.tasks}-{last}", "domain-incremental", last, learned))
    used = n_cil * bench.task_classes
    heldout = tuple(rest[used : used + bench.heldout_classes])
    return Plan(tuple(pretrain), tuple(tasks), heldout)


def _rng(bench: GlyphBench, split: str, klass: int, index: int, task: int = 0) -> np.random.Generator:
    seed = bench.pretrain_seed if split in ("pretrain", "reference") else bench.seed
    return np.random.default_rng([seed, SPLIT_CODES[split], task, klass, index])


def sample(
    bench: GlyphBench, split: str, klass: int, index: int, domains: tuple[str, ...], task: int = 0
) -> tuple[np.ndarray, glyphs.Style, np.random.Generator]:
    """One image of a class: its pixels, its style, and the generator (for a caption drawn after it)."""
    glyph = glyphs.candidates()[klass]
    rng = _rng(bench, split, klass, index, task)
    style = glyphs.draw_style(rng, glyph, domains)
    return glyphs.render(glyph, style), style, rng


def pretrain_items(bench: GlyphBench) -> Iterator[tuple[int, np.ndarray, str]]:
    """(class position in plan.pretrain, pixels, caption) of the pretraining corpus, class by class."""
    pool = glyphs.candidates()
    for position, klass in enumerate(plan(bench).pretrain):
        for index in range(bench.pretrain_per_class):
            pixels, style, rng = sample(bench, "pretrain", klass, index, glyphs.PRETRAIN_DOMAINS)
            yield position, pixels, glyphs.caption(pool[klass], style, rng)


# ---- drops --------------------------------------------------------------------------------------------


def _write_drop(
    root: Path,
    task_id: str,
    scenario: str,
    domain: str,
    classes: list[Glyph],
    images: Iterator[tuple[str, str, np.ndarray]],
    dataset: str = DATASET,
) -> Path:
    """A drop of the ordinary format: task.yaml, manifest.csv, images/ (a finished one is replaced)."""
    folder = root / task_id
    tmp = root / f".{task_id}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    spec = {
        "task_id": task_id,
        "scenario": scenario,
        "dataset": dataset,
        "domain": domain,
        "classes": [{"name": g.name, "description": f"the character {g.char!r} ({g.family})"} for g in classes],
        "prompts": [PROMPT],
    }
    (tmp / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    seen: set[bytes] = set()
    with open(tmp / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        for n, (split, label, pixels) in enumerate(images):
            data = glyphs.png(pixels)
            if data in seen:  # a repeated picture would leak between splits: drop the repeat
                continue
            seen.add(data)
            rel = f"images/{split}-{n:06d}.png"
            (tmp / rel).write_bytes(data)
            writer.writerow([rel, label, split])
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _images(
    bench: GlyphBench, split: str, classes: tuple[int, ...], counts: dict[str, int], domains, task: int = 0
) -> Iterator[tuple[str, str, np.ndarray]]:
    pool = glyphs.candidates()
    for klass in classes:
        index = 0
        for part, count in counts.items():
            for _ in range(count):
                yield part, pool[klass].name, sample(bench, split, klass, index, domains, task)[0]
                index += 1


def write_bench(bench: GlyphBench, out: Path, include_pretrain: bool = False, say=print) -> dict[str, object]:
    """Write the drops under ``out`` and a ``bench.json`` that says what is where; returns that document.

    The pretraining corpus (``include_pretrain``) is large and only the base model reads it, which
    renders it in memory (``pretrain_items``): it is written only when asked."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = glyphs.candidates()
    p = plan(bench)
    pick = lambda idx: [pool[i] for i in idx]  # noqa: E731
    written: dict[str, object] = {"settings": bench.model_dump(), "classes": glyphs.fingerprint(pool)}
    if include_pretrain:
        counts = {"train": bench.pretrain_per_class - 1, "test": 1}
        images = _images(bench, "pretrain", p.pretrain, counts, glyphs.PRETRAIN_DOMAINS)
        _write_drop(
            out, "glyphs-pretrain", "class-incremental", "pretraining", pick(p.pretrain), images, REFERENCE_DATASET
        )
        written["pretrain"] = "glyphs-pretrain"
    counts = {"train": bench.reference_per_class, "test": 1}
    images = _images(bench, "reference", p.pretrain, counts, glyphs.PRETRAIN_DOMAINS)
    _write_drop(
        out, "glyphs-reference", "class-incremental", "pretraining", pick(p.pretrain), images, REFERENCE_DATASET
    )
    written["reference"] = "glyphs-reference"
    tasks = []
    for i, t in enumerate(p.tasks):
        counts = {"train": bench.train_per_class, "test": bench.test_per_class}
        images = _images(bench, "task", t.classes, counts, (t.domain,), task=i + 1)
        _write_drop(out, t.task_id, t.scenario, t.domain, pick(t.classes), images)
        tasks.append(t.task_id)
        say(f"{t.task_id}: {len(t.classes)} classes, {t.scenario}, domain {t.domain}")
    written["tasks"] = tasks
    counts = {"train": 1, "test": bench.heldout_per_class}
    images = _images(bench, "heldout", p.heldout, counts, glyphs.PRETRAIN_DOMAINS)
    _write_drop(out, "glyphs-heldout", "class-incremental", "pretraining", pick(p.heldout), images, HELDOUT_DATASET)
    written["heldout"] = "glyphs-heldout"
    (out / "bench.json").write_text(json.dumps(written, indent=2) + "\n")
    return written
