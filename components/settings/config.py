"""Typed, validated configuration: every section, key, default and meaning (the commented file `cliploop init` writes
from them is :mod:`components.settings.config_file`).

This module says what the settings are; :mod:`components.settings.config_loading` resolves their values (defaults →
cliploop.yaml → environment → command-line overrides) and reports bad ones. A new key changes this file only.
The resolved config is written beside each command's outputs (``config.resolved.yaml``, :meth:`Config.write_resolved`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(Section):
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint URL; null = from the AWS configuration (AWS_ENDPOINT_URL, ~/.aws/config)",
    )
    region: str | None = Field(None, description="S3 region; null = from the AWS configuration")
    # One store that accepts a request and never answers must not hold a night: every S3 request, cliploop's
    # own and DVC's, is bounded by these (docs/storage.md).
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection to S3, per attempt")
    read_timeout_s: float = Field(
        60.0, gt=0, description="seconds S3 may stay silent on a request, per attempt, before the attempt fails"
    )
    max_attempts: int | None = Field(
        None,
        ge=1,
        description="attempts per S3 request, the first included; null = from the AWS configuration "
        "(AWS_MAX_ATTEMPTS, ~/.aws/config), else 6",
    )


class DvcConfig(Section):
    remote: str | None = Field(
        None,
        description="DVC remote: a folder or an s3:// URI; null = a local folder .cliploop/dvc-remote in the workspace",
    )
    remote_name: str = Field("storage", description="name of the DVC remote in the workspace's .dvc/config")
    push: bool = Field(True, description="push every accepted task to the remote right after it is committed")
    transfer_timeout_s: int | None = Field(
        3600,
        gt=0,
        description="longest a dvc push may run; then it is stopped and the command ends as a storage failure "
        "(safe to re-run: the next push goes on where it stopped); null = no limit",
    )


class ValidationConfig(Section):
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="largest accepted image in pixels (width*height); larger is a decompression-bomb risk",
    )
    max_image_bytes: int = Field(32 * 1024 * 1024, gt=0, description="largest accepted image file in bytes")
    min_side: int = Field(8, gt=0, description="smallest accepted image width or height in pixels")
    formats: list[Literal["JPEG", "PNG", "WEBP"]] = Field(
        ["JPEG", "PNG", "WEBP"],
        min_length=1,
        description="accepted image formats, checked by magic bytes and by decoding",
    )
    min_images_per_class: int = Field(1, ge=0, description="each declared class needs at least this many train images")

    label_doubt: Literal["warn", "quarantine", "off"] = Field(
        "warn",
        description="training labels the champion (none yet: the base model) contradicts with high confidence: "
        "listed in the report as a warning, or the drop quarantined past label_doubt_max_share (docs/drops.md)",
    )
    label_doubt_confidence: float = Field(
        0.9, gt=0, le=1, description="a label is doubted when the model gives another class at least this probability"
    )
    label_doubt_max_share: float = Field(
        0.1, ge=0, lt=1, description="share of the scored training labels that may be doubted before the check fails"
    )
    label_doubt_max_images: int = Field(
        5000, gt=0, description="training images scored at most per drop (evenly spread over the manifest)"
    )

    @field_validator("label_doubt", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("formats must not repeat")
        return value


class ShardConfig(Section):
    target_mb: int = Field(
        256, gt=0, description="target size of one shard file in MiB (a task is stored as a few shards)"
    )


class ModelConfig(Section):
    name: str = Field(
        "ViT-B-16",
        description="open_clip model name, or one of cliploop's small configs (cliploop-tiny, cliploop-minilm-tiny)",
    )
    pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag (needs the network once); null = none"
    )
    checkpoint: str | None = Field(
        None, description="weights file instead of a tag: a local .safetensors/.pt path or an s3:// URI"
    )
    sha256: str | None = Field(None, description="expected SHA-256 of the checkpoint (verified before loading)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-weights"] = Field(
        "auto",
        description="auto = bf16 "
        "autocast on CUDA, fp32 on CPU; "
        "bf16-weights casts the frozen model "
        "(pool building and evaluation only)",
    )
    frozen_precision: Literal["auto", "fp32", "bf16", "bf16-weights"] = Field(
        "auto",
        description="precision of frozen encoders (LVP's pools and evaluation, teachers); auto = bf16-weights on "
        "CUDA and fp32 on CPU when precision is auto, else what precision says",
    )
    decoder: Literal["auto", "pillow", "pillow-draft2x", "torch-jpeg", "nvjpeg"] = Field(
        "auto",
        description="image decoder of frozen encoders (part of every pool and run key): auto = nvjpeg (batched "
        "JPEG decoding and preprocessing on the GPU) when the model runs on CUDA, pillow-draft2x on CPU; "
        "torch-jpeg = the same tensor path on the CPU",
    )


class MethodConfig(Section):
    name: str = Field("lvp", description="continual-learning method (see `cliploop methods`)")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="the method's own settings (validated by the method)"
    )


class EvaluationConfig(Section):
    batch_size: int = Field(128, gt=0, description="images per batch when encoding")
    workers: int | None = Field(None, ge=0, description="DataLoader worker processes; null = 0 on CPU, up to 8 on CUDA")
    templates: str = Field(
        "lvp",
        description="prompt templates for class text embeddings: lvp, single, ensemble, "
        "simple, task (each task.yaml's prompts) or a template with {}",
    )
    zero_shot_set: str | None = Field(
        None, description="a task drop never trained on, evaluated after every step (zero-shot retention)"
    )
    future_tasks: bool = Field(
        True,
        description="when the task sequence is known (cliploop learn), also evaluate tasks not learned yet (transfer)",
    )
    seed: int = Field(0, description="seed for anything random in learning and evaluation")


class GateConfig(Section):
    max_forgetting: float | None = Field(
        None, ge=0, description="fail when cl.forgetting (points, higher is worse) exceeds this; null = no rule"
    )
    min_zero_shot_retention: float | None = Field(
        None,
        ge=0,
        description="fail when zs.retention_rel (after / before on the held-out set) is below this, e.g. 0.95",
    )
    min_new_task_accuracy: float | None = Field(
        None, ge=0, le=100, description="fail when the new task's accuracy (%) is below this"
    )
    min_last_accuracy: float | None = Field(
        None, ge=0, le=100, description="fail when cl.last (accuracy over all learned tasks, %) is below this"
    )
    max_drop_vs_champion: float | None = Field(
        None, ge=0, description="fail when any task the champion knows is more than this many points worse"
    )
    on_missing: Literal["fail", "skip"] = Field(
        "fail", description="a rule whose metric could not be measured: fail the gate, or skip the rule"
    )


class ArtifactsConfig(Section):
    root: str | None = Field(
        None,
        description="where GPU steps publish their outputs (pools/<key>/, runs/<key>/, result.json last): a folder "
        "or an s3:// prefix that the workers and the orchestrator both reach; null = <workspace>/.cliploop",
    )
    embedding_cache: bool = Field(
        True,
        description="keep a frozen encoder's image embeddings (LVP, zero-shot) in embeddings/<key>/ of the artifact "
        "store, so each image is encoded once, not at every evaluation; false = encode every time",
    )


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking and registry URI; null = sqlite:///<workspace>/.cliploop/mlflow.db"
    )
    artifact_root: str | None = Field(
        None,
        description="artifact location for new experiments (e.g. "
        "s3://bucket/mlflow); null = <workspace>/.cliploop/mlartifacts",
    )
    registered_model: str = Field(
        "cliploop", description="registered model name (aliases champion, challenger, previous-champion)"
    )
    experiment: str = Field("cliploop", description="MLflow experiment of the update runs")


class ApprovalConfig(Section):
    auto_promote: bool = Field(
        False, description="promote a version that passes the gate without waiting for a reviewer"
    )
    timeout_s: int = Field(
        3600,
        ge=0,
        description="how long the flow waits for a reviewer's decision; after it the "
        "version stays challenger (review: timed-out); 0 = do not wait",
    )


class OrchestrationConfig(Section):
    schedule_cron: str = Field("0 2 * * *", description="cron expression of the nightly deployment")
    timezone: str = Field(
        "UTC", description="IANA time zone of the cron schedule (explicit: a schedule without one drifts with DST)"
    )
    cpu_pool: str = Field("cpu", description="Prefect work pool of the orchestrating nightly flow")
    gpu_pool: str | None = Field(
        None,
        description="Prefect work pool for pool building, training and evaluation; null "
        "= run them in-process (the embedded default)",
    )
    gpu_timeout_s: int = Field(6 * 3600, gt=0, description="longest wait for one GPU step's flow run")
    retries: int = Field(3, ge=0, description="retries of a step that failed on a transient storage or registry error")
    retry_delay_s: float = Field(
        2.0, ge=0, description="first retry delay in seconds (doubles with each retry, with jitter)"
    )


class ComputeConfig(Section):
    engine: Literal["local", "ray"] = Field(
        "local",
        description="where pool building encodes a task's shards: local = this process (DataLoader workers); "
        "ray = Ray Data, a pool of encoder actors (same pool bytes)",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. auto or ray://head:10001); null = start a local Ray here"
    )
    ray_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray started here; null = all of them")
    actors: int | None = Field(
        None,
        gt=0,
        description="encoder actors; null = one per GPU (per CPU when the actors use none), at most one per shard",
    )
    actor_gpus: float | None = Field(
        None, ge=0, description="GPUs each encoder actor asks Ray for; null = 1 when the model runs on CUDA, else 0"
    )
    actor_cpus: float = Field(1.0, gt=0, description="CPUs each encoder actor asks Ray for")
    train_workers: int = Field(
        1,
        ge=1,
        description="data-parallel workers that train one task together on Ray Train; 1 = this process, no Ray. "
        "method.settings.batch_size stays the global batch (components/model/replicas.py)",
    )
    train_worker_cpus: float = Field(1.0, gt=0, description="CPUs each training worker asks Ray for")
    train_storage: str | None = Field(
        None,
        description="where Ray Train keeps the training workers' checkpoints and result: null = a folder beside "
        "the step's checkpoints (one machine, or nodes sharing that folder); an s3:// prefix for a cluster whose "
        "nodes share only object storage",
    )
    train_retries: int = Field(
        2, ge=0, description="times Ray Train restarts the training workers from their last checkpoint after one died"
    )


class Config(Section):
    workspace: str = Field(
        ".", description="the workspace: a git + DVC repository holding data/, data.dvc and .cliploop/"
    )
    drop_zone: str = Field(
        "incoming", description="where new tasks arrive: a folder of task folders, or an s3:// prefix"
    )
    s3: S3Config = Field(default_factory=S3Config)
    dvc: DvcConfig = Field(default_factory=DvcConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    # Where relative paths in this config are anchored (the config file's folder, or the cwd). Not a key.
    _base_dir: Path = Path(".")

    def path(self, value: str) -> Path:
        """Resolve a config path relative to the folder of the config file."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    @property
    def workspace_path(self) -> Path:
        return self.path(self.workspace)

    def location(self, value: str) -> str:
        """A folder path made absolute, or an s3:// URI unchanged."""
        return value if value.startswith("s3://") else str(self.path(value))

    def to_yaml(self) -> str:
        """The resolved config as YAML, credentials redacted (what ``cliploop config`` prints and
        ``config.resolved.yaml`` holds: docs/security.md)."""
        from components.settings.credentials import redacted

        return yaml.safe_dump(redacted(self.model_dump(mode="json")), sort_keys=False)

    # Where things are and how the night is run, not what a step computes: left out of identity() so that
    # keys survive a moved workspace, another drop zone, registry, object store or work pool.
    LOCATION_SECTIONS: ClassVar[tuple[str, ...]] = (
        "workspace",
        "drop_zone",
        "s3",
        "dvc",
        "mlflow",
        "approval",
        "orchestration",
        "artifacts",
        "compute",  # where pools are encoded; the bytes do not depend on it (tests/test_ray_pools.py)
    )

    def identity(self) -> dict[str, Any]:
        """What determines a step's results: the resolved config without locations (see ``LOCATION_SECTIONS``);
        the model's weights by their SHA-256 where it is pinned, not by the path they were read from."""
        doc = self.model_dump(mode="json")
        for section in self.LOCATION_SECTIONS:
            doc.pop(section, None)
        if doc["model"].get("sha256"):
            doc["model"].pop("checkpoint", None)
        for section, key in (("evaluation", "zero_shot_set"), ("model", "checkpoint")):
            if doc[section].get(key):
                doc[section][key] = self._without_workspace(doc[section][key])
        return doc

    def _without_workspace(self, value: str) -> str:
        """A path as the same string wherever it was written from: absolute, or ``<workspace>/...`` inside it."""
        if "://" in value:
            return value
        path, ws = self.path(value), self.workspace_path
        return f"<workspace>/{path.relative_to(ws).as_posix()}" if path.is_relative_to(ws) else str(path)

    def sha256(self) -> str:
        """Digest of ``identity()`` (stable key order): in every run key and in each version's lineage. It holds
        no path of the workspace, so a workspace moved to another folder or machine keeps its keys."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def portable(self) -> dict[str, Any]:
        """The resolved config as plain data with absolute paths: what crosses to another process or worker (a
        Prefect flow-run parameter, the deployed config), so credentials are redacted; the receiving side gets
        them from its environment, or, in this process, back from :func:`components.settings.credentials.restore`."""
        from components.settings.credentials import redacted

        doc = redacted(self.model_dump(mode="json"))
        doc["workspace"] = str(self.workspace_path)
        doc["drop_zone"] = self.location(self.drop_zone)
        for section, key in (
            ("dvc", "remote"),
            ("evaluation", "zero_shot_set"),
            ("model", "checkpoint"),
            ("artifacts", "root"),
        ):
            value = doc[section][key]
            if value and "://" not in value:
                doc[section][key] = str(self.path(value))
        return doc

    def write_resolved(self, folder: Path) -> Path:
        from components.support.storage import atomic_write_text

        path = Path(folder) / "config.resolved.yaml"
        header = "# cliploop resolved configuration (defaults → file → environment → flags)\n"
        atomic_write_text(path, header + self.to_yaml())
        return path
