"""The tensor store (``components/registry/tensor_store.py``) where the pipeline meets it: which store a
configuration's blobs go to, the base model's own tensors (never stored as blobs), a step's bundle turned into
manifests before it is published, and a version's bundle made whole again where it is loaded (the next night's
parent, ``cliploop predict``, the served pyfunc).

A bundle without tensor manifests (a version registered before blobs, or a method that stores no tensors) is
loaded as it is."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.registry import tensor_store
from components.registry.blob_store import BlobStore, candidates
from components.settings.config import Config
from components.support import storage

_BASE: dict[str, dict[str, Any]] = {}  # the last base model's tensors and digests, by what names it


def store_root(config: Config) -> str:
    """The configuration's artifact store (``artifacts.root``, else the workspace's ``.cliploop``), made nowhere."""
    from components.intake.workspace import workspace_paths

    return config.location(config.artifacts.root) if config.artifacts.root else str(workspace_paths(config)["state"])


def blob_store(config: Config) -> BlobStore:
    from components.intake.workspace import s3_settings

    return BlobStore(store_root(config), s3_settings(config))


def _base(model_cfg, s3: storage.S3Settings | None) -> dict[str, Any]:
    """The base model's state dict as a run trains from it (on the CPU, float32: the same on every machine)."""
    key = json.dumps([model_cfg.name, model_cfg.pretrained, model_cfg.checkpoint, model_cfg.sha256])
    if key not in _BASE:
        from components.model.backbones import load_backbone

        _BASE.clear()  # one base model at a time: a ViT-B/16 is 600 MB
        cpu = model_cfg.model_copy(update={"device": "cpu", "precision": "fp32"})
        tensors = load_backbone(cpu, s3).model.state_dict()
        _BASE[key] = {"tensors": {k: v.detach() for k, v in tensors.items()}, "digests": None}
    return _BASE[key]


def base_tensors(model_cfg, s3: storage.S3Settings | None = None) -> dict[str, Any]:
    return _base(model_cfg, s3)["tensors"]


def base_digests(model_cfg, s3: storage.S3Settings | None = None) -> dict[str, str]:
    entry = _base(model_cfg, s3)
    if entry["digests"] is None:
        entry["digests"] = {k: storage.sha256_bytes(tensor_store.tensor_blob(v)) for k, v in entry["tensors"].items()}
    return entry["digests"]


def externalize_step(config: Config, state_dir: Path) -> dict[str, Any]:
    """A trained step's bundle, before it is published: its tensors to blobs, its files to manifests."""
    from components.intake.workspace import s3_settings

    s3 = s3_settings(config)
    return tensor_store.externalize(state_dir, blob_store(config), lambda: base_digests(config.model, s3))


def check_step(config: Config, state_dir: Path) -> None:
    """A completed step found again: every file of its bundle, and every blob it names, as recorded."""
    tensor_store.verify_bundle(state_dir, candidates(blob_store(config)))


def make_whole(state_dir: Path, config: Config, stores: list[BlobStore]) -> list[str]:
    """Write back, in ``state_dir``, the files of the bundle that stand as manifests (``config``: the one the
    version ran with, which names its base model)."""
    from components.intake.workspace import s3_settings

    if not tensor_store.manifests(state_dir):
        return []
    s3 = s3_settings(config)
    return tensor_store.materialize(state_dir, stores, lambda: base_tensors(config.model, s3))


def load_state(state_dir: Path, config: Config):
    """The learner state of a model's bundle (the served pyfunc): loaded in place, or, when it stands as
    manifests, from a whole copy made in a temporary folder (the model's own folder is left as stored)."""
    from components.model.state import LearnerState

    if not tensor_store.manifests(state_dir):
        return LearnerState.load(state_dir)
    with tempfile.TemporaryDirectory(prefix="cliploop-whole-") as tmp:
        whole = Path(tmp) / "state"
        shutil.copytree(state_dir, whole)
        make_whole(whole, config, candidates(blob_store(config)))
        return LearnerState.load(whole)
