"""Progress of long work: a tiny contract between the code that does the work and the places that show it.

The work (pool building, the training loop, evaluation, a night's steps) says how much there is and how much is
done; it never knows where that goes. A *sink* makes one :class:`Progress` per piece of work; the command line
installs a console sink and the flows a Prefect artifact sink (both in ``flows/progress.py``), with
:func:`reporting`. With no sink installed, :func:`tracked` costs next to nothing and shows nothing. No platform
library is imported here.

    with progress.tracked(len(dataset), f"evaluate {task_id}", unit="img") as bar:
        for images, labels in loader:
            ...
            bar.advance(len(labels))

The sinks are process-wide (a night runs in a thread of its own, ``flows/lifeline.py``), and pieces of work may
nest (a night's task, then its training): a sink sees each ``start`` … ``close`` in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    """One piece of work as a sink sees it: started once, advanced, closed once."""

    def start(self, total: int, what: str, unit: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


Sink = Callable[[], Progress]  # makes the Progress of one piece of work

_sinks: list[Sink] = []
_lock = threading.Lock()


@contextmanager
def reporting(*sinks: Sink) -> Iterator[None]:
    """``sinks`` receive every piece of work tracked in this process until the block ends."""
    with _lock:
        _sinks.extend(sinks)
    try:
        yield
    finally:
        with _lock:
            for sink in sinks:
                _sinks.remove(sink)


def installed() -> list[Sink]:
    with _lock:
        return list(_sinks)


class Tracker:
    """The work's side: forwards to every installed sink. A sink that fails is dropped for the rest of the work,
    with one warning: showing progress never fails the work it shows."""

    def __init__(self, parts: list[Progress]) -> None:
        self.parts, self.done, self.closed = parts, 0, False

    def _each(self, call: Callable[[Progress], None]) -> None:
        for part in list(self.parts):
            try:
                call(part)
            except Exception as exc:
                log.warning("progress display %s failed, left out: %s", type(part).__name__, exc)
                self.parts.remove(part)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.parts:
            self._each(lambda part: part.advance(n))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._each(lambda part: part.close())


def track(total: int, what: str, unit: str = "it") -> Tracker:
    """Start a piece of work of ``total`` units on every installed sink; close it with ``close()``."""
    tracker = Tracker([make() for make in installed()])
    tracker._each(lambda part: part.start(total, what, unit))
    return tracker


@contextmanager
def tracked(total: int, what: str, unit: str = "it") -> Iterator[Tracker]:
    """:func:`track` for the length of a block (closed however the block ends)."""
    tracker = track(total, what, unit)
    try:
        yield tracker
    finally:
        tracker.close()
