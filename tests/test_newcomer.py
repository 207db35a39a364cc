"""A newcomer's first commands: nothing becomes a workspace unless asked (`cliploop init`), and what the console
shows is cliploop's own story, not the libraries' INFO lines."""

from __future__ import annotations

from pathlib import Path

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


def test_status_outside_a_workspace_points_to_init(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    assert "not a cliploop workspace yet (`cliploop init` makes one)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # init and ingest through the CLI
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


@pytest.mark.parametrize(
    "argv", [["lineage", "champion"], ["predict", "champion", "x.png"], ["export-model", "1", "m"]]
)
def test_a_read_only_command_on_a_mistyped_workspace_creates_nothing(tmp_path, monkeypatch, capsys, argv):
    """``cliploop lineage champion -w <typo>`` made the folder and an empty MLflow database: a command that only
    reads a workspace says in one line that there is none, and leaves the disk as it was."""
    monkeypatch.chdir(tmp_path)
    if argv[0] == "predict":
        (tmp_path / "x.png").write_bytes(b"")
    typo = tmp_path / "my-workspcae"
    assert main([*argv, "-w", str(typo)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{typo} is not a cliploop workspace" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    )
    assert not typo.exists() and not (tmp_path / "m").exists()


def test_init_with_the_demo_model_starts_an_offline_workspace(tmp_path, capsys):
    """`cliploop init --model demo`: the demo's base model (built once, cached) placed in the workspace and
    pinned by its checksum; the workspace's config loads it with no network."""
    import open_clip

    from components.model.backbones import load_backbone, quiet_loaders, register_builtin_configs, save_weights
    from components.scenarios import demo
    from components.settings.config_loading import load_config
    from components.support.storage import cache_dir, sha256_file

    # The demo's warm-up (minutes on a loaded 2-core machine; `make demo` and tests/test_flows.py run it) is
    # not what is tested here: the cache gets an untrained model of the same architecture under its name.
    register_builtin_configs()
    with quiet_loaders():
        save_weights(
            open_clip.create_model(demo.BASE_MODEL, pretrained=None), demo.base_model_path(cache_dir() / "demo")
        )
    ws = tmp_path / "ws"
    assert main(["init", str(ws), "--model", "demo", "--drop-zone", "drops"]) == 0
    config = load_config(ws / "cliploop.yaml", env={})
    model = config.model
    assert model.name == "cliploop-minilm-tiny" and model.pretrained is None
    assert Path(model.checkpoint).parent == ws / ".cliploop" / "models"
    assert sha256_file(Path(model.checkpoint)) == model.sha256
    assert config.drop_zone == "drops" and (ws / "drops").is_dir()
    assert "# open_clip pretrained tag" in (ws / "cliploop.yaml").read_text()  # still the commented file
    # The workspace's config loads exactly the demo's weights: the file it names, every tensor as saved.
    import torch
    from safetensors.torch import load_file

    backbone = load_backbone(model)
    assert backbone.reference["sha256"] == model.sha256 == sha256_file(demo.base_model_path(cache_dir() / "demo"))
    saved, loaded = load_file(model.checkpoint), backbone.model.state_dict()
    assert set(saved) <= set(loaded) and all(torch.equal(loaded[k].cpu(), v) for k, v in saved.items())
    capsys.readouterr()
    assert main(["init", str(ws), "--model", "demo"]) == 0
    assert "its model is unchanged" in capsys.readouterr().out
