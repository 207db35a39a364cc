"""The mutation score of each core module, from what ``make mutate`` (mutmut) left under ``mutants/``.

mutmut writes one ``<module>.py.meta`` (JSON) per mutated file: every mutant's name and the exit code of the
tests run against it (``exit_code_by_key``). This reads them and prints one row per module. The score is
killed / (killed + survived) with timeouts counted as killed (a mutant that makes the tests hang is caught);
survivors explained as equivalent in tests/mutation-equivalents.md (a backquoted mutant name on a line) are
left out of the denominator and counted apart. Mutants no fast test reaches ("no tests") are shown, not scored.

    .venv/bin/python -m tests.mutation_scores [--survivors] [mutants/]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

EQUIVALENTS = Path(__file__).with_name("mutation-equivalents.md")
# mutmut's exit codes (mutmut.stats.status_by_exit_code): the tests failed, were interrupted by an internal
# error, or ran out of time; passed; nothing ran; not run yet.
KILLED, TIMEOUT, SURVIVED = {1, 3}, {24, -24, 36, 152, 255}, {0}
NO_TESTS, NOT_CHECKED = {5, 33}, {None}


@dataclass
class Row:
    module: str
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    equivalent: int = 0
    no_tests: int = 0
    other: int = 0  # not checked yet, skipped, suspicious, segfault

    @property
    def total(self) -> int:
        return self.killed + self.timeout + self.survived + self.equivalent + self.no_tests + self.other

    @property
    def score(self) -> float | None:
        caught = self.killed + self.timeout
        return caught / (caught + self.survived) if caught + self.survived else None


def equivalent_names(path: Path = EQUIVALENTS) -> set[str]:
    if not path.is_file():
        return set()
    return set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", path.read_text(encoding="utf-8")))


def module_rows(mutants: Path, equivalents: set[str]) -> tuple[list[Row], list[str]]:
    """One row per mutated module (sorted by name) and the names of the unexplained survivors."""
    rows, survivors = [], []
    for meta in sorted(mutants.rglob("*.py.meta")):
        doc = json.loads(meta.read_text(encoding="utf-8"))
        codes = doc.get("exit_code_by_key") or {}
        if not codes:
            continue
        row = Row(meta.relative_to(mutants).as_posix().removesuffix(".meta"))
        for name, code in sorted(codes.items()):
            if code in SURVIVED and name in equivalents:
                row.equivalent += 1
            elif code in SURVIVED:
                row.survived += 1
                survivors.append(name)
            elif code in KILLED:
                row.killed += 1
            elif code in TIMEOUT:
                row.timeout += 1
            elif code in NO_TESTS:
                row.no_tests += 1
            else:
                row.other += 1
        rows.append(row)
    return rows, survivors


def table(rows: list[Row]) -> str:
    lines = [
        "| module | mutants | killed | of which timeouts | survived | equivalent | no fast test | not run | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        score = "-" if r.score is None else f"{100 * r.score:.1f}%"
        lines.append(
            f"| {r.module} | {r.total} | {r.killed + r.timeout} | {r.timeout} | {r.survived} | {r.equivalent} "
            f"| {r.no_tests} | {r.other} | {score} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation_scores", description=__doc__.splitlines()[0])
    parser.add_argument("mutants", nargs="?", default="mutants", help="mutmut's working copy (default: mutants)")
    parser.add_argument("--survivors", action="store_true", help="also list the unexplained survivors")
    args = parser.parse_args(argv)
    folder = Path(args.mutants)
    if not folder.is_dir():
        print(f"mutation scores: no {folder}/ here: run `make mutate` first", file=sys.stderr)
        return 2
    rows, survivors = module_rows(folder, equivalent_names())
    print(table(rows))
    if args.survivors and survivors:
        print("\nSurvivors (`mutmut show NAME` prints the change):")
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
