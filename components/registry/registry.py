"""The MLflow registry side: one registered model version per update run, the aliases ``challenger``,
``champion`` and ``previous-champion``, and every review decision (``docs/contracts.md``, "MLflow").
The runs themselves are logged by ``RunLog`` (``components/registry/registry_runs.py``), a part of ``Registry``.

MLflow's registry has two races this module absorbs (``docs/reliability.md``, "MLflow"): a version number
is ``MAX(version)+1`` with a few retries, and moving an alias is an unconditional upsert. So every
registration and every alias move happens under one file lock per registered model; registration is
idempotent (a version carries a ``cliploop.run_key`` tag, a digest of parent version, task, data and
config, and a second registration with the same key returns, and finishes, the existing version); and a
review decision is a compare-and-set: what it was decided on is checked again under the lock.

A read that fails tells "absent" (``NotFound``) from "unreachable" (MLflow's error, propagated to be
retried): an outage must never read as "there is no champion".

Nothing is pickled: a version's source is a pyfunc "model from code" (``components/registry/serving.py``) whose
artifacts are the learner-state bundle (safetensors + JSON) and the resolved config, with the exact
``components`` code it ran on, so ``mlflow.pyfunc.load_model("models:/cliploop@champion")`` predicts labels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.registry.model_pins import download_state, pin_run_model
from components.registry.registry_runs import TAG, RegistryError, RunLog
from components.support.faults import fault_point

ALIASES = ("champion", "challenger", "previous-champion")


class NotFound(RegistryError):
    """The registered model, the version or the alias does not exist. Every other registry error (a refused
    connection, a 5xx) propagates as it is, to be retried: it says nothing about what exists."""


class DecisionConflict(RegistryError):
    """A review decision lost a race: the version's review or the champion changed after the decision read
    them and before it held the registry lock. Nothing was changed."""


def is_absent(exc: BaseException) -> bool:
    """Whether an MLflow error means "no such model, version or alias" (and nothing else)."""
    code = getattr(exc, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    # MLflow answers a missing alias of an existing model with INVALID_PARAMETER_VALUE, "alias X not found."
    return code == "INVALID_PARAMETER_VALUE" and "alias" in str(exc) and "not found" in str(exc)


def from_config(config) -> Registry:
    """The registry a configuration names (MLflow on a SQLite file in the workspace by default)."""
    from components.registry.version_tensors import blob_store

    ws = config.workspace_path
    uri = config.mlflow.tracking_uri or f"sqlite:///{ws / '.cliploop' / 'mlflow.db'}"
    # With a tracking server, the server's own artifact destination is the default (e.g. S3 behind it).
    root = config.mlflow.artifact_root or (
        None if config.mlflow.tracking_uri else (ws / ".cliploop" / "mlartifacts").as_uri()
    )
    if not config.mlflow.tracking_uri:  # the embedded store lives in the workspace; a server needs no folder here
        (ws / ".cliploop").mkdir(parents=True, exist_ok=True)
    return Registry(
        tracking_uri=uri,
        model_name=config.mlflow.registered_model,
        experiment=config.mlflow.experiment,
        artifact_root=root,
        lock_dir=ws / ".cliploop" / "locks",
        tensor_blobs=blob_store(config),
    )


def is_unavailable(exc: BaseException) -> bool:
    """An MLflow error that says the tracking server could not answer now: refused or dropped connections,
    5xx and 429 answers (after MLflow's own HTTP retries), a locked database. Not "not found", not a 4xx."""
    from mlflow.exceptions import MlflowException, RestException

    if not isinstance(exc, MlflowException):
        return False
    if "database is locked" in str(exc) or exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    came_over_http = isinstance(exc, RestException) or str(exc).startswith("API request to")
    status = exc.get_http_status_code()
    return came_over_http and (status >= 500 or status == 429)


def _without_userinfo(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _v(version: int | None) -> str:
    return "unset" if version is None else f"v{version}"


def run_key(parent_version: int | None, task_id: str, dvc_md5: str | None, config_sha256: str) -> str:
    doc = json.dumps(
        {"parent": parent_version, "task": task_id, "dvc_md5": dvc_md5, "config": config_sha256}, sort_keys=True
    )
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass
class Registry(RunLog):
    tracking_uri: str
    model_name: str = "cliploop"
    experiment: str = "cliploop"
    artifact_root: str | None = None
    lock_dir: Path | None = None
    tensor_blobs: Any = None  # the configuration's tensor store (a blob_store.BlobStore), looked in before others

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        if self.lock_dir is None:
            self.lock_dir = Path(os.environ.get("CLIPLOOP_CACHE") or Path.home() / ".cache" / "cliploop") / "locks"

    @property
    def identity(self) -> str:
        """A short digest naming this registered model on this tracking store, the same for every client of it
        (credentials in the URI left out): what a review decision, a pause key or a lock is scoped to, so
        that version 3 of one workspace's chain is never mistaken for version 3 of another's."""
        return hashlib.sha256(f"{_without_userinfo(self.tracking_uri)}|{self.model_name}".encode()).hexdigest()[:16]

    # ---- locking ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time per registered model (registrations and alias moves)."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_dir / f"registry-{self.identity}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- versions --------------------------------------------------------------------------------------

    def find_version(self, key: str):
        versions = self.client.search_model_versions(f"name = '{self.model_name}' and tag.`{TAG}run_key` = '{key}'")
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def register(self, run_id: str, key: str, tags: dict[str, str]) -> int:
        """The run's state as a new model version with alias ``challenger``; idempotent by ``key``."""
        with self.locked():
            existing = self.find_version(key)
            if existing is not None:
                version = self._one_version_for(key)
                self._challenger_if_waiting(version, existing.tags)
                return version
            try:
                self.client.get_registered_model(self.model_name)
            except Exception as exc:
                if not is_absent(exc):
                    raise
                self.client.create_registered_model(self.model_name, description="cliploop continual-learning chain")
            run = self.client.get_run(run_id)
            model_uri = run.data.tags.get(TAG + "model_uri")
            if not model_uri:
                raise RegistryError(f"run {run_id} has no logged model (was the update's state/ folder missing?)")
            model_id = run.data.tags.get(TAG + "model_id")
            pins = pin_run_model(self, run_id, model_id, model_uri)  # the version exists only pinned
            try:
                self.client.create_model_version(
                    self.model_name,
                    model_uri,
                    run_id,
                    tags={TAG + k: str(v) for k, v in {**tags, **pins, "run_key": key}.items()},
                    model_id=model_id,
                )
            except Exception:
                # The server may have created it and lost the answer: a version found now is the one.
                if self.find_version(key) is None:
                    raise
            version = self._one_version_for(key)
            fault_point("after_register")
            self.client.set_registered_model_alias(self.model_name, "challenger", str(version))
            self.write_review_page(version)  # rewritten with the gate's verdict by review.apply_gate
            return version

    def _one_version_for(self, key: str) -> int:
        """The one version of ``key``: the first registered. MLflow's HTTP client retries a POST whose answer
        was lost (a reset connection, a proxy's timeout), and the server then creates a second version from
        the same request; every later one is deleted, and the survivor records their numbers
        (``cliploop.duplicates_removed``), so the alias, the ledger and lineage all name one version."""
        versions = sorted(
            int(v.version)
            for v in self.client.search_model_versions(f"name = '{self.model_name}' and tag.`{TAG}run_key` = '{key}'")
        )
        keep, extra = versions[0], versions[1:]
        for number in extra:
            self.client.delete_model_version(self.model_name, str(number))
        if extra:
            removed = self.version_tags(keep).get("duplicates_removed", "")
            numbers = ",".join(x for x in [removed, *map(str, extra)] if x)
            self.client.set_model_version_tag(self.model_name, str(keep), TAG + "duplicates_removed", numbers)
        return keep

    def _challenger_if_waiting(self, version: int, tags: dict[str, str]) -> None:
        """Registration and the ``challenger`` alias are one resumable step: a rerun that finds the version a
        dead run registered (before it could set the alias) sets it, unless the version was decided since."""
        if tags.get(TAG + "review") not in (None, "pending", "timed-out"):
            return
        if version not in (self.alias("champion"), self.alias("challenger")):
            self.client.set_registered_model_alias(self.model_name, "challenger", str(version))

    def set_tags(self, version: int, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), TAG + k, str(v))

    def model_version(self, version: int | str):
        """The MLflow model version; ``NotFound`` when it does not exist, any other error as it is."""
        try:
            return self.client.get_model_version(self.model_name, str(version))
        except Exception as exc:
            if is_absent(exc):
                raise NotFound(f"model {self.model_name!r} has no version {version}") from None
            raise

    def version_tags(self, version: int) -> dict[str, str]:
        mv = self.model_version(version)
        return {k[len(TAG) :]: v for k, v in mv.tags.items() if k.startswith(TAG)}

    def alias(self, name: str) -> int | None:
        """The version holding alias ``name``; None only when nobody holds it (an outage raises)."""
        try:
            return int(self.client.get_model_version_by_alias(self.model_name, name).version)
        except Exception as exc:
            if is_absent(exc):
                return None
            raise

    def resolve(self, ref: str | int) -> int:
        """A version number, or an alias (``champion``, ``challenger``, ``previous-champion``)."""
        if isinstance(ref, int) or str(ref).isdigit():
            version = int(ref)
            self.model_version(version)
            return version
        found = self.alias(str(ref))
        if found is None:
            raise NotFound(f"no model version holds alias {ref!r} in {self.model_name!r}")
        return found

    # ---- promotion -------------------------------------------------------------------------------------

    def _expect(self, version: int, decision: str, expect: dict[str, Any] | None) -> None:
        """Compare-and-set: what the decision was made on (``review`` tag, ``champion`` alias) still holds.

        Called under the registry lock; a decision read outside it may be stale (another reviewer, a gate,
        a rollback got there first), and MLflow's alias write is an unconditional upsert."""
        if not expect:
            return
        if "review" in expect:
            tags = self.version_tags(version)
            if tags.get("review") != expect["review"]:
                raise DecisionConflict(
                    f"version {version} was {tags.get('review') or 'untagged'} by {tags.get('reviewer') or 'someone'} "
                    f"while this {decision} waited (it was decided on review={expect['review'] or 'none'}): "
                    f"nothing changed"
                )
        if "champion" in expect:
            champion = self.alias("champion")
            if champion != expect["champion"]:
                raise DecisionConflict(
                    f"the champion moved from {_v(expect['champion'])} to {_v(champion)} while this {decision} of "
                    f"version {version} waited: nothing changed"
                )

    def promote(
        self,
        version: int,
        reviewer: str,
        note: str = "",
        expect: dict[str, Any] | None = None,
        review: str = "approved",
        parent: int | None = None,
    ) -> int | None:
        """``version`` becomes champion; the old champion becomes previous-champion. Returns the old one.

        ``expect``: the ``review`` tag and ``champion`` the decision was made on; checked under the lock.
        ``review``: ``approved`` (a reviewer) or ``auto`` (``approval.auto_promote``). A version that already
        holds ``champion`` (the alias was moved to it by hand, in the MLflow UI or client) gets the record it
        lacks: the reviewer's tags, and ``previous-champion`` on ``parent``, the champion it was learned on."""
        with self.locked():
            self._expect(version, "approval", expect)
            old = self.alias("champion")
            if old != version:
                if old is not None:
                    self.client.set_registered_model_alias(self.model_name, "previous-champion", str(old))
                self.client.set_registered_model_alias(self.model_name, "champion", str(version))
            else:
                old = parent
                if parent is not None and parent != version:
                    self.client.set_registered_model_alias(self.model_name, "previous-champion", str(parent))
            if self.alias("challenger") == version:
                self.client.delete_registered_model_alias(self.model_name, "challenger")
            self._record(version, review, reviewer, note)
            return old

    def _record(self, version: int, review: str, reviewer: str, note: str) -> None:
        """A decision's tags, ``review`` written last: a reader that sees the new ``review`` also sees who
        decided and ``review_at``, which only cliploop writes (a ``review`` tag without it was set by hand)."""
        at = datetime.now(UTC).isoformat(timespec="seconds")
        self.set_tags(version, {"reviewer": reviewer, "review_note": note, "review_at": at, "review": review})

    def mark_manual_alias(self, version: int, expect_review: str | None, reviewer: str, note: str) -> bool:
        """Record that ``version`` holds ``champion`` without a review (``review=manual-alias``); False (nothing
        changed) if its review changed or it lost the alias since it was read."""
        with self.locked():
            if self.version_tags(version).get("review") != expect_review:
                return False
            if not self._in_champion_chain(version):
                return False
            self._record(version, "manual-alias", reviewer, note)
            return True

    def _in_champion_chain(self, version: int) -> bool:
        current, seen = self.alias("champion"), set()
        while current is not None and current not in seen:
            if current == version:
                return True
            seen.add(current)
            parent = self.version_tags(current).get("parent_version", "")
            current = int(parent) if parent.isdigit() else None
        return False

    def reject(self, version: int, reviewer: str, reason: str, expect: dict[str, Any] | None = None) -> None:
        with self.locked():
            self._expect(version, "rejection", expect)
            if self.alias("champion") == version:
                raise RegistryError(f"version {version} is the champion; use rollback to replace it")
            if self.alias("challenger") == version:
                self.client.delete_registered_model_alias(self.model_name, "challenger")
            self._record(version, "rejected", reviewer, reason)

    def rollback(self, reviewer: str, note: str = "", expect_champion: int | None = None) -> tuple[int, int]:
        """previous-champion becomes champion again; returns (restored, demoted).

        ``expect_champion``: the champion the operator means to demote (refused if it moved meanwhile)."""
        with self.locked():
            previous, current = self.alias("previous-champion"), self.alias("champion")
            if previous is None or current is None:
                raise RegistryError("nothing to roll back to: no previous-champion alias")
            if expect_champion is not None and current != expect_champion:
                raise DecisionConflict(f"the champion is {_v(current)}, not {_v(expect_champion)}: nothing rolled back")
            self.client.set_registered_model_alias(self.model_name, "champion", str(previous))
            self.client.delete_registered_model_alias(self.model_name, "previous-champion")
            self._record(current, "rolled-back", reviewer, note)
            return previous, current

    def set_review_if(self, version: int, value: str, expect_review: tuple[str | None, ...]) -> bool:
        """Tag the version's review ``value`` only if it is still one of ``expect_review`` (under the lock), so
        bookkeeping (pending, timed-out) never overwrites a reviewer's decision made a moment before."""
        with self.locked():
            if self.version_tags(version).get("review") not in expect_review:
                return False
            self.set_tags(version, {"review": value})
            return True

    def supersede(self, version: int, expect: dict[str, Any]) -> bool:
        """A waiting version whose parent is no longer the champion is tagged ``superseded`` and loses
        ``challenger``; False (nothing changed) if its review or the champion moved meanwhile."""
        with self.locked():
            try:
                self._expect(version, "supersede", expect)
            except DecisionConflict:
                return False
            self.set_tags(version, {"review": "superseded"})
            if self.alias("challenger") == version:
                self.client.delete_registered_model_alias(self.model_name, "challenger")
            return True

    def download_state(self, version: int, dest: Path) -> Path:
        """The version's learner-state bundle in ``dest``, checked against the digests pinned at registration, its
        tensors against their blobs' (``model_pins.download_state``); callers load it with the bundle's own
        checksums verified too."""
        return download_state(self, version, dest)

    def versions(self) -> list:
        """Every version of the registered model (none before the first registration)."""
        return list(self.client.search_model_versions(f"name = '{self.model_name}'"))
