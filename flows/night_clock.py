"""Where a night's time goes: in cliploop's own code, or in Prefect's orchestration around it.

Every piece of our code that Prefect runs (a flow's body, a step's body) is timed *exclusively*: minus the Prefect
calls it makes itself (a step, a subflow, an artifact, an API query), whose whole wall time belongs to the caller's
Prefect share until their own bodies start. So, for a night run in this process,

    orchestration = the night's wall time - the sum of every body's exclusive time

is what Prefect adds (its server, flow and task run bookkeeping, state changes, artifacts, what Prefect did
between our bodies), measured rather than guessed as what is left over. A step run on a remote worker (a ``gpu``
work pool) is timed on that worker, not here: there the figure includes the wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Frame:
    started: float
    inner: float = 0.0  # wall time of the Prefect calls made from this body


@dataclass
class NightClock:
    started: float = field(default_factory=lambda: time.perf_counter())
    ours: dict[str, float] = field(default_factory=dict)  # exclusive seconds of our code, by body name
    server_wait_s: float = 0.0  # of Prefect's share: waiting for an early-started server (flows/embedded_prefect.py)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.ours[name] = self.ours.get(name, 0.0) + seconds

    def report(self) -> dict[str, Any]:
        """The night so far: wall, our code by body name, and Prefect's share (rounded to ms)."""
        wall = time.perf_counter() - self.started
        ours = {k: round(v, 3) for k, v in sorted(self.ours.items())}
        return {
            "night_s": round(wall, 3),
            "ours_s": ours,
            "orchestration_s": round(wall - sum(self.ours.values()), 3),
            "server_wait_s": round(self.server_wait_s, 3),
        }


_CLOCK: ContextVar[NightClock | None] = ContextVar("cliploop_night_clock", default=None)
_FRAME: ContextVar[_Frame | None] = ContextVar("cliploop_night_frame", default=None)


@contextlib.contextmanager
def night() -> Iterator[NightClock]:
    """A clock for the night run inside (threads started with a copy of this context share it)."""
    clock = NightClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextlib.contextmanager
def ours(name: str) -> Iterator[None]:
    """Time our own code inside (a flow's or step's body), less the Prefect calls it makes."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    frame = _Frame(time.perf_counter())
    token = _FRAME.set(frame)
    try:
        yield
    finally:
        _FRAME.reset(token)
        clock.add(name, time.perf_counter() - frame.started - frame.inner)


@contextlib.contextmanager
def prefect_call() -> Iterator[None]:
    """A call into Prefect made from our code: its wall time is not the calling body's."""
    frame = _FRAME.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if frame is not None:
            frame.inner += time.perf_counter() - started


def body(fn: Callable, name: str) -> Callable:
    """``fn`` timed as our code under ``name`` (for a step's body; the signature Prefect reads is ``fn``'s)."""

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with ours(name):
            return fn(*args, **kwargs)

    return timed


def called(prefect_callable: Callable) -> Callable:
    """A Prefect task or flow whose calls are timed as Prefect's share of the caller's time."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with prefect_call():
            return prefect_callable(*args, **kwargs)

    return call
