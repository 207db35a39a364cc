"""What one start of each of the stack's servers costs, as JSON (docs/benchmarks.md, "The test suite's CPU").

    .venv/bin/python benchmarks/server_start.py --repeat 2

Starts each server alone on 127.0.0.1 (a fresh SQLite database and folder each time), waits until its health URL
answers, lets it settle ``--settle`` seconds, then reads the CPU time (user + system, from /proc: Linux only) of the
server and of every process below it, living or already reaped, and stops it (SIGTERM to its process group), timing
the stop. Servers: ``mlflow`` as ``cliploop stack up`` runs it (MLflow's job runner off), ``mlflow-jobs`` with the
job runner on (MLflow's own default), ``prefect`` (``prefect server start`` on a new database, which it migrates
first) and ``prefect-migrated`` (the same on a database Prefect migrated beforehand, unmeasured). Printed per
server: the medians of the seconds until healthy, the CPU-seconds by then and the seconds to stop, and how many
processes were below it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BIN = Path(sys.executable).parent
SERVERS = ("mlflow", "mlflow-jobs", "prefect", "prefect-migrated")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks of the process and of its reaped children) for every live process."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            found[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return found


def _tree_cpu(root: int) -> tuple[float, int]:
    """CPU-seconds of ``root`` and everything below it (reaped children count through their parents' totals)."""
    stats = _stats()
    below, todo = [], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent]
        below += children
        todo += children
    return sum(stats[pid][1] for pid in [root, *below] if pid in stats) / TICKS, len(below)


def _command(server: str, folder: Path, port: int) -> tuple[list[str], dict[str, str], str]:
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if server.startswith("mlflow"):
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if server == "mlflow-jobs" else "false"
        argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        argv += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        return argv, env, f"http://127.0.0.1:{port}/health"
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
    if server == "prefect-migrated":  # the database made beforehand, not measured
        upgrade = [str(BIN / "prefect"), "server", "database", "upgrade", "-y"]
        subprocess.run(upgrade, env=env, check=True, capture_output=True)
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return argv, env, f"http://127.0.0.1:{port}/api/health"


def measure(server: str, settle_s: float, timeout_s: float = 180) -> dict:
    with tempfile.TemporaryDirectory(prefix="server-start-") as tmp:
        argv, env, url = _command(server, Path(tmp), _free_port())
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
                                start_new_session=True)  # fmt: skip
        try:
            while True:
                if proc.poll() is not None or time.perf_counter() - started > timeout_s:
                    raise SystemExit(f"server_start: {server} did not answer at {url}")
                try:
                    with urllib.request.urlopen(url, timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            healthy_s = time.perf_counter() - started
            time.sleep(settle_s)
            cpu_s, below = _tree_cpu(proc.pid)
            stopping = time.perf_counter()
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
            return {"healthy_s": healthy_s, "cpu_s": cpu_s, "stop_s": time.perf_counter() - stopping, "below": below}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="starts of each server (medians printed)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between healthy and the CPU reading")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"some of {', '.join(SERVERS)}")
    args = parser.parse_args(argv)
    unknown = [name for name in args.servers.split(",") if name not in SERVERS]
    if unknown or args.repeat < 1:  # checked before any server starts
        parser.error(f"unknown server {unknown[0]!r}" if unknown else "--repeat must be at least 1")
    if not Path("/proc/self/stat").exists():
        print("server_start: needs Linux's /proc", file=sys.stderr)
        return 2
    report = {"repeat": args.repeat, "settle_s": args.settle, "servers": {}}
    for server in args.servers.split(","):
        runs = [measure(server, args.settle) for _ in range(args.repeat)]
        report["servers"][server] = {
            key: round(statistics.median(run[key] for run in runs), 2) for key in ("healthy_s", "cpu_s", "stop_s")
        } | {"processes_below": max(run["below"] for run in runs)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
