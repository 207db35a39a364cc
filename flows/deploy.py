"""``cliploop deploy``: register the deployments of ``infra/prefect.yaml`` against a Prefect server.

The resolved configuration is written to ``<workspace>/.cliploop/deployed-config.yaml`` (absolute paths)
and the nightly deployment points at it, so what runs at night is exactly what was resolved here; the
schedule (cron + explicit time zone) and the work-pool names come from its ``orchestration`` section.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from components.settings.config import Config

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "infra" / "prefect.yaml"


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
    target = config.workspace_path / ".cliploop" / "deployed-config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "# written by `cliploop deploy`: the configuration the deployments run with\n"
        + yaml.safe_dump(config.portable(), sort_keys=False)
    )
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
