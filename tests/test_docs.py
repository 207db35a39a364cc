"""References to documents stay inside the repository.

Every ``*.md`` file named in the code, the tests, the configs or the docs must exist in this checkout
(relative to the referring file, as Markdown links are, or as a path from the repository root), and a
section cited after it in quotes (``docs/contracts.md, "MLflow"``) must be a heading of that file. A clone
of the repository can then read every contract its code cites.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("components", "flows", "infra", "tests", "benchmarks", "docs")
TOP_FILES = ("README.md", "REPRODUCIBILITY.md", "Makefile", "pyproject.toml", "cliploop.yaml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ".ini"}
SKIP_PARTS = {"__pycache__", ".venv", ".git", ".cliploop", "node_modules"}

# A path ending in .md that is not part of a longer word, URL or dotted name (hashlib.md5 does not match).
REFERENCE = re.compile(r"(?<![\w/.:-])((?:\.\.?/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w])")
# What may follow a reference: closing backticks or a link's parenthesis, then ', "Section"' or ' ("Section")'.
QUOTED_SECTION = re.compile(r'`{0,2}\)?(?:,\s*(?:#\s*)?|\s*\(\s*)"([^"]{1,120})"')
SECTION_SIGN = re.compile(r"`{0,2}\)?,?\s*\(?\s*§")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and not SKIP_PARTS & set(path.relative_to(ROOT).parts):
                files.append(path)
    return [f for f in files if f != Path(__file__).resolve()]


def resolve(reference: str, referrer: Path) -> Path | None:
    """The file a reference names: relative to the referring file (as a Markdown link), else from the root."""
    for base in (referrer.parent, ROOT):
        candidate = (base / reference).resolve()
        if candidate.is_file() and candidate.is_relative_to(ROOT):
            return candidate
    return None


def headings(doc: Path) -> set[str]:
    found = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{1,6}\s+(.*\S)", line)
        if match:
            found.add(" ".join(match.group(1).split()))
    return found


def section_text(raw: str) -> str:
    """A quoted section name that may wrap across lines of a docstring or a comment."""
    return " ".join(re.sub(r"\n\s*#?", " ", raw).split())


def references() -> list[tuple[str, int, str, str]]:
    """(referring file, line, reference, the text right after it) for every .md reference."""
    out = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        for match in REFERENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            out.append((rel, line, match.group(1), text[match.end() : match.end() + 200]))
    return out


def test_the_scan_finds_references():
    found = {(f, ref) for f, _, ref, _ in references()}
    assert ("README.md", "REPRODUCIBILITY.md") in found  # the pattern works on a known reference
    assert len(found) > 20


@pytest.mark.parametrize(
    "citation",
    [
        'docs/contracts.md, "MLflow"',
        '``docs/contracts.md``, "MLflow"',
        'docs/contracts.md ("MLflow")',
        '[contracts](docs/contracts.md), "MLflow"',
        'docs/contracts.md,\n    # "MLflow"',
    ],
)
def test_the_citation_forms_in_use_are_read(citation):
    match = [m for m in REFERENCE.finditer(citation) if m.group(1) == "docs/contracts.md"][-1]
    quoted = QUOTED_SECTION.match(citation[match.end() :])
    assert quoted and section_text(quoted.group(1)) == "MLflow"
    assert "MLflow" in headings(resolve(match.group(1), ROOT / "README.md"))
    assert not REFERENCE.search("hashlib.md5(data)") and not REFERENCE.search("https://example.org/x/README.md")


def test_every_md_reference_names_a_file_in_the_repository():
    missing = []
    for rel, line, ref, _ in references():
        if "shared/docs" in ref or resolve(ref, ROOT / rel) is None:
            missing.append(f"{rel}:{line}: {ref}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def test_cited_sections_are_headings_of_the_cited_file():
    wrong = []
    for rel, line, ref, after in references():
        target = resolve(ref, ROOT / rel)
        if target is None:
            continue  # reported by the test above
        if SECTION_SIGN.match(after):
            wrong.append(f"{rel}:{line}: {ref} cites a numbered section (§): cite the heading in quotes")
            continue
        quoted = QUOTED_SECTION.match(after)
        if quoted and section_text(quoted.group(1)) not in headings(target):
            wrong.append(f"{rel}:{line}: {ref} has no heading {section_text(quoted.group(1))!r}")
    assert not wrong, "\n".join(wrong)


def test_nothing_points_at_the_team_folder_outside_the_repository():
    outside = re.compile(r"\.\./shared\b|\bshared/docs\b")
    found = [
        f"{path.relative_to(ROOT).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for path in scanned_files()
        for text in [path.read_text(encoding="utf-8", errors="replace")]
        for m in outside.finditer(text)
    ]
    assert not found, "paths outside the repository:\n" + "\n".join(found)
