"""CPU time of the test suite, charged to the test that caused it, as JSON (docs/benchmarks.md, "The test suite's
CPU").

    .venv/bin/python benchmarks/suite_cpu.py -- -n 2 --dist loadfile --no-loadscope-reorder   # make test's run
    .venv/bin/python benchmarks/suite_cpu.py -- -n 2 tests/test_ingest.py                       # one file

Runs pytest with the arguments after ``--`` in a child process and, every ``--interval`` seconds, reads every
process's CPU time from /proc (Linux only). A process's CPU since the last reading is charged to the test its
pytest-xdist worker ancestor is running at that moment (the worker's process title names it; pytest-xdist sets it
when setproctitle is installed): servers, Ray processes and subprocesses a test started count for that test. A
process that starts and ends between two readings is missed, and one of the suite's whose worker is unknown (the
pytest process itself, a process first seen after its parent was gone) is charged to ``unattributed``, so the
per-test figures are lower bounds. Other processes of the machine are not counted. Printed: the wall
time, pytest's exit code, the CPU charged in all, per file and per test (seconds, largest first, ``--top`` of each),
and per program: every process of the suite's tree, the pytest process included, by what it runs (``programs``:
the test processes themselves, ``python -m uvicorn``, ``python default_worker.py`` for Ray's workers, ``raylet``...),
with the CPU-seconds and the number of processes seen.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RUNNING = "[pytest-xdist running] "
TEST_PROCESS = "pytest-xdist worker (the tests' own process)"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks used: user + system) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def program(args: list[str]) -> str:
    """What a process runs, from its argument list, for the per-program totals: the program's name, and for Python
    the module (``-m``), the script with its first argument, or the first line of ``-c``'s code."""
    if not args:
        return "?"
    name = os.path.basename(args[0])
    if not name.startswith("python"):
        return name
    rest = args[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest = rest[1:]  # the interpreter's own flags
    if not rest:
        return "python"
    if rest[0] == "-m":
        return " ".join(["python -m", *rest[1:2]])
    if rest[0] == "-c":
        lines = rest[1].strip().splitlines() if len(rest) > 1 else []
        return f"python -c {lines[0][:40]}" if lines else "python -c"
    script = os.path.basename(rest[0])
    if script.endswith(".py"):
        return f"python {script}"
    return " ".join(["python", script, *rest[1:2]])  # an entry point: `prefect server`, `mlflow server`


def _args(pid: int) -> list[str]:
    """A process's arguments (a title set with setproctitle may come without the closing NUL)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.removesuffix(b"\0").split(b"\0")] if raw else []


def _title(pid: int) -> str:
    return " ".join(_args(pid)).strip()


class Charges:
    """Per-test CPU seconds, from readings of /proc: each process remembers its xdist worker (itself, or its
    parent's at first sight) and the ticks it had at the last reading."""

    def __init__(self) -> None:
        self.seen: dict[int, list] = {}  # pid -> [worker pid or None, ticks at the last reading]
        self.ours: set[int] = set()  # the suite's processes: the pytest child and what descends from it
        self.seconds: collections.Counter[str] = collections.Counter()
        self.programs: collections.Counter[str] = collections.Counter()  # CPU-seconds per program()
        self.processes: dict[str, set[int]] = collections.defaultdict(set)  # the pids seen running each

    def read(self, baseline: bool = False) -> None:
        """One reading; ``baseline``: the processes alive before the suite, whose CPU so far is not its."""
        for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
            found = _stat(pid)
            if found is None:
                continue
            parent, ticks = found
            if pid not in self.seen:
                self.seen[pid] = [None, ticks if baseline else 0]
                if parent in self.ours:
                    self.ours.add(pid)
            if pid not in self.ours:
                self.seen[pid][1] = ticks
                continue
            record = self.seen[pid]
            if record[0] is None:
                if RUNNING in _title(pid):
                    record[0] = pid
                elif parent in self.seen and self.seen[parent][0] is not None:
                    record[0] = self.seen[parent][0]
            used, record[1] = ticks - record[1], ticks
            if used <= 0:
                continue
            title = _title(record[0]) if record[0] is not None else ""
            test = title.split(RUNNING, 1)[1] if RUNNING in title else "unattributed"
            self.seconds[test] += used / TICKS
            # Read at every charge, not once: a child seen between its fork and its exec still shows its parent's.
            label = TEST_PROCESS if pid == record[0] else program(_args(pid))
            self.programs[label] += used / TICKS
            self.processes[label].add(pid)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two readings of /proc")
    parser.add_argument("--top", type=int, default=30, help="tests and files printed")
    args = parser.parse_args(ours)
    if not os.path.isdir("/proc/self"):
        print("suite_cpu: needs Linux's /proc", file=sys.stderr)
        return 2
    charges = Charges()
    charges.read(baseline=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], stdout=sys.stderr)
    charges.ours.add(child.pid)
    while child.poll() is None:
        time.sleep(args.interval)
        charges.read()
    wall = time.perf_counter() - started
    tests = {k: v for k, v in charges.seconds.items() if k != "unattributed"}
    files: collections.Counter[str] = collections.Counter()
    for test, seconds in tests.items():
        files[test.split("::", 1)[0]] += seconds
    total = sum(tests.values())
    doc = {
        "pytest_args": pytest_args,
        "exit_code": child.returncode,
        "wall_s": round(wall, 1),
        "charged_cpu_s": round(total, 1),
        "unattributed_cpu_s": round(charges.seconds.get("unattributed", 0.0), 1),
        "files": [[f, round(s, 1)] for f, s in files.most_common(args.top)],
        "tests": [[t, round(s, 1)] for t, s in collections.Counter(tests).most_common(args.top)],
        "programs": [
            [name, round(s, 1), len(charges.processes[name])] for name, s in charges.programs.most_common(args.top)
        ],
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
