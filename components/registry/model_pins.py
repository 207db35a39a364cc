"""Every byte a registered version loads is pinned in the registry and checked before it is used.

Whoever can write the artifact store (a bucket policy, a shared folder) could otherwise append a line to the
model's packaged ``code/components/*.py`` and have it run by the next ``load_model``, point ``MLmodel`` at a
pickled object, or swap pool tensors and recompute the bundle's own checksums: the learner-state bundle only
checks itself. The registry is the trust root instead:

- at registration, the logged model is read back as stored and every file's SHA-256 goes into a manifest
  (``cliploop/pins.json`` in the run's artifacts); the manifest's own SHA-256 is a tag of the model version,
  set when the version is created (``cliploop.artifacts_sha256``);
- a loader (``fetch_verified``: the next night's parent state, ``cliploop predict`` / ``export-model``,
  ``load_verified``) downloads into a fresh folder, checks the manifest against the tag and every file
  against the manifest (nothing missing, nothing added, nothing changed), refuses any pickle, and only then
  imports or loads anything, from that folder;
- ``cliploop lineage --verify`` re-hashes the version's artifacts the same way.

Tags live in the tracking store's database, not in the artifact store: rewriting them needs the registry's
own write access, which is what approving a version needs anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.registry.registry_runs import _FLUENT, TAG, RegistryError

PIN_TAG = "artifacts_sha256"  # on the model version, with the registry's ``cliploop.`` prefix
MANIFEST_PATH = "cliploop/pins.json"  # in the version's run
# The config the version ran with, as its model carries it, and the version tag that pins its SHA-256 (lineage_config)
CONFIG_IN_MODEL = "artifacts/config.resolved.yaml"
STATE_IN_MODEL = "artifacts/state"  # the learner-state bundle, as the model carries it
CONFIG_PIN_TAG = "config_file_sha256"
# Formats that execute code when read: a model of cliploop's never holds one (safetensors + JSON + code).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib", ".pt", ".pth", ".bin")
MLFLOW_LOAD_NOTE = "registered_model_meta"  # see fetch_verified
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of a "model from code" (imports a .py file)


class ArtifactsTampered(RegistryError):
    """A version's stored artifacts differ from what its registration pinned (or it pinned nothing)."""


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` by its relative POSIX path; a link is refused (it would point the
    loader outside what was checked)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ArtifactsTampered(f"{rel}: a symbolic link in the model's artifacts")
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out[rel] = digest.hexdigest()
    return out


def manifest_bytes(files: dict[str, str], model_uri: str) -> bytes:
    return json.dumps({"model_uri": model_uri, "files": files}, sort_keys=True, indent=1).encode()


def model_location(registry, model_id: str | None, source: str) -> str:
    """Where a logged model's files are (its MLflow ``LoggedModel`` artifact location, else the source URI)."""
    if not model_id and source.startswith("models:/m-"):
        model_id = source[len("models:/") :]
    return registry.client.get_logged_model(model_id).artifact_location if model_id else source


def _download(registry, uri: str, dest: Path) -> Path:
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    with _FLUENT:  # an ``mlflow-artifacts:`` location resolves through the process-wide tracking URI
        mlflow.set_tracking_uri(registry.tracking_uri)
        mlflow.set_registry_uri(registry.tracking_uri)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dest), tracking_uri=registry.tracking_uri
        )
    return Path(local)


def pin_run_model(registry, run_id: str, model_id: str | None, model_uri: str) -> dict[str, str]:
    """Read the run's logged model back as stored, write its manifest into the run, and return the version
    tags that pin it. Called before the version is created, so a version never exists unpinned."""
    location = model_location(registry, model_id, model_uri)
    with tempfile.TemporaryDirectory(prefix="cliploop-pin-") as tmp:
        root = _download(registry, location, Path(tmp) / "model")
        files = file_digests(root)
        refuse_pickles(root, files)
    data = manifest_bytes(files, model_uri)
    registry.client.log_text(run_id, data.decode(), MANIFEST_PATH)
    config = {CONFIG_PIN_TAG: files[CONFIG_IN_MODEL]} if CONFIG_IN_MODEL in files else {}
    return {PIN_TAG: hashlib.sha256(data).hexdigest(), **config}


def refuse_pickles(root: Path, files: dict[str, str]) -> None:
    """A model of cliploop's is a pyfunc "model from code": no file in a pickle format, and an ``MLmodel``
    with only the pyfunc flavor, loaded by MLflow's code-model loader from a ``.py`` file, never an object."""
    import yaml

    pickled = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ArtifactsTampered(f"pickled file(s) in the model's artifacts, refused: {', '.join(pickled)}")
    spec = yaml.safe_load((Path(root) / "MLmodel").read_text()) if "MLmodel" in files else None
    flavors = (spec or {}).get("flavors", {})
    pyfunc = flavors.get("python_function", {})
    code = str(pyfunc.get("model_code_path") or "")
    # ``python_model`` names a pickled object (pyfunc's own loader unpickles it); a model from code has none.
    if (
        set(flavors) != {"python_function"}
        or pyfunc.get("loader_module") != CODE_LOADER
        or "python_model" in pyfunc
        or not code.endswith(".py")
    ):
        raise ArtifactsTampered(
            f"MLmodel does not load a model from code (loader {pyfunc.get('loader_module') or 'unset'}, "
            f"flavors {', '.join(sorted(flavors)) or 'none'}): refused"
        )


def pinned(registry, version: int) -> tuple[str, Any]:
    """The version's pin and its model version record; refuses a version registered without one."""
    mv = registry.model_version(version)
    tag = mv.tags.get(TAG + PIN_TAG)
    if not tag:
        raise ArtifactsTampered(
            f"version {version} of {registry.model_name!r} has no pinned artifact digest "
            f"({TAG + PIN_TAG}): it was registered before cliploop pinned what a version loads, or its tag was "
            "removed; cliploop does not load it (learn its task again to register a pinned version)"
        )
    return tag, mv


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """Lines naming each file added, missing or changed (empty when the two agree)."""
    out = [f"{f}: changed" for f in sorted(expected) if f in found and found[f] != expected[f]]
    out += [f"{f}: missing" for f in sorted(set(expected) - set(found))]
    out += [f"{f}: not pinned (added)" for f in sorted(set(found) - set(expected))]
    return out


def _manifest(registry, version: int, tmp: Path) -> tuple[dict[str, str], Any]:
    tag, mv = pinned(registry, version)
    path = _download(registry, f"runs:/{mv.run_id}/{MANIFEST_PATH}", tmp / "pins")
    data = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(data).hexdigest() != tag:
        raise ArtifactsTampered(f"version {version}: its artifact manifest ({MANIFEST_PATH}) is not the pinned one")
    return json.loads(data)["files"], mv


def fetch_verified(registry, version: int, dest: Path) -> Path:
    """The version's model folder in ``dest`` (created; must not exist), every file checked against the
    registry's pin; raises ``ArtifactsTampered`` naming what differs, leaving nothing in ``dest``."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists: a verified model is fetched into a new folder")
    with tempfile.TemporaryDirectory(prefix="cliploop-fetch-", dir=dest.parent if dest.parent.exists() else None) as t:
        tmp = Path(t)
        expected, mv = _manifest(registry, version, tmp)
        root = _download(registry, model_location(registry, mv.model_id, mv.source), tmp / "model")
        found = file_digests(root)
        if MLFLOW_LOAD_NOTE in found and MLFLOW_LOAD_NOTE not in expected:
            # MLflow writes this note (the model's name and version) into a local store's own model folder
            # whenever the version is loaded by a models:/ URI; nothing loads it. Not pinned: left out of the copy.
            (root / MLFLOW_LOAD_NOTE).unlink()
            del found[MLFLOW_LOAD_NOTE]
        problems = differences(expected, found)
        if problems:
            raise ArtifactsTampered(
                f"version {version} of {registry.model_name!r}: its stored artifacts differ from what was pinned "
                f"at registration, nothing was loaded:\n  " + "\n  ".join(problems)
            )
        refuse_pickles(root, found)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root), str(dest))
    return dest


def verify_version(registry, version: int) -> list[str]:
    """For ``lineage --verify``: what differs between the version's stored artifacts and its pin, and which of
    the tensor blobs its bundle names are missing or changed in the artifact store (empty: none)."""
    from components.registry.blob_store import candidates
    from components.registry.tensor_store import blob_problems

    with tempfile.TemporaryDirectory(prefix="cliploop-verify-") as t:
        try:
            model = fetch_verified(registry, version, Path(t) / "model")
        except ArtifactsTampered as exc:
            return [f"model artifacts of version {version}: {line.strip()}" for line in str(exc).splitlines()]
        problems = blob_problems(model / STATE_IN_MODEL, candidates(registry.tensor_blobs))
    return [f"tensor blobs of version {version}: {line}" for line in problems]


def version_tensor_manifests(registry, version: int) -> list[dict[str, Any]]:
    """The tensor manifests of a version's model (none for a version without a pin), each checked against it."""
    from components.registry.tensor_store import SUFFIX

    try:
        _, mv = pinned(registry, version)
    except ArtifactsTampered:
        return []  # registered before pins: its bundle is whole, it names no blob
    with tempfile.TemporaryDirectory(prefix="cliploop-tensors-") as t:
        expected, mv = _manifest(registry, version, Path(t))
        location = model_location(registry, mv.model_id, mv.source)
        docs = []
        for i, rel in enumerate(sorted(r for r in expected if r.endswith(SUFFIX))):
            data = _download(registry, f"{location}/{rel}", Path(t) / str(i)).read_bytes()
            if hashlib.sha256(data).hexdigest() != expected[rel]:
                raise ArtifactsTampered(f"version {version}: {rel}: changed")
            docs.append(json.loads(data))
    return docs


def download_state(registry, version: int, dest: Path) -> Path:
    """The version's learner-state bundle in ``dest/state``, from a copy of its model checked file by file against
    the pin, its tensor files written back from blobs checked against their digests (``tensor_store``)."""
    from components.registry.blob_store import candidates
    from components.registry.version_tensors import make_whole
    from components.settings.config_loading import load_config

    Path(dest).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cliploop-state-", dir=dest) as tmp:
        model = fetch_verified(registry, version, Path(tmp) / "model")
        if (model / CONFIG_IN_MODEL).is_file():  # it names the base model, whose own tensors are not blobs
            config = load_config(model / CONFIG_IN_MODEL, env={})
            make_whole(model / STATE_IN_MODEL, config, candidates(registry.tensor_blobs))
        shutil.move(str(model / STATE_IN_MODEL), str(Path(dest) / "state"))
    return Path(dest) / "state"


def verify_state(registry, version: int, state_dir: Path) -> None:
    """A learner-state folder kept from an earlier verified fetch (the parent cache) still matches the pin: its
    files as pinned, and each file written back from blobs with the SHA-256 its pinned tensor manifest records."""
    from components.registry.tensor_store import SUFFIX

    with tempfile.TemporaryDirectory(prefix="cliploop-pins-") as t:
        expected, _ = _manifest(registry, version, Path(t))
    prefix = STATE_IN_MODEL + "/"
    pinned_state = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    found = file_digests(state_dir)
    for rel in [r.removesuffix(SUFFIX) for r in pinned_state if r.endswith(SUFFIX)]:
        manifest = Path(state_dir) / (rel + SUFFIX)
        if rel in found and found.get(rel + SUFFIX) == pinned_state[rel + SUFFIX]:
            if json.loads(manifest.read_text())["sha256"] == found[rel]:
                del found[rel]  # written back from its blobs, and still those bytes
    problems = differences(pinned_state, found)
    if problems:
        raise ArtifactsTampered(
            f"version {version}: the kept learner state {state_dir} differs:\n  " + "\n  ".join(problems)
        )


def load_verified(registry, ref: str | int, dest: Path | None = None):
    """The version as an MLflow pyfunc, loaded from a verified copy (the safe way to load a cliploop model;
    ``mlflow.pyfunc.load_model("models:/...")`` imports the stored code before anything checks it)."""
    import mlflow.pyfunc

    version = registry.resolve(ref)
    folder = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="cliploop-model-")) / "model"
    fetch_verified(registry, version, folder)
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # belt and braces: MLflow's own refusal too
    return mlflow.pyfunc.load_model(str(folder))
