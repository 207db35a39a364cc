"""The embedded default's Prefect API, started before the night needs it.

With no Prefect server configured, Prefect starts a temporary one when the first flow run asks for a client: its
process imports Prefect's server and opens its database, 4 s on an idle 2-core machine, and the parent first imports
the server's modules itself (another 2.7 s) only to launch it. The night then waits for all of it. A command that
will run a night in this process (``cliploop demo``, ``cliploop nightly``) calls :func:`start_early` first, so the
same server (Prefect's own app, database and settings) boots on the other core while the command imports torch,
MLflow and Great Expectations and prepares its data; :func:`api_for_night` then waits for whatever is left of its
start-up and points the night's flow runs at it. What Prefect records is unchanged: the runs, task runs, states
and logs land in the same database as with Prefect's own temporary server; only flow-run heartbeats, which
nothing can watch on a server that ends with the night, are not sent.

A server configured by the user (``PREFECT_API_URL``, a profile, the stack) is used as before, and nothing starts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

PORT_TAKEN = 3  # uvicorn's exit code when its port was taken between our choice and its bind


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TemporaryServer:
    """Prefect's API app under uvicorn in a process of its own, on a free loopback port (what Prefect's
    ``SubprocessASGIServer`` runs, launched without importing the server's modules here)."""

    port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the warm-up and the night both wait

    def __post_init__(self) -> None:
        self.process = self._launch()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> subprocess.Popen:
        import prefect

        env = {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no calls home from a server nobody asked for
            **os.environ,
            # Prefect's own switches for its temporary server: no UI, ephemeral services only.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        # Its error output goes to a file, read only if it dies: a pipe nobody reads would fill during a long night
        # and block the server.
        self._errors = tempfile.TemporaryFile()
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self._errors)

    def ready(self) -> float:
        """Wait until the API answers its health check (within Prefect's own start-up limit for its temporary
        server, ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``); the seconds waited. A server that died says
        why."""
        from prefect.settings import get_current_settings

        timeout_s = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
        with self._lock:
            return self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> float:
        import httpx

        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == PORT_TAKEN:
                    self.port = _free_port()
                    self.process = self._launch()
                elif code is not None:
                    self._errors.seek(0)
                    err = self._errors.read().decode(errors="replace").strip().splitlines()[-5:]
                    raise RuntimeError(f"Prefect's temporary server exited with code {code}: {' | '.join(err)}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return time.perf_counter() - started
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s")

    def warm(self) -> None:
        """Once the server answers, ask it what a night's first calls ask (its version; flows and flow runs), so
        that its first-request work (database connections, query set-up) is done before the night's flow starts.
        A failure here is left to the night's own calls to meet and report."""
        import httpx

        with contextlib.suppress(Exception), httpx.Client(base_url=self.api_url, timeout=30.0) as client:
            self.ready()
            client.get("/admin/version")
            client.post("/flows/filter", json={"limit": 1})
            client.post("/flow_runs/filter", json={"limit": 1})

    def stop(self, wait_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_SERVER: list[TemporaryServer] = []  # at most one per process, for the life of the process


def configured_api() -> str | None:
    """The Prefect API the user configured (environment, profile), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def start_early() -> None:
    """Start the temporary server now, in the background, unless an API is configured or one was started already.

    The night's reaper (``flows/lifeline.py``) starts first, so that the server is among the processes it ends
    should this one be killed."""
    from prefect.settings import get_current_settings

    if _SERVER or configured_api() or not get_current_settings().server.ephemeral.enabled:
        return
    from flows.lifeline import ensure_reaper

    ensure_reaper()
    server = TemporaryServer()
    _SERVER.append(server)
    threading.Thread(target=server.warm, name="cliploop-prefect-warm-up", daemon=True).start()
    # Registered before Prefect's exit hooks (which drain its log and event workers into this server), so it runs
    # after them.
    atexit.register(server.stop)


@contextlib.contextmanager
def api_for_night() -> Iterator[float]:
    """Flow runs inside point at the early-started server once it answers (the seconds waited for it are
    yielded); without one, Prefect's own behaviour (a configured API, or its temporary server) is unchanged."""
    if not _SERVER or configured_api():
        yield 0.0
        return
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = _SERVER[0]
    try:
        waited = server.ready()
    except RuntimeError as exc:  # the night still runs: on Prefect's own temporary server, as without this module
        print(f"cliploop: {exc}; Prefect starts its own temporary server instead", file=sys.stderr)
        _SERVER.clear()
        yield 0.0
        return
    # No flow-run heartbeats: they let a long-lived server tell a crashed run, and this one dies with the process
    # that would send them (its runs left Running are swept by the next night, flows/nightly.py). Each one held its
    # flow run up to a second as it ended (Prefect joins a heartbeat thread that sleeps in 1 s steps).
    with temporary_settings(updates={PREFECT_API_URL: server.api_url, "flows.heartbeat_frequency": None}):
        # Prefect's log and event workers run in threads of their own that do not copy this context: they see the
        # same API through the global settings context.
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield waited
