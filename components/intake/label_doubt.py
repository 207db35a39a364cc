"""Labels the model doubts: the training rows of a drop whose label a model contradicts with high confidence.

No per-row rule can see a cat photo labelled ``coffee``; a model that knows both classes can. Each training image
is scored over the drop's declared classes by a :class:`LabelScorer` (at ingestion: the registry's champion, or
the base model while there is none; built above this area, ``components/pipeline/label_scoring.py``), and a row is
doubted when both hold:

- confident learning (Northcutt et al., "Confident Learning: Estimating Uncertainty in Dataset Labels", 2021) puts
  it off the diagonal of the confident joint: with ``t_j``, the mean probability of class ``j`` over the rows
  labelled ``j``, the row counts towards the class ``argmax { p_j : p_j >= t_j }``, and that is not its label
  (cleanlab's ``find_label_issues(filter_by="confident_learning")``);
- the model's top class is not the label and its probability is at least ``validation.label_doubt_confidence``:
  the per-class thresholds adapt to a model that is unsure of everything, so without this floor an uninformed model
  would doubt half the drop.

Only scores come in; what to do about the doubted rows (warn or quarantine, and above what share) is the
``label-doubt`` expectation's (:mod:`components.intake.expectations`, phrased in
:mod:`components.intake.validation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from components.intake.tasks import TaskSpec, normalise_class_name
from components.intake.validation_report import Failure, RuleResult
from components.support import storage

if TYPE_CHECKING:
    from components.intake.validation import RowFacts
    from components.settings.config import ValidationConfig

# Confident learning assumes a model that is mostly right: on a domain it has not seen, the demo's base model agreed
# with 15% of the digits' labels and doubted 43% of the clean ones (docs/benchmarks.md). Below this share of
# agreement the check says so instead of judging.
MIN_AGREEMENT = 0.5
BATCH = 256  # images handed to the scorer at once: bounded memory whatever the drop's size


class LabelScorer(Protocol):
    """A model's class probabilities for images: ``(dataset, class names, encoded images) -> (n, k) array`` whose
    rows sum to 1, column j for ``class_names[j]``. ``name`` says which model it is (in the report)."""

    name: str

    def __call__(self, dataset: str, class_names: list[str], images: list[bytes]) -> np.ndarray: ...


@dataclass
class Doubt:
    line: int
    path: str
    label: str
    suggested: str  # the class the model gives the image
    confidence: float  # the model's probability of ``suggested``
    label_probability: float  # and of the row's own label


@dataclass
class LabelDoubts:
    """The label-doubt section of a validation report."""

    model: str | None  # which model scored the images; None when none did
    scored: int = 0  # training rows scored
    train_rows: int = 0  # training rows with a readable image and a declared label
    min_confidence: float = 0.0
    doubts: list[Doubt] = field(default_factory=list)
    not_checked: str | None = None  # why no row was scored
    agreement: float | None = None  # share of the scored rows whose label is the model's top class
    lines: list[int] = field(default_factory=list)  # manifest lines of the scored rows, in scoring order

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["lines"]  # the rows are the manifest's; the report lists only the doubted ones
        return out


def confident_doubts(labels: np.ndarray, probs: np.ndarray, min_confidence: float) -> np.ndarray:
    """Indices of the rows whose label the model contradicts with high confidence (the rule in the module's
    docstring), most confident contradiction first. ``labels``: class index per row; ``probs``: (n, k)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(labels)} labels")
    if len(labels) == 0 or probs.shape[1] < 2:
        return np.zeros(0, dtype=np.int64)
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():  # cleanlab warns about small classes; the floor below decides anyway
        warnings.simplefilter("ignore")
        off_diagonal = find_label_issues(labels, probs, filter_by="confident_learning")
    top = probs.argmax(axis=1)
    confident = probs[np.arange(len(top)), top] >= min_confidence
    rows = np.flatnonzero(off_diagonal & confident & (top != labels))
    return rows[np.argsort(-probs[rows, top[rows]], kind="stable")]


def check_labels(
    spec: TaskSpec,
    facts: Sequence[RowFacts],
    read: Callable[[RowFacts], bytes],
    scorer: LabelScorer | None,
    cfg: ValidationConfig,
) -> LabelDoubts:
    """Score the drop's training rows with ``scorer`` and find the doubted ones.

    ``read``: a row's image bytes (at ingestion, from the staged shards). Rows scored: training rows with a
    declared label and an image that was read, at most ``cfg.label_doubt_max_images`` of them, evenly spread over
    the manifest. A scorer that fails leaves the section saying why, and the drop is judged on its other rules;
    a storage outage is raised (the run stops, safe to re-run)."""
    classes = list(spec.class_names)
    index = {normalise_class_name(name): i for i, name in enumerate(classes)}
    rows = [f for f in facts if f.split == "train" and _stored(f, cfg) and normalise_class_name(f.label) in index]
    result = LabelDoubts(model=None, train_rows=len(rows), min_confidence=cfg.label_doubt_confidence)
    if cfg.label_doubt == "off":
        result.not_checked = "validation.label_doubt is off"
        return result
    if scorer is None:
        result.not_checked = "no model scored this drop (labels are checked against the champion at ingestion)"
        return result
    if len(classes) < 2:
        result.not_checked = "the task declares one class: no label to contradict"
        return result
    if not rows:
        result.not_checked = "no training row to score"
        return result
    if len(rows) > cfg.label_doubt_max_images:
        picks = np.linspace(0, len(rows) - 1, cfg.label_doubt_max_images).round().astype(int)
        rows = [rows[i] for i in np.unique(picks)]
    try:
        parts = []
        for start in range(0, len(rows), BATCH):
            batch = rows[start : start + BATCH]
            probs = np.asarray(scorer(spec.dataset, classes, [read(f) for f in batch]), dtype=np.float64)
            if probs.shape != (len(batch), len(classes)):
                raise ValueError(f"the model gave scores of shape {probs.shape}, not {(len(batch), len(classes))}")
            parts.append(probs)
    except storage.StorageUnavailable:
        raise
    except Exception as exc:  # the model, not the drop: say so in the report, never quarantine for it
        result.model = getattr(scorer, "name", None)
        result.not_checked = f"the model could not score the images: {type(exc).__name__}: {exc}"
        return result
    result.model = getattr(scorer, "name", None)  # a scorer may know its model only once loaded
    probs = np.concatenate(parts)
    labels = np.array([index[normalise_class_name(f.label)] for f in rows])
    result.agreement = round(float(np.mean(probs.argmax(axis=1) == labels)), 4)
    if result.agreement < MIN_AGREEMENT:
        result.not_checked = (
            f"the model agrees with only {result.agreement:.0%} of the training labels (under {MIN_AGREEMENT:.0%}): "
            "it does not know these images (a new domain?), so its doubts would be guesses"
        )
        return result
    result.scored, result.lines = len(rows), [f.line for f in rows]
    for i in confident_doubts(labels, probs, cfg.label_doubt_confidence):
        top = int(probs[i].argmax())
        result.doubts.append(
            Doubt(
                line=rows[i].line,
                path=rows[i].path,
                label=rows[i].label,
                suggested=classes[top],
                confidence=round(float(probs[i, top]), 4),
                label_probability=round(float(probs[i, labels[i]]), 4),
            )
        )
    return result


def _stored(fact: RowFacts, cfg: ValidationConfig) -> bool:
    """Whether the row's image was accepted into the drop's shards (what ``scan_images`` hands its sink)."""
    return bool(
        fact.label
        and fact.sha256
        and fact.image_error is None
        and fact.path_problem is None
        and fact.format in cfg.formats
        and fact.pixels is not None
        and fact.pixels <= cfg.max_pixels
    )


def judge(rule: RuleResult, doubts: LabelDoubts | None, expectations: list[dict], cfg: ValidationConfig) -> None:
    """The ``label-doubt`` rule's verdict from its expectation's result: nothing when at most
    ``label_doubt_max_share`` of the scored labels are doubted; past that, a warning naming the first rows, or
    (``label_doubt: quarantine``) one failure per doubted row."""
    if doubts is None or not doubts.scored:
        rule.skipped = (doubts.not_checked if doubts else None) or "no model scored this drop"
        return
    result = next((e for e in expectations if e["rule"] == "label-doubt"), None)
    if result is None or result["success"] or not doubts.doubts:
        return
    if cfg.label_doubt == "quarantine":
        for doubt in doubts.doubts:
            rule.add(Failure(_phrase(doubt), doubt.line, doubt.path))
        return
    n = len(doubts.doubts)
    rule.warning = (
        f"{n} of {doubts.scored} training labels doubted by {doubts.model} ({n / doubts.scored:.1%}, over "
        f"validation.label_doubt_max_share {cfg.label_doubt_max_share:.1%}): "
        + "; ".join(_phrase(d) for d in doubts.doubts[:3])
        + (f"; and {n - 3:,} more in the report's label_doubt section" if n > 3 else "")
    )


def _phrase(doubt: Doubt) -> str:
    return (
        f"manifest.csv line {doubt.line} ({doubt.path}): labelled {doubt.label!r}, but the model gives "
        f"{doubt.suggested!r} p={doubt.confidence:.2f} ({doubt.label!r}: p={doubt.label_probability:.2f})"
    )
