"""A night ends when it is told to, and leaves no process behind.

Two ways a night can die, and what holds for each:

- **SIGTERM or SIGINT** (a scheduler stopping the job, Ctrl-C): the night runs in a worker thread and the
  main thread owns the signal handlers. (Inside a flow run in the main thread, Prefect's own SIGTERM
  handler raises an exception wherever the main thread happens to be; raised inside a finalizer it is
  swallowed, and the night went on training.) On a signal the night thread gets ``NightInterrupted``, so
  the steps unwind as after any failure (the ledger marks the task failed, the chain lock is released).
  If it has not ended after ``grace_s`` seconds (stuck in a C call, or the exception was swallowed), the
  main thread ends it: tasks still ``learning`` become ``failed``, the processes the night started are
  terminated, and the process exits ``128 + signal``.
- **SIGKILL** (or the machine's OOM killer): no code of ours runs, so a small reaper process, started in
  its own session before the night, watches a pipe whose only writer is the night's process. When the pipe
  closes, the reaper terminates every process started under it since the first night that is still running
  (the temporary Prefect server above all, which otherwise lives on as an orphan). The ledger's ``learning``
  entry is left for the next night's reconcile, which marks it failed (the chain lock died with the process).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0  # while a night unwinds, how often the interruption is raised again (it can be swallowed)
EXIT_GRACE_S = 5.0  # once an interruption is reported, how long the process may take to exit before it is ended


class NightInterrupted(KeyboardInterrupt):
    """Raised in the night's thread when the process is asked to stop (SIGTERM or SIGINT)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# PyThreadState_SetAsyncExc raises a class with no arguments: one subclass per signal, named after it.
_BY_SIGNAL = {
    s: type(
        f"NightInterrupted{s.name}",
        (NightInterrupted,),
        {"__init__": lambda self, s=s: NightInterrupted.__init__(self, s)},
    )
    for s in SIGNALS
}


# ---- the process tree, from /proc --------------------------------------------------------------------------


def _children_map() -> dict[int, list[tuple[int, int]]]:
    """parent pid -> [(pid, start time)] for every process we can read."""
    out: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        out.setdefault(int(fields[1]), []).append((int(name), int(fields[19])))
    return out


def descendants(pid: int) -> set[tuple[int, int]]:
    """Every process below ``pid`` as (pid, start time): the start time tells a reused pid apart."""
    tree, found, todo = _children_map(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def _start_time(pid: int) -> int | None:
    """The process's start time, or None when it is gone (a zombie, dead and waiting to be reaped, is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def running(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``processes`` (pid, start time) that still run."""
    return {p for p in processes if _start_time(p[0]) == p[1]}


def terminate(processes: set[tuple[int, int]], wait_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL for what is still there after ``wait_s``; a pid reused meanwhile is left alone."""
    alive = running(processes)
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = running(alive)
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ---- the reaper (for SIGKILL) ------------------------------------------------------------------------------


def _reap(parent: int, fd: int, baseline: set[tuple[int, int]]) -> None:
    """Runs in the reaper process: track the parent's new processes until its pipe closes."""
    started: set[tuple[int, int]] = set()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            if not os.read(fd, 1):  # the process has ended (normally, or by SIGKILL or the OOM killer)
                terminate({p for p in started - baseline if p[0] != os.getpid()})
                return
        started |= descendants(parent)


_REAPER: list[tuple[int, subprocess.Popen]] = []  # one per process, for the life of the process


def ensure_reaper() -> subprocess.Popen:
    """Start this process's reaper once. It outlives every night run here and acts only when the process
    ends: what the nights started and is still running then (at a normal exit, Prefect's atexit hook has
    stopped its temporary server already, so nothing) is terminated."""
    if _REAPER and _REAPER[0][1].poll() is None:
        return _REAPER[0][1]
    baseline = descendants(os.getpid())
    read_end, write_end = os.pipe()  # not inheritable: only this process holds the write end
    spec = ",".join(f"{pid}:{start}" for pid, start in sorted(baseline))
    reaper = subprocess.Popen(
        [sys.executable, "-m", "flows.lifeline", str(os.getpid()), str(read_end), spec],
        pass_fds=(read_end,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(read_end)
    _REAPER[:] = [(write_end, reaper)]
    return reaper


# ---- the night under supervision ---------------------------------------------------------------------------


def supervised(fn: Callable[[], Any], on_hard_stop: Callable[[int], None], grace_s: float = 10.0) -> Any:
    """Run ``fn`` (a whole night) so that SIGTERM/SIGINT end it within about ``grace_s`` seconds and no
    process it started outlives it; ``on_hard_stop(signum)`` fixes the ledger when the night did not unwind.

    Outside the main thread (no signal handlers can be installed) ``fn`` simply runs here."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    baseline = descendants(os.getpid())
    reaper = ensure_reaper()
    result: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def night() -> None:
        try:
            result["value"] = ctx.run(fn)
        except BaseException as exc:  # handed to the main thread below
            result["error"] = exc

    thread = threading.Thread(target=night, name="cliploop-night", daemon=True)
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            _raise_in(thread, signum)

    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if received and not result:
                deadline = time.monotonic() + grace_s
                retry_at = time.monotonic() + REPEAT_S
                while thread.is_alive() and time.monotonic() < deadline:
                    thread.join(0.2)
                    if time.monotonic() >= retry_at and thread.is_alive():
                        # An exception raised inside a finalizer (asyncio transports' __del__ run often here)
                        # is printed and dropped: raise it again until the night unwinds.
                        _raise_in(thread, received[0])
                        retry_at = time.monotonic() + REPEAT_S
                if thread.is_alive():  # did not unwind: end it from here
                    on_hard_stop(received[0])
                    terminate({p for p in descendants(os.getpid()) - baseline if p[0] != reaper.pid}, wait_s=2.0)
                    note = f": the night did not stop within {grace_s:g} s and was ended"
                    print(interrupted_line(received[0], note), file=sys.stderr)
                    _exit_now(128 + received[0])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in result:
        error = result["error"]
        if received and not isinstance(error, NightInterrupted):
            raise NightInterrupted(received[0]) from error
        raise error
    if received:
        raise NightInterrupted(received[0])
    return result.get("value")


def interrupted_line(signum: int, note: str = "") -> str:
    """What a command stopped by a signal says, the same for SIGTERM and Ctrl-C, whether the night unwound or had to
    be ended: its work is in content-addressed, resumable steps and the ledger moved its task to failed."""
    return f"cliploop: interrupted ({signal.Signals(signum).name}){note}; re-running the same command is safe"


def end_within(code: int, grace_s: float = EXIT_GRACE_S) -> None:
    """After an interruption has been reported: the process exits with ``code`` within ``grace_s`` seconds, whatever
    its exit hooks do. Ctrl-C signals the whole foreground process group, so Prefect's temporary server dies with
    the night, and Prefect's exit hook then waits minutes for its log and event workers to reach it. A second
    Ctrl-C or SIGTERM meanwhile ends the process at once, with the same code. What the night started and is still
    running is the reaper's (it acts when this process ends)."""

    def now(*_: Any) -> None:
        _exit_now(code)

    for s in SIGNALS:
        signal.signal(s, now)
    timer = threading.Timer(grace_s, now)
    timer.daemon = True  # the interpreter's shutdown does not wait for it: it waits for the shutdown
    timer.start()


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _raise_in(thread: threading.Thread, signum: int) -> None:
    """Raise ``NightInterrupted`` (for ``signum``) in ``thread`` at its next Python instruction."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_BY_SIGNAL[signum]))


if __name__ == "__main__":  # the reaper: python -m flows.lifeline PARENT_PID FD BASELINE
    _baseline = {tuple(map(int, item.split(":"))) for item in sys.argv[3].split(",") if item}
    _reap(int(sys.argv[1]), int(sys.argv[2]), _baseline)
