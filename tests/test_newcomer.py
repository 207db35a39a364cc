"""A newcomer's first commands: nothing becomes a workspace unless asked (`cliploop init`), and what the console
shows is cliploop's own story, not the libraries' INFO lines."""

from __future__ import annotations

import pytest

from flows.cli import main
from tests.drops import make_task


@pytest.fixture(autouse=True)
def _no_config_around(monkeypatch):
    monkeypatch.delenv("CLIPLOOP_CONFIG", raising=False)
    monkeypatch.delenv("CLIPLOOP__WORKSPACE", raising=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", "DROP"],
        ["ingest"],
        ["nightly"],
        ["approve", "1"],
        ["reject", "1", "--reason", "no"],
        ["rollback"],
        ["requeue", "t-a"],
        ["lineage", "champion"],
        ["deploy"],
        ["validate", "t-a"],
    ],
)
def test_a_command_that_writes_never_makes_a_workspace_of_an_unnamed_folder(argv, tmp_path, monkeypatch, capsys):
    drop = make_task(tmp_path / "drops", "t-a", ["cat"])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main([str(drop) if a == "DROP" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"cliploop {argv[0]}: "), err
    assert "cliploop init" in err or "no task ledger" in err
    assert list(here.iterdir()) == []  # no .git, no .dvc, no .cliploop, nothing


def test_init_then_ingest_in_the_same_folder(tmp_path, monkeypatch, capsys):
    """The explicit path: `cliploop init` makes the folder a workspace; then ingest works there."""
    drop = make_task(tmp_path / "drops", "t-a", ["cat"])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["init"]) == 0
    assert main(["ingest", str(drop)]) == 0
    assert "task t-a accepted" in capsys.readouterr().out
    # A folder named with -w is an explicit choice: it is set up by the command, as before.
    assert main(["ingest", str(drop), "-w", str(tmp_path / "named")]) == 0
    assert (tmp_path / "named" / "data.dvc").is_file()


def test_lineage_in_an_empty_workspace_says_so_without_library_chatter(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    capfd.readouterr()
    assert main(["lineage", "champion"]) == 2  # the first command to open the registry creates its tables
    out, err = capfd.readouterr()
    text = out + err
    assert "INFO" not in text and "alembic" not in text.lower() and "Creating initial" not in text, text
    assert text.strip() == (
        f"cliploop lineage: no model version of 'cliploop' is registered in {tmp_path} yet "
        "(a night registers one per learned task: `cliploop nightly`)"
    )
