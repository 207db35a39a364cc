"""Starting, watching and stopping the stack's server processes (``infra/stack.py``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class StackError(RuntimeError):
    pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 500
    except Exception:
        return False


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_healthy(name: str, url: str, proc: subprocess.Popen, timeout: float, log: Path, check=None) -> None:
    """Until ``check()`` (default: ``url`` answers over HTTP) holds; a server that exits or never gets there fails
    with its log's last lines."""
    check = check or (lambda: healthy(url))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; see {log}:\n" + tail(log))
        if check():
            return
        time.sleep(0.3)
    raise StackError(f"{name} did not become healthy at {url} within {timeout:.0f} s; see {log}:\n" + tail(log))


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_all(pids: list[int], timeout: float, sig: int = signal.SIGTERM) -> None:
    """``sig`` to each service's process group (servers spawn children), then SIGKILL what is left."""
    groups = []
    for pid in pids:
        try:
            groups.append((pid, os.getpgid(pid)))
        except ProcessLookupError:
            continue
    for _, pgid in groups:
        with contextlib.suppress(ProcessLookupError):  # gone since its group was read
            os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid, _ in groups):
        time.sleep(0.2)
    for pid, pgid in groups:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
