"""Running git and DVC as child processes, for the workspace's versioning (:mod:`components.intake.versioning`).

DVC's Python API keeps global state (logging, locks, caches) that a long-lived worker process should not inherit,
so every DVC command, and every module of ours that uses DVC's API, runs in a child process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class VersioningError(RuntimeError):
    """git or DVC failed; the message carries the command and its output."""


def _run(
    cmd: list[str],
    cwd: Path,
    check: bool = True,
    env: dict | None = None,
    shown: list[str] | None = None,
    timeout_s: float | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd``; past ``timeout_s`` it is killed and ``subprocess.TimeoutExpired`` raised."""
    full_env = dict(os.environ)
    full_env.setdefault("DVC_NO_ANALYTICS", "1")
    full_env.setdefault("GIT_TERMINAL_PROMPT", "0")
    if env:
        full_env.update(env)
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        stdin=subprocess.DEVNULL,  # DVC asks before it drops data when it has a terminal: it never gets one
        timeout=timeout_s,
    )
    if check and proc.returncode != 0:
        raise VersioningError(
            f"`{' '.join(shown or cmd)}` failed in {cwd} (exit {proc.returncode}):\n"
            f"{shorten((proc.stderr or proc.stdout).strip())}"
        )
    return proc


def shorten(text: str, head: int = 3, tail: int = 2) -> str:
    """A failed push names every file it could not move; the first few and the summary say enough."""
    lines = text.splitlines()
    if len(lines) <= head + tail + 1:
        return text
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} more lines)"] + lines[-tail:])


# `python -m dvc`, armed to get SIGTERM when the thread that started it dies. Without it, a cliploop killed
# or stopped by SIGTERM during `dvc push` left the push running on its own, holding the workspace's DVC
# lock against the rerun. Set in the child itself (not preexec_fn, which is unsafe with threads).
_DVC_LAUNCHER = """\
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: no parent-death signal
if os.getppid() != int(os.environ["CLIPLOOP_DVC_PARENT"]):
    sys.exit(143)  # the parent died before the signal was armed
if os.environ.get("CLIPLOOP_DVC_S3_BOUNDED"):
    from components.intake.git_dvc import bound_s3_requests

    bound_s3_requests()
runpy.run_module(os.environ.get("CLIPLOOP_DVC_MODULE", "dvc"), run_name="__main__", alter_sys=True)
"""


def dvc(
    args: list[str],
    ws: Path,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    module: str = "dvc",
) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``ws`` (or ``python -m MODULE ARGS``, a module of ours that uses DVC's API, in the same
    kind of child process)."""
    return _run(
        [sys.executable, "-c", _DVC_LAUNCHER, *args],
        ws,
        check=check,
        env={"CLIPLOOP_DVC_PARENT": str(os.getpid()), "CLIPLOOP_DVC_MODULE": module, **(env or {})},
        shown=["dvc" if module == "dvc" else f"python -m {module}", *args],
        timeout_s=timeout_s,
    )


def dvc_batch(commands: list[list[str]], ws: Path) -> None:
    """DVC commands one after another in one child process (:mod:`components.intake.dvc_batch`), stopping at
    the first that fails: set-up commands are quick, and each child of its own costs a second of start-up."""
    if not commands:
        return
    if len(commands) == 1:
        dvc(commands[0], ws)
        return
    dvc([json.dumps(commands)], ws, module="components.intake.dvc_batch")  # it names the command that failed


def bound_s3_requests() -> None:
    """In a DVC child process, before DVC starts: make ``read_timeout`` bound every S3 request, and
    ``AWS_MAX_ATTEMPTS`` the number of attempts (docs/storage.md).

    botocore marks every upload ``Expect: 100-continue``, and aiohttp (under s3fs) waits for the "100 Continue"
    with no timeout at all: its read timeout starts once the body is sent, which it never is. One upload
    swallowed by the store hung ``dvc push`` for good. S3 does not need the header (boto3's own client waits
    for it 1 s, then sends the body anyway), so it is not sent. And s3fs repeats a failed call 5 times around
    botocore's attempts, which would make a silent store cost 5 x attempts x read timeout per object."""
    import botocore.handlers
    import s3fs

    botocore.handlers.BUILTIN_HANDLERS[:] = [
        spec for spec in botocore.handlers.BUILTIN_HANDLERS if spec[1] is not botocore.handlers.add_expect_header
    ]
    s3fs.S3FileSystem.retries = 1


def git(args: list[str], ws: Path, check: bool = True) -> subprocess.CompletedProcess:
    # A workspace may be created by a service account with no git identity: give commits one.
    ident = []
    if not _git_identity(ws):
        ident = ["-c", "user.name=cliploop", "-c", "user.email=cliploop@localhost"]
    return _run(["git", *ident, *args], ws, check=check)


def _git_identity(ws: Path) -> bool:
    if os.environ.get("GIT_AUTHOR_NAME") and os.environ.get("GIT_AUTHOR_EMAIL"):
        return True
    proc = subprocess.run(["git", "config", "user.email"], cwd=ws, capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())
