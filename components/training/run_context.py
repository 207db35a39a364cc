"""A configured run's context: what ``Context`` (the method contract's view of a run, components/methods/base.py)
holds for a given configuration and backbone, and the configured pool-building engine.

Apart from the contract because it reads the configuration and picks compute engines (``compute.engine``:
this process, or Ray's encoder actors), which the contract a method implements does not know about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from components.methods.base import Context
from components.model.pool_engine import LocalEngine

if TYPE_CHECKING:
    from components.model.backbones import Backbone


def engine_for(config, addresses: dict[str, dict] | None = None):
    """The configured pool-building engine (``compute.engine``); ``addresses``: the DVC content addresses a
    step was handed, which a Ray engine gives its actors instead of this machine's folders."""
    if config.compute.engine == "ray":
        from components.model.ray_pools import RayEngine

        return RayEngine(config, addresses)
    return LocalEngine()


def context_for(config, backbone: Backbone, **fields: Any) -> Context:
    """The context of a configured run: batch size, workers, prompts and seed from ``config.evaluation``;
    the base model (for teachers) and locations resolved as the config says; ``fields``: the rest
    (task prompts, prebuilt pools, how to locate learned tasks, progress, checkpoints)."""
    from components.model.backbones import load_backbone
    from components.model.data import resolve_decoder

    workers = config.evaluation.workers
    if workers is None:
        workers = min(8, torch.get_num_threads()) if str(backbone.device).startswith("cuda") else 0
    return Context(
        backbone=backbone,
        batch_size=config.evaluation.batch_size,
        workers=workers,
        templates=config.evaluation.templates,
        seed=config.evaluation.seed,
        load_base=lambda: load_backbone(config.model, frozen=True),  # teachers only run forward
        resolve=config.location,
        **(
            {"pool_engine": engine_for(config), "decoder": resolve_decoder(config.model.decoder, backbone.device)}
            | fields
        ),
    )
