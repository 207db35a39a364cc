"""Issue 24, item 6: the smaller things a new user met, each with what it should have said or done.

No servers here (the ones that need a server are in tests/test_smalls_servers.py)."""

from __future__ import annotations

import pytest

from components.settings.config import ConfigError
from components.settings.config_loading import load_config
from flows.cli import main

UNKNOWN = "unknown key (check the spelling; `cliploop init` writes every key with its meaning)"


# ---- a typo in --set or in a CLIPLOOP__ variable is blamed on where it was typed -----------------------------


@pytest.mark.parametrize(
    "env, overrides, expected",
    [
        # A section that does not exist, made by --set: the --set is named, and the key that is wrong.
        ({}, ["trainng.epochs=3"], f"--set trainng.epochs: trainng: {UNKNOWN}"),
        # A key that does not exist, from a variable: its name, and the key it was read as.
        (
            {"CLIPLOOP__VALIDATION__MAX_PIXLES": "5"},
            [],
            f"environment variable CLIPLOOP__VALIDATION__MAX_PIXLES (validation.max_pixles): {UNKNOWN}",
        ),
        # A bad value for a real key, from --set; the file's own value of that key was fine.
        ({}, ["validation.max_pixels=abc"], "--set validation.max_pixels: Input should be a valid integer"),
    ],
)
def test_a_typo_outside_the_file_names_its_own_source_not_the_file(tmp_path, env, overrides, expected):
    (tmp_path / "cliploop.yaml").write_text("validation:\n  max_pixels: 1000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(env=env, cwd=tmp_path, overrides=overrides)
    message = str(caught.value)
    assert message.startswith(expected) and "cliploop.yaml" not in message, message


def test_a_typo_in_the_file_is_still_the_files_and_the_command_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "cliploop.yaml").write_text("validation:\n  max_pixles: 5\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'cliploop.yaml'}: validation.max_pixles: unknown key"):
        load_config(env={}, cwd=tmp_path, overrides=["validation.max_pixels=4"])  # a good --set beside it

    (tmp_path / "cliploop.yaml").write_text("validation:\n  max_pixels: 5\n")
    monkeypatch.setenv("CLIPLOOP__TRAINNG__EPOCHS", "3")
    assert main(["config", "-c", str(tmp_path / "cliploop.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cliploop: configuration error:",
        f"environment variable CLIPLOOP__TRAINNG__EPOCHS (trainng.epochs): trainng: {UNKNOWN}",
    ]
