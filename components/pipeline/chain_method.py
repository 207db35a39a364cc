"""A chain keeps one method: each version is learned on top of its parent's learner state, which only the method
that made it can read (another method fails on it late, after the night has ingested and started training). So a
night whose configured method is not the chain's is refused before it changes anything (``check``); a new method
starts a new chain in a new workspace (``docs/pipeline.md``, "One chain, one method").
"""

from __future__ import annotations

from components.pipeline.chain import PipelineError, registry_of, version_tags_or_none
from components.settings.config import Config

# The versions a night builds on: the champion, and a challenger whose approval would make it the champion.
HEADS = ("champion", "challenger")


class MethodSwitch(PipelineError):
    """The configured method is not the one the chain was learned with. Nothing was changed."""


def chain_method(config: Config) -> tuple[str, int, str] | None:
    """(alias, version, method) of the first of ``HEADS`` that holds a version with a recorded method; None for a
    chain with neither (nothing learned yet, or every version rejected): any method may start it."""
    registry = registry_of(config)
    for alias in HEADS:
        version = registry.alias(alias)
        method = (version_tags_or_none(registry, version) or {}).get("method") if version is not None else None
        if method:
            return alias, version, method
    return None


def check(config: Config) -> None:
    """Raise ``MethodSwitch`` (one line: both methods and how to start a new chain) when ``method.name`` is not the
    chain's method. Reads the registry only; an embedded registry not made yet holds no chain (nothing is created)."""
    if not config.mlflow.tracking_uri and not (config.workspace_path / ".cliploop" / "mlflow.db").is_file():
        return
    head = chain_method(config)
    if head is None or head[2] == config.method.name:
        return
    alias, version, method = head
    wanted = config.method.name
    raise MethodSwitch(
        f"method.name is {wanted!r} but this chain's {alias} (version {version} of {config.mlflow.registered_model!r}) "
        f"was learned with {method!r}, and a chain keeps its method; nothing was changed. To learn with {wanted}, "
        f"start a new chain in a new workspace: `cliploop init NEW --drop-zone {config.location(config.drop_zone)}`, "
        f"set method.name: {wanted} in NEW/cliploop.yaml, then `cliploop nightly -w NEW` "
        '(docs/pipeline.md, "One chain, one method")'
    )
