"""The configuration a version ran with: pinned in the registry at registration, checked by ``lineage --verify``.

A training step writes the resolved configuration it ran with (``config.resolved.yaml``: defaults, file,
environment and ``--set`` flags together) beside its outputs. The version's MLflow run keeps that file, where a
reviewer or an auditor reads it, and the version's model carries a copy. At registration the copy's SHA-256 is
read from the model as stored and set as the version tag ``config_file_sha256`` (``model_pins.pin_run_model``),
beside ``config_sha256``, the digest of the settings that key the version's steps. Tags live in the tracking
store, so the registry is the record: ``--verify`` re-hashes the file the run keeps and, when it is not the
pinned one, names the settings that differ from the model's pinned copy.

A version registered before the tag existed is held to its model's manifest instead (``cliploop/pins.json``,
itself pinned by the version's ``artifacts_sha256``), which lists the same copy's SHA-256.

The workspace's ``cliploop.yaml`` in git is not this record: it is one source of the configuration among
several, and it may have been edited since without a commit.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from components.registry.model_pins import (
    CONFIG_IN_MODEL,
    CONFIG_PIN_TAG,
    ArtifactsTampered,
    _download,
    _manifest,
    model_location,
)
from components.registry.registry_runs import RegistryError

CONFIG_FILE = "config.resolved.yaml"  # in the version's run, at the top of its artifacts
SHOWN = 5  # settings named per mismatch; the count of the others follows


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(registry, uri: str, dest: Path) -> bytes | None:
    """The bytes of one stored artifact file, or None when the store says it has none (an outage raises)."""
    from mlflow.exceptions import MlflowException

    from components.registry.registry import is_unavailable

    try:
        path = _download(registry, uri, dest)
    except MlflowException as exc:  # "Failed to download artifacts from path ...": no such file
        if is_unavailable(exc):
            raise
        return None
    return path.read_bytes() if path.is_file() else None


def _pinned_copy(registry, version: int, tmp: Path) -> tuple[str | None, bytes | None]:
    """The config's digest in the version's pinned manifest, and the model's copy when it matches that digest."""
    try:
        files, mv = _manifest(registry, version, tmp)
    except (ArtifactsTampered, RegistryError):
        return None, None
    digest = files.get(CONFIG_IN_MODEL)
    if digest is None:
        return None, None
    location = model_location(registry, mv.model_id, mv.source).rstrip("/")
    data = _read(registry, f"{location}/{CONFIG_IN_MODEL}", tmp / "model-config")
    return digest, data if data is not None and _sha256(data) == digest else None


def config_problems(registry, version: int, run_id: str, tags: dict[str, str]) -> list[str]:
    """One line per way the configuration the version's run keeps is not the one pinned for it (empty: none)."""
    label = f"version {version}"
    with tempfile.TemporaryDirectory(prefix="cliploop-config-") as t:
        tmp = Path(t)
        kept = None
        if registry.has_artifact(run_id, CONFIG_FILE):
            kept = _read(registry, f"runs:/{run_id}/{CONFIG_FILE}", tmp / "kept")
        pinned = tags.get(CONFIG_PIN_TAG)
        manifest = None  # (the manifest's digest of the model's copy, the copy when it matches), read once
        if not pinned:  # registered before the tag: its model's manifest pins the same file
            manifest = _pinned_copy(registry, version, tmp / "pins")
            pinned = manifest[0]
            if not pinned:
                return [f"{label}: no configuration pinned ({CONFIG_PIN_TAG} unset, none in its model's manifest)"]
        if kept is None:
            return [f"{label}: its run keeps no {CONFIG_FILE}: the configuration it ran with cannot be shown"]
        if _sha256(kept) == pinned:
            return []
        head = (
            f"{label}: the {CONFIG_FILE} its run keeps (sha256 {_sha256(kept)[:12]}) is not the configuration it ran "
            f"with (pinned sha256 {pinned[:12]})"
        )
        digest, reference = manifest or _pinned_copy(registry, version, tmp / "pins")
        if digest is not None and digest != pinned:
            return [f"{head}; its model's manifest lists sha256 {digest[:12]}: the tag and the manifest disagree"]
        if reference is None:
            return [f"{head}; the model's pinned copy cannot be read to name what differs"]
        return [f"{head}: {differences(reference, kept)}"]


def differences(ran: bytes, kept: bytes) -> str:
    """The settings whose values differ, ``key: ran-with -> kept``, at most ``SHOWN`` of them named."""
    before, after = _flat(_load(ran)), _flat(_load(kept))
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key, _UNSET) != after.get(key, _UNSET)]
    if not changed:
        return "the same settings, written differently"
    named = [f"{key}: {_shown(before.get(key, _UNSET))} -> {_shown(after.get(key, _UNSET))}" for key in changed]
    more = f" and {len(named) - SHOWN} more" if len(named) > SHOWN else ""
    return "; ".join(named[:SHOWN]) + more


_UNSET = object()


def _load(data: bytes) -> Any:
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError:
        return {"(not YAML)": data.decode(errors="replace")[:80]}


def _flat(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix.rstrip(".") or "(document)": doc}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def _shown(value: Any) -> str:
    return "(absent)" if value is _UNSET else json.dumps(value, default=str)
