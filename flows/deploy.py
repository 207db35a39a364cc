"""``cliploop deploy``: register the deployments of ``infra/prefect.yaml`` against a Prefect server.

The resolved configuration is written to ``<workspace>/.cliploop/deployed-config.yaml`` (absolute paths)
and the nightly deployment points at it, so what runs at night is exactly what was resolved here; the
schedule (cron + explicit time zone) and the work-pool names come from its ``orchestration`` section.
Being a copy, it does not follow later edits of ``cliploop.yaml``: :func:`drift` lists where the two differ
(``cliploop status`` shows it), and deploying again replaces the copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from components.settings.config import Config

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "infra" / "prefect.yaml"


# Said at every deploy: the deployments run a copy, so an edit of cliploop.yaml is not what the next night runs.
DEPLOYED_NOTE = (
    "note: scheduled nights run that copy of the configuration, not cliploop.yaml: after editing cliploop.yaml, "
    "run `cliploop deploy` again (`cliploop status` says when the two differ)"
)


class DeployError(RuntimeError):
    pass


def deploy(config: Config, api_url: str | None = None) -> dict[str, str]:
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise DeployError(
            "no Prefect server: set PREFECT_API_URL (`cliploop stack up` writes it to "
            "<workspace>/.cliploop/stack/env) or pass --api-url"
        )
    if not PREFECT_FILE.is_file():
        raise DeployError(f"{PREFECT_FILE} is missing: deploy from a checkout of the cliploop repository")
    target = write_deployed(config)
    o = config.orchestration
    values = {
        "CLIPLOOP_REPO": str(REPO),
        "CLIPLOOP_CONFIG": str(target),
        "CLIPLOOP_CRON": o.schedule_cron,
        "CLIPLOOP_TIMEZONE": o.timezone,
        "CLIPLOOP_CPU_POOL": o.cpu_pool,
        "CLIPLOOP_GPU_POOL": o.gpu_pool or "gpu",
    }
    env = {**os.environ, **values, "PREFECT_API_URL": api_url}
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise DeployError(
            f"prefect deploy failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return values


def deployed_path(config: Config) -> Path:
    return config.workspace_path / ".cliploop" / "deployed-config.yaml"


def write_deployed(config: Config) -> Path:
    """The copy of the resolved configuration that the nightly deployment runs with."""
    target = deployed_path(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "# written by `cliploop deploy`: the configuration the deployments run with\n"
        + yaml.safe_dump(config.portable(), sort_keys=False)
    )
    return target


def drift(config: Config) -> list[str] | None:
    """Where the deployed configuration differs from ``config`` (as resolved now: file, environment, --set), one
    ``key: deployed A, here B`` per key; None when this workspace was never deployed."""
    path = deployed_path(config)
    if not path.is_file():
        return None
    try:
        deployed = _flat(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path} cannot be read ({exc})"]
    here = _flat(config.portable())
    return [
        f"{key}: deployed {_shown(deployed, key)}, here {_shown(here, key)}"
        for key in sorted(set(deployed) | set(here))
        if key not in deployed or key not in here or deployed[key] != here[key]
    ]


def drift_text(config: Config, differences: list[str]) -> str:
    shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
    return (
        f"deployed config differs: scheduled nights run {deployed_path(config)}, not this configuration "
        f"({shown}); run `cliploop deploy` again to use this one"
    )


def _flat(doc: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(doc: dict[str, object], key: str) -> str:
    if key not in doc:
        return "(absent)"
    return doc[key] if isinstance(doc[key], str) else json.dumps(doc[key])
