"""The learner state: everything needed to predict and to continue, saved as one versioned bundle.

```
state/
  manifest.json                 format, method, backbone reference, class table, tasks, files {path: sha256}
  backbone.safetensors          only when the method changed the weights
  pools/<task_id>.safetensors   LVP pools (+ pools/<task_id>.json)
  method/tensors.safetensors    the method's own tensors; method/settings.json its settings;
                                method/state.json its per-task state that is not tensors (e.g. exemplar ids)
  history.json                  the accuracy matrix so far (so the next task appends a row)
```
Safetensors and JSON only: nothing is unpickled. Loading verifies every file's SHA-256 and refuses a
bundle of another format, or one made for another backbone than the caller expects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.support import storage

FORMAT = 1
MANIFEST = "manifest.json"


class StateError(RuntimeError):
    """A bundle is missing, corrupt, of another format, or for another backbone."""


@dataclass(frozen=True)
class ClassEntry:
    index: int
    key: str  # "<dataset>/<normalised name>": identity across tasks
    name: str  # display name, as first declared
    dataset: str
    task_id: str  # the task that first declared it


@dataclass
class LearnerState:
    method: str
    backbone: dict[str, Any]  # {name, pretrained | path | uri, sha256}
    classes: list[ClassEntry] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # learned tasks, in order
    weights: dict[str, torch.Tensor] | None = None  # the backbone's state dict when it changed
    pools: dict[str, Any] = field(default_factory=dict)  # task_id -> pools.TaskPool
    method_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    method_settings: dict[str, Any] = field(default_factory=dict)
    method_meta: dict[str, Any] = field(default_factory=dict)  # JSON half of the method's per-task state
    history: dict[str, Any] = field(default_factory=dict)  # accuracy matrix so far (metrics.AccuracyMatrix dict)

    # ---- class table -----------------------------------------------------------------------------

    def class_index(self) -> dict[str, ClassEntry]:
        return {c.key: c for c in self.classes}

    def add_classes(self, task_id: str, dataset: str, keys_and_names: list[tuple[str, str]]) -> list[ClassEntry]:
        """Append the task's classes that are new (domain-incremental tasks bring none)."""
        known = self.class_index()
        added = []
        for key, name in keys_and_names:
            if key not in known:
                entry = ClassEntry(len(self.classes), key, name, dataset, task_id)
                self.classes.append(entry)
                known[key] = entry
                added.append(entry)
        return added

    @property
    def task_ids(self) -> list[str]:
        return [t["task_id"] for t in self.tasks]

    # ---- persistence -----------------------------------------------------------------------------

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the bundle to ``folder`` atomically (a crash leaves the old bundle or the new one)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            files: dict[str, str] = {}
            if self.weights is not None:
                save_file(_contiguous(self.weights), str(tmp / "backbone.safetensors"))
            for _, pool in sorted(self.pools.items()):
                pool.save(tmp / "pools")
            if self.method_tensors:
                (tmp / "method").mkdir(exist_ok=True)
                save_file(_contiguous(self.method_tensors), str(tmp / "method" / "tensors.safetensors"))
            if self.method_settings:
                (tmp / "method").mkdir(exist_ok=True)
                storage.atomic_write_text(
                    tmp / "method" / "settings.json",
                    json.dumps(self.method_settings, indent=2, sort_keys=True, default=str),
                )
            if self.method_meta:
                (tmp / "method").mkdir(exist_ok=True)
                storage.atomic_write_text(
                    tmp / "method" / "state.json", json.dumps(self.method_meta, indent=2, sort_keys=True, default=str)
                )
            storage.atomic_write_text(tmp / "history.json", json.dumps(self.history, indent=2, default=str))
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                files[path.relative_to(tmp).as_posix()] = storage.sha256_file(path)
            manifest = {
                "format": FORMAT,
                "method": self.method,
                "backbone": self.backbone,
                "classes": [asdict(c) for c in self.classes],
                "tasks": self.tasks,
                "files": files,
            }
            storage.atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
            _swap_in(tmp, folder)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path, expect_backbone: dict[str, Any] | None = None) -> LearnerState:
        from safetensors.torch import load_file

        from components.model.pools import TaskPool

        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        if expect_backbone is not None:
            check_backbone(manifest["backbone"], expect_backbone, folder)
        weights = (
            load_file(str(folder / "backbone.safetensors")) if "backbone.safetensors" in manifest["files"] else None
        )
        pools = {}
        for rel in manifest["files"]:
            if rel.startswith("pools/") and rel.endswith(".safetensors"):
                task_id = rel[len("pools/") : -len(".safetensors")]
                pools[task_id] = TaskPool.load(folder / "pools", task_id)
        method_dir = folder / "method"
        tensors = (
            load_file(str(method_dir / "tensors.safetensors"))
            if "method/tensors.safetensors" in manifest["files"]
            else {}
        )
        settings = (
            json.loads((method_dir / "settings.json").read_text())
            if "method/settings.json" in manifest["files"]
            else {}
        )
        meta = json.loads((method_dir / "state.json").read_text()) if "method/state.json" in manifest["files"] else {}
        history = json.loads((folder / "history.json").read_text()) if "history.json" in manifest["files"] else {}
        return cls(
            method=manifest["method"],
            backbone=manifest["backbone"],
            classes=[ClassEntry(**c) for c in manifest["classes"]],
            tasks=manifest["tasks"],
            weights=weights,
            pools=pools,
            method_tensors=tensors,
            method_settings=settings,
            method_meta=meta,
            history=history,
        )


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StateError(f"{folder} is not a learner-state bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise StateError(f"{folder}: bundle format {manifest.get('format')!r}, this cliploop reads format {FORMAT}")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    for rel, expected in manifest["files"].items():
        path = Path(folder) / rel
        if not path.is_file():
            raise StateError(f"{folder}: {rel} is listed in the manifest but missing")
        actual = storage.sha256_file(path)
        if actual != expected:
            raise StateError(f"{folder}: {rel} has sha256 {actual}, the manifest says {expected} (corrupt or altered)")


def check_backbone(found: dict[str, Any], expected: dict[str, Any], where: Path | str) -> None:
    keys = [k for k in ("name", "sha256") if expected.get(k) is not None]
    mismatched = [k for k in keys if found.get(k) != expected.get(k)]
    if mismatched:
        raise StateError(f"{where}: made for backbone {found}, not for {expected} (differs in {', '.join(mismatched)})")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _swap_in(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
