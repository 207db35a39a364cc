"""Typed, validated configuration: defaults → cliploop.yaml → environment → command-line overrides.

The config is resolved once per command and written beside that command's outputs
(``config.resolved.yaml``), so every report, pool and model can be traced to the exact settings used.

Environment overrides use ``CLIPLOOP__<SECTION>__<KEY>=value`` (values parsed as YAML scalars, so
``CLIPLOOP__VALIDATION__MAX_PIXELS=1000`` is an int); command-line overrides are ``--set section.key=value``.
Unknown keys and bad values are errors that name the key and where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIG_FILENAME = "cliploop.yaml"
ENV_PREFIX = "CLIPLOOP__"


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


class DvcConfig(Section):
    remote: str | None = Field(
        None,
        description="DVC remote: a folder or an s3:// URI; null = a local folder .cliploop/dvc-remote in the workspace",
    )
    remote_name: str = Field("storage", description="name of the DVC remote in the workspace's .dvc/config")
    push: bool = Field(True, description="push every accepted task to the remote right after it is committed")


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
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        """Digest of the resolved config (stable key order) for lineage records."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def portable(self) -> dict[str, Any]:
        """The resolved config as plain data with absolute paths: what crosses to another process or worker."""
        doc = self.model_dump(mode="json")
        doc["workspace"] = str(self.workspace_path)
        doc["drop_zone"] = self.location(self.drop_zone)
        for section, key in (("dvc", "remote"), ("evaluation", "zero_shot_set"), ("model", "checkpoint")):
            value = doc[section][key]
            if value and "://" not in value:
                doc[section][key] = str(self.path(value))
        return doc

    def write_resolved(self, folder: Path) -> Path:
        from components.storage import atomic_write_text

        path = Path(folder) / "config.resolved.yaml"
        header = "# cliploop resolved configuration (defaults → file → environment → flags)\n"
        atomic_write_text(path, header + self.to_yaml())
        return path


# ---- loading -------------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{source}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def find_config_file(
    explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Path | None:
    env = os.environ if env is None else env
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.resolve()
    if env.get("CLIPLOOP_CONFIG"):
        path = Path(env["CLIPLOOP_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"CLIPLOOP_CONFIG points at a missing file: {path}")
        return path.resolve()
    candidate = (cwd or Path.cwd()) / CONFIG_FILENAME
    return candidate.resolve() if candidate.is_file() else None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the configuration. ``base`` replaces the built-in defaults' starting point (e.g. the demo's)."""
    env = os.environ if env is None else env
    tree: dict = dict(base or {})
    sources: list[tuple[str, str]] = []

    file_path = find_config_file(path, env, cwd)
    if file_path is not None:
        try:
            text = file_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_path}: cannot be read as a text file ({exc})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_problem(file_path, text, exc)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: the top level must be a mapping of keys to values")
        tree = _deep_merge(tree, loaded)
        sources.append(("file", str(file_path)))

    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _scalar(env[name]), f"environment variable {name}")
            sources.append(("env", name))

    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_dotted(tree, key.strip(), _scalar(value), f"--set {key.strip()}")
        sources.append(("flag", key.strip()))

    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, file_path)) from None
    config._base_dir = file_path.parent if file_path else (cwd or Path.cwd()).resolve()
    return config


def yaml_problem(path: Path | str, text: str, exc: yaml.YAMLError) -> str:
    """The parser's complaint as file, line, column and what is wrong, with the offending line quoted
    (PyYAML's own message names "<unicode string>" instead of the file and spans several lines).
    Also used for task.yaml."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    lines = text.splitlines()
    quoted = f"\n  line {mark.line + 1}: {lines[mark.line]}" if mark.line < len(lines) else ""
    return (
        f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
        + (f" ({context})" if context else "")
        + quoted
    )


def config_from_doc(doc: Mapping[str, Any]) -> Config:
    """A config sent as data by :meth:`Config.portable` (its paths are absolute already)."""
    try:
        config = Config.model_validate(dict(doc))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, None)) from None
    config._base_dir = Path(config.workspace).resolve() if Path(config.workspace).is_absolute() else Path.cwd()
    return config


def _explain(exc: ValidationError, file_path: Path | None) -> str:
    where = str(file_path) if file_path else "configuration"
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = (
            "unknown key (check the spelling; `cliploop init` writes every key with its meaning)"
            if err["type"] == "extra_forbidden"
            else err["msg"]
        )
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


# ---- a commented default file ----------------------------------------------------------------------


def default_config_yaml() -> str:
    """The default configuration as YAML, every key preceded by its meaning (written by `cliploop init`)."""
    lines = [
        "# cliploop configuration. Precedence: defaults < this file < CLIPLOOP__SECTION__KEY env vars < --set flags.",
        "# Relative paths are relative to this file's folder.",
        "",
    ]
    _emit(Config(), lines, indent=0)
    return "\n".join(lines) + "\n"


def _emit(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 1)
            continue
        if field.description:
            lines.append(f"{pad}# {field.description}")
        dumped = yaml.safe_dump({name: value}, default_flow_style=True, sort_keys=False).strip()
        # Flow style wraps the pair in braces: remove only those (a value may be "{}" itself).
        lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
