"""The model that scores a drop's training labels at ingestion (``validation.label_doubt``): the registry's champion,
or, while there is none, the base model under the configured method with nothing learned (what the chain's first
update starts from). Intake only sees the :class:`components.intake.label_doubt.LabelScorer` made here: it may not
reach up to the registry or the model.

The champion is loaded as ``cliploop predict`` loads it (its files checked against the digests the registry
pinned), and it scores the images as evaluation does: the method's ``scores`` over the drop's declared classes,
times the backbone's learned temperature, through a softmax.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from components.settings.config import Config
from components.support import storage

_loaded: dict[tuple, Any] = {}  # one model, kept across the drops of a night: (workspace, version, config) -> model


class ChampionScorer:
    """Loads its model on the first call (a drop with nothing to score loads none)."""

    def __init__(self, config: Config):
        self.config = config
        self.name = "the champion"

    def __call__(self, dataset: str, class_names: list[str], images: list[bytes]) -> np.ndarray:
        import torch

        from components.model.data import class_key

        model = self._model()
        keys = [class_key(dataset, name) for name in class_names]
        names = dict(zip(keys, class_names, strict=True))
        ctx = model["ctx"]
        batch = torch.stack([ctx.backbone.preprocess(_decode(data)) for data in images])
        with torch.inference_mode():
            scores = model["method"].scores(model["state"], batch, keys, names, ctx).float()
            return (model["logit_scale"] * scores).softmax(dim=1).cpu().numpy()

    def _model(self) -> dict[str, Any]:
        from components.pipeline.chain import ledger_of, registry_of

        with ledger_of(self.config) as ledger:
            registered = any(record.model_version for record in ledger.all())
        # No version registered yet: no champion, and no need to open (or create) the registry to learn so.
        version = registry_of(self.config).alias("champion") if registered else None
        key = (str(self.config.workspace_path), version, self.config.sha256())
        self.name = f"the champion, version {version}" if version else "the base model (no champion yet)"
        if key not in _loaded:
            _loaded.clear()
            try:
                _loaded[key] = _load(self.config, version)
            except Exception as exc:  # kept too: the night's next drops are not made to wait for it again
                _loaded[key] = exc
        model = _loaded[key]
        if isinstance(model, Exception):
            raise model
        self.name = model["name"]
        return model


def champion_scorer(config: Config) -> ChampionScorer:
    return ChampionScorer(config)


def _load(config: Config, version: int | None) -> dict[str, Any]:
    from components.model.backbones import load_backbone
    from components.model.state import LearnerState
    from components.training.learn import make_method
    from components.training.run_context import context_for

    if version is None:
        method = make_method(config)
        _check_tag(config)
        backbone = load_backbone(config.model, frozen=True)
        state = LearnerState(method=method.name, backbone=backbone.reference)
        name = f"the base model ({config.model.name}; no champion yet)"
    else:
        state = _champion_state(config, version)
        method = make_method(config, state.method)
        method.settings = method.Settings.model_validate(state.method_settings or {})
        if state.weights is None:
            _check_tag(config)
        backbone = load_backbone(config.model, weights=state.weights, frozen=True)
        name = f"the champion, version {version} ({state.method})"
    scale = getattr(backbone.model, "logit_scale", None)
    # Scores are cosine similarities: CLIP's learned temperature makes them probabilities (as the served model does).
    logit_scale = float(scale.detach().exp()) if scale is not None else 100.0
    return {
        "method": method,
        "state": state,
        "ctx": context_for(config, backbone),
        "logit_scale": logit_scale,
        "name": name,
    }


def _champion_state(config: Config, version: int):
    """The version's learner state, its files checked against the digests the registry pinned (a copy of its own,
    gone once loaded: ``steps.parent_state`` keeps the night's)."""
    from components.model.state import LearnerState
    from components.pipeline.chain import registry_of, runtime_dir

    with tempfile.TemporaryDirectory(prefix="label-scoring-", dir=runtime_dir(config)) as tmp:
        registry_of(config).download_state(version, Path(tmp))
        return LearnerState.load(Path(tmp) / "state")


def _check_tag(config: Config) -> None:
    """Fetch (or find in the cache) the weights of a pretrained tag before building the model: offline, a missing
    download fails here in a fraction of a second instead of after building the whole model."""
    if config.model.pretrained and not config.model.checkpoint:
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        from components.model.backbones import register_builtin_configs

        register_builtin_configs()
        found = get_pretrained_cfg(config.model.name, config.model.pretrained)
        if found:  # an unknown tag is load_backbone's to explain; the same cache folder as load_backbone's
            download_pretrained(found, cache_dir=str(storage.cache_dir() / "open_clip"))


def _decode(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
