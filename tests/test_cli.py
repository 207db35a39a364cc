"""The command line: real subcommands with their own --help, and a user's mistake ends with one clear line
and the documented exit code (docs/commands.md, "Exit codes"), never a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import build_parser, main
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_config_around(tmp_path, monkeypatch):
    """Commands find ./cliploop.yaml in the working directory: run them where there is none."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLIPLOOP_CONFIG", raising=False)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_scenario_subcommands_are_cliploops_own_with_help(capsys):
    assert "usage: cliploop scenario" in _help(capsys, "scenario")
    text = _help(capsys, "scenario", "convert")
    assert text.startswith("usage: cliploop scenario convert") and "--limit-per-class" in text
    assert main(["scenario", "show", "nope"]) == 2
    assert "no scenario 'nope'" in capsys.readouterr().err


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command path of the real parser, nested subcommands included, found from its subparser actions."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from _commands(sub, (*path, name))


def test_every_command_and_subcommand_has_help(capsys):
    paths = list(_commands(build_parser()))
    assert {("init",), ("ingest",), ("approve",), ("scenario",), ("scenario", "convert"), ("demo",)} <= set(paths)
    for path in paths:
        text = _help(capsys, *path)
        assert text.startswith(f"usage: cliploop {' '.join(path)}"), (path, text[:200])


def _one_line(err: str) -> str:
    # MLflow's announcement of a fresh workspace's database is kept off the console (flows.cli.quiet_library_logs).
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv", [["approve", "99"], ["reject", "99", "--reason", "bad"]])
def test_a_decision_on_a_version_that_does_not_exist_is_one_line_and_exit_2(argv, tmp_path, capsys):
    assert main([*argv, "-w", str(tmp_path / "ws")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"cliploop {argv[0]}: ") and "99" in line


class Payload:
    """An object in a checkpoint: what torch.load(weights_only=True) refuses to unpickle."""


def test_a_pickled_checkpoint_is_refused_in_our_words_never_with_torchs_advice(tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    torch.save({"visual.proj": torch.zeros(2), "extra": Payload()}, checkpoint)
    drop = make_task(tmp_path / "drops", "t-a", ["cat", "dog"])
    for setting in (f"model.checkpoint={checkpoint}", f"model.pretrained={checkpoint}"):
        argv = [
            "learn",
            str(drop),
            "--out",
            str(tmp_path / "out"),
            "--set",
            "model.name=cliploop-tiny",
            "--set",
            "model.pretrained=null",
            "--set",
            setting,
        ]
        assert main(argv) == 2
        line = _one_line(capsys.readouterr().err)
        assert "model.pt is refused" in line and "Payload" in line, line
        assert "weights_only" not in line and "Weights only" not in line and "trust" not in line


def test_an_unknown_method_or_bad_settings_is_a_configuration_error(tmp_path, capsys):
    ws = ["-w", str(tmp_path / "ws")]
    assert main(["config", *ws, "--set", "method.name=nosuchmethod"]) == 2
    assert "unknown method 'nosuchmethod'" in capsys.readouterr().err
    assert main(["config", *ws, "--set", "method.settings.nope=1"]) == 2
    assert "method.settings.nope: not a setting of lvp" in capsys.readouterr().err
    assert main(["config", *ws, "--set", "method.name=zscl", "--set", "method.settings.iterations=soon"]) == 2
    assert "method.settings.iterations" in capsys.readouterr().err
    conf = tmp_path / "conf.yaml"
    conf.write_text("method:\n  name: finetune\n  settings:\n    lr: fast\n")
    assert main(["config", "-c", str(conf)]) == 2
    assert "method.settings.lr" in capsys.readouterr().err
    # A good method with good settings resolves; `learn --method` is checked the same way, before any loading.
    short = ["method.settings.iterations=5", "method.settings.warmup_steps=1", "method.settings.ensemble_every=2"]
    assert main(["config", *ws, "--set", "method.name=zscl", *[a for s in short for a in ("--set", s)]]) == 0
    capsys.readouterr()
    drop = make_task(tmp_path / "drops", "t-a", ["cat"])
    assert main(["learn", "--method", "nosuchmethod", str(drop), *ws]) == 2
    assert "unknown method 'nosuchmethod'" in capsys.readouterr().err


def test_a_broken_config_file_names_the_file_the_line_and_the_problem(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("workspace: .\nvalidation:\n  max_pixels: 5\n   min_side: 3\n")
    assert main(["config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 4, column 12: not valid YAML: mapping values are not allowed here" in err
    assert "line 4:    min_side: 3" in err and "<unicode string>" not in err and "Traceback" not in err
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xd0\xff")  # not text at all
    assert main(["status", "-c", str(path)]) == 2
    assert f"{path}: cannot be read as a text file" in capsys.readouterr().err


def test_the_console_script_entry_point_parses_and_dispatches(tmp_path):
    """`python -m flows.cli` is the console script's `flows.cli:main`: a config error is one clear end."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "--set", "method.name=nosuchmethod"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "", "HOME": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown method" in proc.stderr


def test_the_night_summary_names_failed_rules_says_each_thing_once_and_where_things_are(tmp_path):
    """The summary of a night with an accepted task, a task failing five rules and a rejected version, its ingest
    entries made by the night's own step (components.pipeline.steps.ingest)."""
    from components.intake import workspace
    from components.pipeline import steps
    from components.settings.config_loading import load_config
    from flows.console import night_text
    from tests.drops import append_rows, read_manifest

    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)
    workspace.ensure_workspace(cfg)
    good = make_task(tmp_path / "drops", "t-good", ["cat"])
    bad = make_task(tmp_path / "drops", "t-bad", ["dog"])
    first = read_manifest(bad)[1][0]
    append_rows(
        bad,
        [
            ["img/nope.png", "dog", "train"],  # image-readable
            ["img/x.png", "zebra", "train"],  # label-declared (and image-readable)
            [first, "dog", "train"],  # duplicate-rows
            [first + "b", "dog", "val"],  # split-value
            ["img/y.png", "", "train"],  # required-values
        ],
    )
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    for name in ("heatmap.png", "curves.png"):
        (run / "eval" / name).write_bytes(b"png")
    update = {
        "task_id": "t-good",
        "version": 1,
        "parent_version": None,
        "gate": "fail",
        "reasons": ["forgetting 12.0 > 10"],
        "outcome": "rejected",
        "metrics": {"cl.last": 50.0},
        "out_dir": str(run),
    }
    summary = {
        "swept": [],
        "reconciled": [],
        "ingested": [steps.ingest(str(good), cfg), steps.ingest(str(bad), cfg), steps.ingest(str(good), cfg)],
        "pools": [],
        "updates": [update],
        "stopped": "version 1 (t-good) is rejected",
    }
    text = night_text(summary, cfg)
    lines = text.splitlines()
    assert "quarantined t-bad: 5 validation rules failed" in lines
    named = [line.strip() for line in lines if line.strip().startswith("✗ [")]
    assert len(named) == 3 and "label 'zebra' is not declared" in text
    assert lines[lines.index(next(x for x in lines if x.strip() == named[-1])) + 1].strip().startswith("and 2 more: ")
    assert "accepted t-good: 3 train / 2 test images" in text and "task t-good accepted" not in text
    assert "  unchanged 1 task(s) already known: t-good" in lines  # the same drop seen again: one line
    assert text.count("forgetting 12.0 > 10") == 1 and text.count("chain stopped") == 1
    heading = next(i for i, line in enumerate(lines) if line.startswith("where to look, in "))
    assert lines[heading] == f"where to look, in {cfg.workspace_path}:"
    assert lines[heading + 1 :] == [
        "  t-good     data/reports/t-good/ (report.html, report.json, Data Docs: data_docs/index.html)",
        "  t-bad      .cliploop/quarantine/t-bad/validation/ "
        "(report.html, report.json, Data Docs: data_docs/index.html)",
        f"  v1 t-good  {run / 'eval'}/ (curves.png, heatmap.png)",
    ]
