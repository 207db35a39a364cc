"""Benchmark scenarios as data, and their conversion into task drops.

A scenario (``components/scenarios/<name>.json``) fixes what a paper's protocol fixes: the task order,
each task's classes (as indices into the source dataset's class list, stored, never re-drawn), the
splits (official, or a seeded random split over the dataset as torchvision lists it) and the prompt
templates. ``convert`` turns one into drops of the ordinary format (task.yaml with ``prompts``,
manifest.csv, PNG images) that ``cliploop ingest`` or ``cliploop learn`` take, on a machine where the
datasets are present or can be downloaded::

    cliploop scenario list
    cliploop scenario convert mtil-order1 --root ~/datasets --out drops/ [--download] [--limit-per-class 50]

Source kinds: ``torchvision`` (any ``torchvision.datasets`` class with its constructor arguments for
the train and test parts; ``test: null`` with a ``random`` split draws the test part from the whole
set) and ``domainnet`` (a local copy in the official layout: ``<domain>/<class>/<file>`` with
``<domain>_train.txt`` / ``<domain>_test.txt`` lines ``<path> <label>``). A random split keeps
``floor(n · (1 − test_fraction))`` items for training, as ``torch.utils.data.random_split`` with the
given seed orders them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCENARIO_DIR = Path(__file__).parent  # the scenarios' JSON files sit beside this module
COMPLETE = ".complete"  # written last: a drop folder with it is finished and is skipped on re-runs


class ScenarioError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    kind: Literal["torchvision", "domainnet"]
    class_: str | None = Field(None, alias="class")
    train: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    domain: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to both parts (e.g. FakeData's)


class SplitSpec(_Strict):
    kind: Literal["official", "random"]
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 42


class TaskSpecEntry(_Strict):
    task_id: str
    dataset: str
    scenario: Literal["class-incremental", "domain-incremental"]
    domain: str | None = None
    source: SourceSpec
    split: SplitSpec
    classes: list[int] | Literal["all"] = "all"
    prompts: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpecEntry:
        if self.source.kind == "torchvision" and not self.source.class_:
            raise ValueError("a torchvision source names its dataset class")
        if self.split.kind == "official" and self.source.kind == "torchvision" and self.source.test is None:
            raise ValueError("an official split needs the test part's arguments (source.test)")
        return self


class Scenario(_Strict):
    name: str
    description: str
    source: str
    class_names: list[str] | None = None  # the dataset's class list, when the scenario picks classes by index
    tasks: list[TaskSpecEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Scenario:
        ids = [t.task_id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise ValueError("task ids repeat")
        return self


def list_scenarios() -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["description"] for p in sorted(SCENARIO_DIR.glob("*.json"))}


def load_scenario(name_or_path: str | Path) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ScenarioError(f"no scenario {str(name_or_path)!r}; shipped: {', '.join(list_scenarios())}")
    try:
        return Scenario.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: {problems}") from None


# ---- reading sources ---------------------------------------------------------------------------------


@dataclass
class Part:
    """One split of a source: a way to get item i's image and class index, and the class names."""

    dataset: Any
    classes: list[str]
    targets: list[int]

    def image(self, i: int):
        return self.dataset[i][0]


def _targets(ds) -> list[int]:
    for attr in ("targets", "_labels", "labels", "y"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    return [int(ds[i][1]) for i in range(len(ds))]  # generic, slower: reads every item


def _torchvision_part(spec: SourceSpec, kwargs: dict[str, Any], root: Path, download: bool) -> Part:
    import torchvision

    cls = getattr(torchvision.datasets, spec.class_ or "", None)
    if cls is None:
        raise ScenarioError(f"torchvision.datasets has no {spec.class_!r}")
    args = {**spec.kwargs, **kwargs}
    if spec.class_ != "FakeData":
        args.update(root=str(root), download=download)
    try:
        ds = cls(**args)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted. You can use download=True"
        raise ScenarioError(f"{spec.class_} under {root}: {exc}") from None
    classes = list(
        getattr(ds, "classes", None)
        or getattr(ds, "categories", None)
        or [str(i) for i in range(args.get("num_classes", 0))]
    )
    return Part(ds, classes, _targets(ds))


class _DomainNetPart:
    def __init__(self, root: Path, domain: str, split: str):
        listing = root / f"{domain}_{split}.txt"
        if not listing.is_file():
            raise ScenarioError(f"DomainNet split file {listing} is missing (download DomainNet into --root)")
        self.root = root
        self.items = []
        names: dict[int, str] = {}
        for line in listing.read_text().splitlines():
            if line.strip():
                rel, label = line.rsplit(maxsplit=1)
                self.items.append((rel, int(label)))
                names.setdefault(int(label), rel.split("/")[1])
        self.classes = [names.get(i, str(i)) for i in range(max(names) + 1)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        rel, label = self.items[i]
        with Image.open(self.root / rel) as im:
            return im.convert("RGB"), label


def _parts(task: TaskSpecEntry, root: Path, download: bool) -> tuple[Part, list[int], Part, list[int]]:
    """(train part, its item indices, test part, its item indices)."""
    src = task.source
    if src.kind == "domainnet":
        train = _DomainNetPart(root, src.domain or task.domain or "", "train")
        test = _DomainNetPart(root, src.domain or task.domain or "", "test")
        tr = Part(train, train.classes, [label for _, label in train.items])
        te = Part(test, test.classes, [label for _, label in test.items])
        return tr, list(range(len(tr.targets))), te, list(range(len(te.targets)))
    train = _torchvision_part(src, src.train or {}, root, download)
    if task.split.kind == "official":
        test = _torchvision_part(src, src.test or {}, root, download)
        return train, list(range(len(train.targets))), test, list(range(len(test.targets)))
    import torch
    from torch.utils.data import random_split

    n = len(train.targets)
    n_train = int(n * (1 - task.split.test_fraction))
    first, second = random_split(
        range(n), [n_train, n - n_train], generator=torch.Generator().manual_seed(task.split.seed)
    )
    return train, list(first.indices), train, list(second.indices)


# ---- writing drops ----------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def convert_task(
    task: TaskSpecEntry,
    out_dir: Path,
    root: Path,
    download: bool = False,
    limit_per_class: int | None = None,
    say=print,
) -> Path:
    """Write one task drop (``out_dir/<task_id>/``); a finished one is left as it is."""
    final = Path(out_dir) / task.task_id
    if (final / COMPLETE).is_file():
        say(f"{task.task_id}: already converted")
        return final
    train, train_idx, test, test_idx = _parts(task, Path(root), download)
    wanted = set(range(len(train.classes))) if task.classes == "all" else set(task.classes)
    unknown = wanted - set(range(len(train.classes)))
    if unknown:
        raise ScenarioError(
            f"{task.task_id}: class indices {sorted(unknown)[:5]} are outside the dataset's "
            f"{len(train.classes)} classes"
        )
    tmp = final.with_name(f".{task.task_id}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "test"):
        (tmp / "images" / split).mkdir(parents=True)
    rows: list[list[str]] = []
    train_digests: set[str] = set()
    dropped_leaks = 0
    present: set[int] = set()
    for split, part, indices in (("train", train, train_idx), ("test", test, test_idx)):
        taken: dict[int, int] = {}
        for i in indices:
            label = part.targets[i]
            if label not in wanted or (limit_per_class and taken.get(label, 0) >= limit_per_class):
                continue
            data = _png(part.image(i))
            digest = hashlib.sha256(data).hexdigest()
            if split == "train":
                train_digests.add(digest)
                present.add(label)
            elif digest in train_digests:
                dropped_leaks += 1  # the same picture in both parts (some datasets list duplicates)
                continue
            taken[label] = taken.get(label, 0) + 1
            rel = f"images/{split}/{i:07d}.png"
            (tmp / rel).write_bytes(data)
            rows.append([rel, clean_name(part.classes[label]), split])
    order = [c for c in (range(len(train.classes)) if task.classes == "all" else task.classes) if c in present]
    spec = {
        "task_id": task.task_id,
        "scenario": task.scenario,
        "dataset": task.dataset,
        **({"domain": task.domain} if task.domain else {}),
        "classes": [clean_name(train.classes[c]) for c in order],
        **({"prompts": task.prompts} if task.prompts else {}),
    }
    (tmp / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    with open(tmp / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    (tmp / COMPLETE).write_text(json.dumps({"rows": len(rows), "test_duplicates_dropped": dropped_leaks}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    say(
        f"{task.task_id}: {len(rows)} images, {len(order)} classes"
        + (f" ({dropped_leaks} test images identical to training images left out)" if dropped_leaks else "")
    )
    return final


def convert(
    scenario: Scenario,
    out_dir: Path,
    root: Path,
    download: bool = False,
    limit_per_class: int | None = None,
    only: list[str] | None = None,
    say=print,
) -> list[Path]:
    tasks = [t for t in scenario.tasks if not only or t.task_id in only]
    if only and len(tasks) != len(set(only)):
        missing = set(only) - {t.task_id for t in tasks}
        raise ScenarioError(f"{scenario.name} has no task(s) {', '.join(sorted(missing))}")
    return [convert_task(t, out_dir, root, download, limit_per_class, say) for t in tasks]
