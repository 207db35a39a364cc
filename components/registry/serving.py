"""The registered model as an MLflow pyfunc ("model from code"): images in, labels out.

MLflow loads this file by path (``RunLog.log_pyfunc`` logs a pyfunc with ``python_model=<this file>``), so
nothing is pickled: the model's artifacts are the learner-state bundle (safetensors + JSON, checksums verified on
load) and the resolved config that names the backbone. ``mlflow.pyfunc.load_model("models:/cliploop@champion")``
then predicts::

    model.predict(pandas.DataFrame({"image": [b"<jpeg bytes>", "/path/to/file.png", ...]}))
    -> DataFrame with columns label (class name), class_key ("<dataset>/<name>"), score

The logged model's signature says so (``registry_runs.model_signature``: a binary ``image`` column), and
``mlflow models serve`` takes the same column as base64 strings in JSON
(``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``), decoded to bytes by the signature.

The backbone's base weights are resolved from the config (pretrained tag, local path or ``s3://`` URI,
SHA-256 checked); a method that changed the weights stores them in the bundle, whose tensor files stand in the
model as manifests of blobs kept once in the artifact store (``components/registry/tensor_store.py``): they are
found through ``$CLIPLOOP_TENSOR_STORE``, the config's ``artifacts.root`` or where they were written, and each
blob is checked against its digest before it is used.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

MAX_PIXELS = 40_000_000  # same default as validation.max_pixels: a decompression bomb is refused, not decoded


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if value.startswith("data:") and "," in value:
            return base64.b64decode(value.split(",", 1)[1])
        path = Path(value)
        if path.is_file():
            return path.read_bytes()
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError(f"image {value[:60]!r}: not a file path, data URI or base64 string") from None
    raise ValueError(f"image of type {type(value).__name__}: expected bytes, a path or a base64 string")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"image of {im.width}x{im.height} pixels is larger than the limit of {max_pixels}")
        return im.convert("RGB")


class _CliploopModel:
    def load_context(self, context) -> None:
        import torch  # noqa: F401  (imported before components so that thread settings apply)

        from components.model.backbones import load_backbone
        from components.registry.version_tensors import load_state
        from components.settings.config_loading import load_config
        from components.training.learn import make_method
        from components.training.run_context import context_for

        config = load_config(context.artifacts["config"], env={})
        self.max_pixels = config.validation.max_pixels
        # Its tensors may stand as manifests of blobs in the artifact store: made whole first, every blob checked.
        self.state = load_state(Path(context.artifacts["state"]), config)
        self.method = make_method(config, self.state.method)
        self.method.settings = self.method.Settings.model_validate(self.state.method_settings or {})
        backbone = load_backbone(config.model, weights=self.state.weights)
        self.ctx = context_for(config, backbone)
        self.keys = [c.key for c in self.state.classes]
        self.names = {c.key: c.name for c in self.state.classes}
        scale = getattr(backbone.model, "logit_scale", None)
        # Scores are cosine similarities: CLIP's learned temperature turns them into a usable softmax.
        self.logit_scale = float(scale.detach().exp()) if scale is not None else 100.0

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        if isinstance(model_input, pd.DataFrame):
            column = "image" if "image" in model_input.columns else model_input.columns[0]
            values = list(model_input[column])
        else:
            values = list(model_input)
        if not self.keys:
            raise ValueError("this model has learned no classes yet")
        rows = []
        batch = int((params or {}).get("batch_size", self.ctx.batch_size))
        for start in range(0, len(values), batch):
            images = torch.stack(
                [
                    self.ctx.backbone.preprocess(decode_image(_image_bytes(v), self.max_pixels))
                    for v in values[start : start + batch]
                ]
            )
            with torch.inference_mode():
                probs = (
                    self.logit_scale * self.method.scores(self.state, images, self.keys, self.names, self.ctx).float()
                ).softmax(dim=1)
            best = probs.max(dim=1)
            for score, index in zip(best.values.tolist(), best.indices.tolist()):
                key = self.keys[index]
                rows.append({"label": self.names[key], "class_key": key, "score": score})
        return pd.DataFrame(rows, columns=["label", "class_key", "score"])


with warnings.catch_warnings():
    # MLflow asks for type hints on predict (to infer a signature); the input is a table of encoded images.
    warnings.simplefilter("ignore", UserWarning)

    class CliploopModel(_CliploopModel, mlflow.pyfunc.PythonModel):
        pass


mlflow.models.set_model(CliploopModel())
