"""Class names a reader cannot see whole, or cannot tell from another, are refused with one line that shows the
hidden characters escaped: control characters and line breaks, bidi controls, invisible (format or default-
ignorable) characters, names not in NFC, and names that collide after NFKC + case folding + removing invisible
characters, within a drop and against the dataset's known classes."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import yaml

from components.intake.class_names import SAME_NAME, confusable_key, shown
from components.intake.tasks import DropError, open_drop, parse_task_yaml, read_metadata
from components.intake.validation import TaskContext, scan_images, validate
from components.settings.config_loading import load_config
from flows.cli import main
from tests.drops import make_task

RULE_TAIL = "; class names must be visible text on one line"


def _spec(classes: list[str]) -> bytes:
    spec = {"task_id": "toy-n", "scenario": "class-incremental", "dataset": "toy", "classes": classes}
    return yaml.safe_dump(spec).encode()  # escapes what YAML cannot hold as is ("\u200b", "\n")


def _refusal(classes: list[str]) -> str:
    with pytest.raises(DropError) as caught:
        parse_task_yaml(_spec(classes))
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message  # one line
    return message


def _hidden(name: str, escaped: str, kind: str, char: str) -> tuple[str, str]:
    label = f"U+{ord(char):04X}" + (f" {unicodedata.name(char)}" if unicodedata.name(char, "") else "")
    return name, f"class name '{escaped}' contains {kind} ({label}){RULE_TAIL}"


HIDDEN = {
    "zero-width space": _hidden("cat\u200b", "cat\\u200b", "an invisible character", "\u200b"),
    "zero-width joiner": _hidden("c\u200dat", "c\\u200dat", "an invisible character", "\u200d"),
    "word joiner": _hidden("cat\u2060", "cat\\u2060", "an invisible character", "\u2060"),
    "byte-order mark": _hidden("\ufeffcat", "\\ufeffcat", "an invisible character", "\ufeff"),
    "soft hyphen (Cf)": _hidden("c\u00adat", "c\\xadat", "an invisible character", "\u00ad"),
    "hangul filler (default-ignorable)": _hidden("ca\u3164t", "ca\\u3164t", "an invisible character", "\u3164"),
    "newline": _hidden("ca\nt", "ca\\nt", "a line break", "\n"),
    "line separator": _hidden("ca\u2028t", "ca\\u2028t", "a line break", "\u2028"),
    "bell": _hidden("ca\x07t", "ca\\x07t", "a control character", "\x07"),
    "tab": _hidden("ca\tt", "ca\\tt", "a control character", "\t"),
    "right-to-left override": _hidden("\u202etac", "\\u202etac", "a bidirectional-text control character", "\u202e"),
    "left-to-right embedding": _hidden("\u202acat", "\\u202acat", "a bidirectional-text control character", "\u202a"),
    "first-strong isolate": _hidden(
        "\u2068cat\u2069", "\\u2068cat\\u2069", "a bidirectional-text control character", "\u2068"
    ),
    "right-to-left mark": _hidden("cat\u200f", "cat\\u200f", "a bidirectional-text control character", "\u200f"),
}


@pytest.mark.parametrize("case", list(HIDDEN))
def test_a_name_with_a_hidden_character_is_refused_in_one_line(case):
    name, expected = HIDDEN[case]
    assert _refusal(["dog", name]) == f"task.yaml: classes.1.name: Value error, {expected}"


def test_a_name_not_in_nfc_is_refused_and_shown_decomposed():
    nfd = unicodedata.normalize("NFD", "café")
    assert nfd == "cafe\u0301"
    assert _refusal([nfd]) == (
        "task.yaml: classes.0.name: Value error, class name 'cafe\\u0301' is not in Unicode NFC form "
        "(it is written decomposed); write it composed, as 'café'"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("cat", "ｃａｔ"),  # full-width letters: NFKC
        ("x2", "x²"),  # superscript two: NFKC
        ("Ångström", "Åｎｇｓｔｒöｍ"),
    ],
)
def test_names_equal_after_nfkc_and_case_folding_are_refused(first, second):
    assert _refusal([first, second]) == (
        f"task.yaml: classes: Value error, classes '{first}' and '{second}' are the same name after NFKC "
        "normalisation, case folding and removing invisible characters"
    )


def test_names_equal_by_case_are_still_declared_twice():
    assert _refusal(["Cat", "cAT"]) == "task.yaml: classes: Value error, class 'cAT' is declared twice (as 'Cat')"


def test_visible_nfc_names_of_any_script_pass():
    names = ["café", "naïve bird", "猫", "हिन्दी", "кошка", "🐱", "bird_2", "Straße", "x²"]
    assert parse_task_yaml(_spec(names)).class_names == names


def test_the_collision_key_and_the_escaped_form_follow_their_definition():
    # NFKC, then case folding, without invisible characters; whitespace and underscores as in class identity
    assert confusable_key("Ｃａｔ\u200b") == "cat"
    assert confusable_key("ﬁsh_Tank") == "fish tank"
    assert confusable_key("x²") == confusable_key("X2") == "x2"
    assert shown("cat\u200b") == "'cat\\u200b'" and shown("it's") == "'it\\'s'" and shown("café") == "'café'"


def _validated(drop: Path, tmp_path: Path, known: dict[str, str]):
    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)
    source = open_drop(str(drop))
    spec, manifest, _, _ = read_metadata(source)
    facts = scan_images(source, manifest, cfg.validation)
    ctx = TaskContext(known_classes=known)
    return validate(spec, manifest, facts, cfg.validation, ctx, source=str(drop), checked_at="now", digest=None)


def test_a_class_reading_as_a_known_one_is_refused_in_either_scenario(tmp_path):
    drop = make_task(tmp_path / "drops", "toy-c", ["ｃａｔ"])
    report = _validated(drop, tmp_path, {"cat": "toy-a"})
    rule = next(r for r in report.rules if r.rule == "scenario-classes")
    assert [f.message for f in rule.failures] == [
        f"task.yaml: class 'ｃａｔ' and class 'cat' of task toy-a (dataset 'toy') are {SAME_NAME}; "
        "use the known name as it is written, or a visibly different one"
    ]
    # domain-incremental: the look-alike is named once, not also as an unknown class and a lacking known one
    drop = make_task(tmp_path / "drops", "toy-d", ["ｃａｔ", "dog"], scenario="domain-incremental")
    report = _validated(drop, tmp_path, {"cat": "toy-a", "dog": "toy-a"})
    rule = next(r for r in report.rules if r.rule == "scenario-classes")
    assert len(rule.failures) == 1 and "'ｃａｔ' and class 'cat'" in rule.failures[0].message


def test_cli_validate_and_ingest_refuse_in_one_line_without_a_traceback(tmp_path, capsys):
    drop = make_task(tmp_path / "drops", "toy-z", ["dog"])
    spec = yaml.safe_load((drop / "task.yaml").read_text())
    spec["classes"] = ["dog", "cat\u200b"]
    (drop / "task.yaml").write_text(yaml.safe_dump(spec))
    expected = "class name 'cat\\u200b' contains an invisible character (U+200B ZERO WIDTH SPACE)"
    ws = tmp_path / "ws"

    assert main(["validate", str(drop), "-w", str(ws)]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if expected in line]
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err

    assert main(["ingest", str(drop), "-w", str(ws)]) == 1
    captured = capsys.readouterr()
    assert "QUARANTINED toy-z" in captured.out and "Traceback" not in captured.out + captured.err
