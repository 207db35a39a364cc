"""Where the progress of long work is shown (the contract is ``components/support/progress.py``): the console and the
Prefect UI.

- :class:`ConsoleProgress` (installed by the command line, ``flows/cli.py``): on a terminal, a live tqdm bar per
  piece of work (nested ones below it), with rate and ETA; anywhere else (a pipe, a log file, CI) one line of
  tqdm's meter every ``every_s`` seconds while work is under way, so a long night is never silent. Work that took
  longer than ``every_s`` leaves a closing line; shorter work leaves nothing. Work counted in seconds (unit
  ``s``: a night waiting for a reviewer) is a wait: it shows the time waited against the most it may last, and
  off a terminal its lines come every ``wait_every_s`` (a minute), not every ``every_s``.
- :class:`PrefectProgress` (installed by the flows that do the work): a progress artifact in the flow run the work
  belongs to, updated at most every ``every_s`` seconds; work done sooner creates none.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from components.support import progress

LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"
WAIT_UNIT = "s"  # a piece of work counted in seconds is a wait (what it counts is time, not things done)


def duration_text(seconds: float) -> str:
    """A duration as a person reads it: ``45 s``, ``2 min 5 s``, ``1 h``, ``1 h 30 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 else "")
    return f"{s // 3600} h" + (f" {s % 3600 // 60} min" if s % 3600 // 60 else "")


def say(text: str) -> None:
    """A message for whoever watches this command (a night that waits for a reviewer says so): every console sink
    installed in this process prints it, on a terminal or not. With none (a flow run on a worker) it goes nowhere;
    the flow run's log says the same in the Prefect UI."""
    for sink in progress.installed():
        if isinstance(sink, ConsoleProgress):
            sink.say(text)


class ConsoleProgress:
    """The console sink. ``tty`` (default: whether ``stream`` is a terminal) chooses live bars or periodic lines."""

    def __init__(
        self, stream: TextIO | None = None, every_s: float = 10.0, tty: bool | None = None, wait_every_s: float = 60.0
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.wait_every_s = wait_every_s
        self.open: list[_ConsoleBar] = []
        self.last_line = time.monotonic()
        self.lock = threading.RLock()
        self._ticker: threading.Thread | None = None

    def __call__(self) -> _ConsoleBar:
        return _ConsoleBar(self)

    def say(self, text: str) -> None:
        with self.lock:
            if self.tty:  # above the bars still open
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
            self.last_line = time.monotonic()

    def tick(self) -> None:
        """A terminal's bars show the time going by; elsewhere, a line for the innermost work when it is due."""
        with self.lock:
            if not self.open:
                return
            if self.tty:
                for bar in self.open:
                    bar.bar.refresh()
            else:
                inner = self.open[-1]
                if time.monotonic() - self.last_line >= (self.wait_every_s if inner.waits else self.every_s):
                    self.say(inner.line())
                    inner.said = True

    def _opened(self, bar: _ConsoleBar) -> None:
        with self.lock:
            if not self.open:
                self.last_line = time.monotonic()  # the first line comes every_s after the work starts
            self.open.append(bar)
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick_while_open, name="cliploop-progress", daemon=True)
                self._ticker.start()

    def _closed(self, bar: _ConsoleBar) -> None:
        with self.lock:
            if bar in self.open:
                self.open.remove(bar)

    def _tick_while_open(self) -> None:
        while True:
            time.sleep(min(1.0, self.every_s / 2) if self.every_s > 0 else 0.05)
            with self.lock:
                if not self.open:
                    self._ticker = None
                    return
            self.tick()


class _ConsoleBar:
    def __init__(self, sink: ConsoleProgress) -> None:
        self.sink, self.bar, self.said, self.waits = sink, None, False, False

    def start(self, total: int, what: str, unit: str) -> None:
        from tqdm import tqdm

        self.what, self.unit, self.total, self.n, self.t0 = what, unit, total, 0, time.monotonic()
        self.waits = unit == WAIT_UNIT
        # A wait's bar shows the time waited (tqdm's {elapsed}, refreshed by tick), not a count.
        fmt = f"{{desc}}: {{elapsed}} waited of at most {duration_text(total)}" if self.waits else None
        if self.sink.tty:
            with self.sink.lock:
                self.bar = tqdm(
                    total=total,
                    desc=what,
                    unit=unit,
                    file=self.sink.stream,
                    leave=False,
                    mininterval=0.5,
                    bar_format=fmt,
                )
        self.sink._opened(self)

    def advance(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            with self.sink.lock:
                self.bar.update(n)

    def line(self) -> str:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.t0
        if self.waits:
            waited, most = duration_text(elapsed), duration_text(self.total)
            # A wait that ran its course ends a poll or two past its limit.
            return f"{self.what}: {waited} waited " + (
                f"of at most {most}" if elapsed < self.total else f"(limit {most})"
            )
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.what, unit=self.unit, bar_format=LINE)

    def close(self) -> None:
        self.sink._closed(self)
        long = time.monotonic() - self.t0 >= self.sink.every_s
        with self.sink.lock:
            if self.bar is not None:
                self.bar.close()
            if self.said or long:  # long work leaves one closing line: how much, how long, how fast
                self.sink.say(self.line())


@contextlib.contextmanager
def console_progress(stream: TextIO | None = None, every_s: float = 10.0) -> Iterator[ConsoleProgress]:
    """The console sink installed for a block. On a terminal, what the command prints meanwhile goes through tqdm
    (``tqdm.contrib.DummyTqdmFile``), so a line never lands in the middle of a bar."""
    sink = ConsoleProgress(stream, every_s)
    with progress.reporting(sink), contextlib.ExitStack() as redirect:
        if sink.tty:
            from tqdm.contrib import DummyTqdmFile

            redirect.enter_context(contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)))
            redirect.enter_context(contextlib.redirect_stderr(DummyTqdmFile(sys.stderr)))
        yield sink


class PrefectProgress:
    """The Prefect sink: work inside a flow or task run becomes a progress artifact of that run (key
    ``progress-<what>``), created once the work has lasted ``every_s`` seconds, then updated at most that often."""

    def __init__(self, every_s: float = 3.0) -> None:
        self.every_s = every_s

    def __call__(self) -> _ArtifactBar:
        return _ArtifactBar(self.every_s)


def artifact_key(what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for a piece of work."""
    return ("progress-" + re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-"))[:100].rstrip("-")


class _ArtifactBar:
    def __init__(self, every_s: float) -> None:
        self.every_s, self.id, self.total = every_s, None, 0

    def start(self, total: int, what: str, unit: str) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        self.in_run = total > 0 and (FlowRunContext.get() is not None or TaskRunContext.get() is not None)
        self.total, self.what, self.unit, self.done, self.sent = total, what, unit, 0, -1
        self.sent_at = time.monotonic()

    def _send(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = min(100.0, 100.0 * self.done / self.total)
        if self.id is None:
            description = f"{self.what}: {self.total} {self.unit}"
            self.id = create_progress_artifact(percent, key=artifact_key(self.what), description=description)
        else:
            update_progress_artifact(self.id, percent)
        self.sent, self.sent_at = self.done, time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        if self.in_run and time.monotonic() - self.sent_at >= self.every_s:
            self._send()

    def close(self) -> None:
        if self.id is not None and self.sent != self.done:  # the final count of work that showed
            self._send()
