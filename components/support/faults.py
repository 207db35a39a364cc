"""Fault injection for the fault suite (``tests/test_faults*.py``): inert unless ``CLIPLOOP_FAULT`` is set.

``CLIPLOOP_FAULT`` holds comma-separated ``point:action`` pairs, e.g. ``after_register:kill``. The code
calls ``fault_point("after_register")`` at the places a real crash would hurt; when the variable names
that point, the action happens there, for real:

- ``kill``: SIGKILL to this process (no cleanup, no finally blocks: a power cut);
- ``term``: SIGTERM to this process (what a scheduler sends before it kills);
- ``stop``: SIGSTOP to this process (a hung machine or process: it goes on where it was once sent SIGCONT);
- ``raise``: an ``InjectedFault`` exception (a bug at that point);
- ``sleep=SECONDS``: a pause there (widens a race window for a test);
- ``mark=PATH``: create the file PATH (tells a test the process got there);
- ``kill_once=PATH``: ``kill``, by the first process to get there only (it creates PATH; any later one, a
  restarted worker or another worker of the same group, goes on).

The variable is read at each call, in this one place, so a test sets it for a child process only.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CLIPLOOP_FAULT"


class InjectedFault(RuntimeError):
    """Raised by ``fault_point`` for the ``raise`` action."""


def _actions(point: str) -> list[str]:
    spec = os.environ.get(ENV, "")
    out = []
    for item in spec.split(","):
        name, _, action = item.strip().partition(":")
        if name == point and action:
            out.append(action)
    return out


def fault_point(point: str) -> None:
    """Do what ``CLIPLOOP_FAULT`` asks at ``point``; nothing when it does not name it."""
    for action in _actions(point):
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs between bytecodes; give it the chance before going on
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "raise":
            raise InjectedFault(f"fault injected at {point} ({ENV})")
        elif action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
        elif action.startswith("kill_once="):
            try:
                os.close(os.open(action.split("=", 1)[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("mark="):
            with open(action.split("=", 1)[1], "w") as fh:
                fh.write(str(os.getpid()))
        else:
            known = "kill, kill_once=PATH, term, stop, raise, sleep=S, mark=PATH"
            raise ValueError(f"{ENV}: unknown action {action!r} at {point!r} ({known})")
