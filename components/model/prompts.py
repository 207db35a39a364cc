"""Class prompts: template sets and the text embeddings of class names.

Template sets (the protocol moves zero-shot accuracy by several points, so its name is logged with
every accuracy):

- ``lvp``: ``"a photo of a {}"``, LVP-CLIP's single prompt (a space, no trailing period);
- ``single``: ``"a photo of a {}."``, CLIP's single prompt;
- ``ensemble``: CLIP's 80 ImageNet templates; embeddings are averaged after normalisation, then
  renormalised (as ZSCL's evaluation does);
- ``simple``: open_clip's 7-template subset of the ensemble;
- ``task``: each dataset's own templates from its ``task.yaml`` ``prompts`` (e.g. MTIL's), else ``ensemble``;
- any other string containing ``{}`` is used as a single template (e.g. a dataset-specific one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import AfterValidator

Template = Callable[[str], str]


def _fmt(pattern: str) -> Template:
    return lambda name: pattern.format(name)


def get_templates(name: str) -> list[Template]:
    if name == "lvp":
        return [_fmt("a photo of a {}")]
    if name == "single":
        return [_fmt("a photo of a {}.")]
    if name in ("ensemble", "simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES if name == "ensemble" else SIMPLE_IMAGENET_TEMPLATES)
    if "{}" in name:
        return [_fmt(name)]
    raise ValueError(
        f"unknown prompt template set {name!r}: use lvp, single, ensemble, simple, or a template containing {{}}"
    )


def task_templates(prompts: list[str] | None) -> list[Template]:
    """A task's own prompts (task.yaml ``prompts``); without them, CLIP's ensemble."""
    return [_fmt(p) for p in prompts] if prompts else get_templates("ensemble")


def _with_slot(value: str) -> str:
    if "{}" not in value:
        raise ValueError("needs a {} where the class name goes")
    return value


# A prompt template a user writes in a setting: refused without the {} its class name goes into.
PromptTemplate = Annotated[str, AfterValidator(_with_slot)]


def clean_class_name(name: str) -> str:
    """Underscores to spaces, as the MTIL code cleans dataset class names."""
    return " ".join(name.replace("_", " ").split())


def class_text_embeddings(backbone, names: list[str], templates: list[Template]) -> torch.Tensor:
    """One L2-normalised fp32 text embedding per class name (CPU), averaged over the templates."""
    from components.model.backbones import encode_texts

    if not names:
        return torch.zeros(0, backbone.embed_dim)
    cleaned = [clean_class_name(n) for n in names]
    prompts = [template(name) for name in cleaned for template in templates]
    per_prompt = encode_texts(backbone, prompts).view(len(names), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)
