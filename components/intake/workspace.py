"""The workspace: where its parts lie, how it is set up (git + DVC with its remote) and the handles that every
command opens onto it (the task ledger, the S3 settings).

Kept apart from ingestion because everything that touches the workspace needs it (ingestion, the dry-run
validation, the pipeline's chain, the command line and the demo), and a change to the layout or to the remote's
set-up is a change of its own, not of how a drop is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.intake import versioning
from components.intake.ledger import Ledger
from components.settings.config import Config
from components.support import storage
from components.support.artifact_store import ArtifactStore


class NotAWorkspace(RuntimeError):
    """A command that writes was run where there is no workspace and none was named: it would have made one."""


def workspace_paths(config: Config) -> dict[str, Path]:
    ws = config.workspace_path
    state = ws / versioning.STATE_DIR
    return {
        "ws": ws,
        "state": state,
        "ledger": state / "ledger.sqlite",
        "staging": state / "staging",
        "quarantine": state / "quarantine",
        "tasks": ws / versioning.DATA_DIR / "tasks",
        "reports": ws / versioning.DATA_DIR / "reports",
    }


def open_ledger(config: Config) -> Ledger:
    return Ledger(workspace_paths(config)["ledger"])


def remote_spec(config: Config) -> versioning.RemoteSpec:
    url = config.dvc.remote
    url = config.location(url) if url else versioning.default_remote(config.workspace_path)
    return versioning.RemoteSpec(
        url=url,
        name=config.dvc.remote_name,
        endpoint_url=config.s3.endpoint_url,
        region=config.s3.region,
        connect_timeout=config.s3.connect_timeout_s,
        read_timeout=config.s3.read_timeout_s,
        configured=bool(config.dvc.remote),
    )


def ensure_workspace(config: Config) -> list[str]:
    return versioning.init_workspace(config.workspace_path, remote_spec(config))


def is_initialised(config: Config) -> bool:
    """The workspace has been set up (git + DVC, ``data.dvc``), by ``cliploop init`` or an earlier ingest."""
    ws = config.workspace_path
    return (ws / ".dvc").is_dir() and (ws / "data.dvc").is_file()


def require_workspace(config: Config, named: bool) -> None:
    """Refuse to make a workspace nobody asked for: an uninitialised workspace may be set up by a command only
    when it was ``named`` (a config file, ``-w``, ``--set workspace=``, ``CLIPLOOP__WORKSPACE``); otherwise the
    command would silently turn the current folder into a git + DVC repository. Raises NotAWorkspace."""
    if named or is_initialised(config):
        return
    raise NotAWorkspace(
        f"{config.workspace_path} is not a cliploop workspace (no cliploop.yaml, no git + DVC set-up); "
        "run `cliploop init` to make it one, or name one with -w DIR or -c FILE"
    )


def config_text(settings: dict[str, Any]) -> str:
    """The commented default ``cliploop.yaml`` (what ``cliploop init`` writes) with the given dotted keys set."""
    from components.settings.config_file import default_config_yaml

    text = default_config_yaml()
    for dotted, value in settings.items():
        text = _set_key(text, dotted, value)
    return text


def _set_key(text: str, dotted: str, value: Any) -> str:
    # Edits the one line, so every other key keeps its comment. JSON scalars are YAML scalars.
    *sections, key = dotted.split(".")
    lines = text.splitlines()
    start = 0
    for depth, section in enumerate(sections):
        start = lines.index("  " * depth + section + ":", start) + 1
    prefix = "  " * len(sections) + key + ":"
    at = next(i for i in range(start, len(lines)) if lines[i].startswith(prefix + " "))
    lines[at] = f"{prefix} {json.dumps(value)}"
    return "\n".join(lines) + "\n"


def s3_settings(config: Config) -> storage.S3Settings:
    return storage.S3Settings(
        endpoint_url=config.s3.endpoint_url,
        region=config.s3.region,
        max_attempts=config.s3.max_attempts,
        connect_timeout=config.s3.connect_timeout_s,
        read_timeout=config.s3.read_timeout_s,
    )


def status(config: Config) -> list[dict]:
    paths = workspace_paths(config)
    if not paths["ledger"].exists():
        return []
    with open_ledger(config) as ledger:
        return [r.to_dict() for r in ledger.all()]


def store_of(config: Config) -> ArtifactStore:
    """The configured artifact store (``artifacts.root``, else the workspace's ``.cliploop`` folder), with this
    machine's cache."""
    if config.artifacts.root:
        root = config.location(config.artifacts.root)
    else:
        state = workspace_paths(config)["state"]
        state.mkdir(parents=True, exist_ok=True)
        root = str(state)
    return ArtifactStore(root, storage.cache_dir() / "artifacts", s3_settings(config))
