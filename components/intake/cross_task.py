"""The checks of a drop that span tasks: what the ledger's other tasks already hold (:class:`TaskContext`), and
whether the drop's classes fit its scenario beside them. Part of :func:`components.intake.validation.validate`,
which phrases every other rule; kept apart because these read the ledger's history, not the drop alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from components.intake.class_names import SAME_NAME, confusable_key, shown
from components.intake.tasks import TaskSpec, normalise_class_name
from components.intake.validation_report import listing

if TYPE_CHECKING:
    from components.intake.validation import RowFacts


@dataclass
class TaskContext:
    """What validation needs to know about earlier tasks."""

    known_classes: dict[str, str] = field(default_factory=dict)  # normalised class name -> task id
    seen_images: dict[str, str] = field(default_factory=dict)  # sha256 -> task id

    @classmethod
    def from_ledger(cls, ledger, dataset: str, task_id: str, facts: Sequence[RowFacts]) -> TaskContext:
        """The classes and images the ledger's other tasks already hold (a task never clashes with itself)."""
        return cls(
            known_classes=ledger.known_classes(dataset, exclude_task=task_id),
            seen_images=ledger.tasks_holding([f.sha256 for f in facts if f.sha256], exclude_task=task_id),
        )


def scenario_checks(spec: TaskSpec, ctx: TaskContext, fail: Callable[..., None]) -> None:
    declared = {normalise_class_name(n): n for n in spec.class_names}
    known = ctx.known_classes
    # A declared class that is not a known one yet reads as one (after NFKC, case folding, without invisible
    # characters) would be a second class under the first one's name, whatever the scenario.
    look_alikes = {confusable_key(key): key for key in known}
    confused: dict[str, str] = {}  # declared key -> the known key it reads as
    for key, name in declared.items():
        twin = look_alikes.get(confusable_key(name))
        if twin is not None and key not in known:
            confused[key] = twin
            fail(
                "scenario-classes",
                f"task.yaml: class {shown(name)} and class {shown(twin)} of task {known[twin]} (dataset "
                f"{spec.dataset!r}) are {SAME_NAME}; use the known name as it is written, or a visibly different one",
            )
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
        new = sorted(name for key, name in declared.items() if key not in known and key not in confused)
        absent = sorted(key for key in known if key not in declared and key not in confused.values())
        if new:
            fail(
                "scenario-classes",
                f"task.yaml: domain-incremental task declares class(es) unknown to dataset "
                f"{spec.dataset!r}: {listing(new)}",
            )
        if absent:
            fail(
                "scenario-classes",
                f"task.yaml: domain-incremental task lacks known class(es) of dataset "
                f"{spec.dataset!r}: {listing(absent)}",
            )
