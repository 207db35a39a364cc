"""What the fault suite's modules share (``tests/test_faults.py``, ``tests/test_faults_registry.py``): the test's
config, a workspace with one task ingested for real (made once per module), the pipeline's steps run here or in a
child process with ``CLIPLOOP_FAULT`` set, and a gateway that answers 503. Nothing here mocks a part of cliploop."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from components.intake.ledger import Ledger
from components.pipeline import review, steps
from tests.conftest import REPO, pipeline_config
from tests.drops import make_task
from tests.fault_steps import learn_steps

# Fine-tuning for 4 steps of 2 images with a checkpoint after step 2: the rows that kill a training mid-way.
CHECKPOINTED_FINETUNE = (
    "method.name=finetune",
    "method.settings.iterations=4",
    "method.settings.batch_size=2",
    "method.settings.checkpoint_every=2",
    "method.settings.warmup_steps=0",
)


def fault_cfg(tmp_path, ckpt, *extra, start: Path | None = None):
    """The test's config; with ``start``, its workspace begins as a copy of that one (``ingested``, conftest)."""
    if start is not None:
        shutil.copytree(start, tmp_path / "ws", symlinks=True)
    return pipeline_config(tmp_path, ckpt, "gate.max_forgetting=100", *extra)


def cli_args(cfg, ckpt) -> list[str]:
    path, sha = ckpt
    return [
        "-w",
        str(cfg.workspace_path),
        "--set",
        f"model.checkpoint={path}",
        "--set",
        f"model.sha256={sha}",
        "--set",
        "model.name=cliploop-tiny",
        "--set",
        "model.pretrained=null",
    ]


def ingest(cfg, tmp_path, task_id, classes, **kw) -> None:
    make_task(tmp_path / "incoming", task_id, classes, train=3, test=2, **kw)
    for location in steps.discover(cfg):
        steps.ingest(location, cfg)


def learn(cfg, task_id: str = "t-a") -> int:
    """Learn one ingested task with the pipeline's own steps; returns its version (gate passed)."""
    version, update = learn_steps(cfg, task_id)
    assert review.apply_gate(cfg, version, update)["verdict"] == "pass"
    return version


def steps_in_child(cfg, task_id: str, fault: str) -> subprocess.CompletedProcess:
    """``learn_steps`` in a child process with ``CLIPLOOP_FAULT`` set (the fault kills it for real)."""
    import json

    return subprocess.run(
        [sys.executable, "-m", "tests.fault_steps", json.dumps(cfg.portable()), task_id],
        cwd=REPO,
        text=True,
        env=os.environ | {"CLIPLOOP_FAULT": fault},
        capture_output=True,
        timeout=300,
    )


def states(cfg) -> dict[str, str]:
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        return {r.task_id: r.state for r in ledger.all()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_tracking(cfg, uri: str):
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


@contextlib.contextmanager
def overloaded_gateway():
    """An HTTP server on 127.0.0.1 that answers every request ``503 Service Unavailable`` with an HTML body,
    as a load balancer in front of an overloaded or restarting MLflow server does. Yields (url, hit counter)."""
    hits = {"n": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _unavailable(self):
            hits["n"] += 1
            body = b"<html><body>503 Service Unavailable</body></html>"
            self.send_response(503)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _unavailable

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def env_with_prefect_api() -> dict[str, str]:
    """This process's environment, pointing a child's Prefect client at the module's server (``prefect_api``)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
