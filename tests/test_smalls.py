"""Issue 24, item 6: the smaller things a new user met, each with what it should have said or done.

No servers here (the ones that need a server are in tests/test_smalls_servers.py)."""

from __future__ import annotations

import os
import socket
from html.parser import HTMLParser

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


# ---- `cliploop init --model demo` gives a general workspace a general prompt ------------------------------------


def test_init_with_the_demo_model_keeps_the_general_prompt_and_the_demo_keeps_its_digits(tmp_path):
    """The demo's model in a workspace of other images: its prompt must not speak of handwritten digits.
    What ``cliploop init --model demo`` writes is ``config_text(demo_model_settings(ws))`` (flows/commands.py);
    those two are called here, without init's git and DVC set-up (tests/test_newcomer.py runs the command)."""
    from components.intake.workspace import config_text
    from components.model.prompts import get_templates
    from components.scenarios import demo
    from components.support.storage import cache_dir

    # init places and pins the demo's model file without loading it: the cache gets a stand-in under its name
    # (the demo's warm-up takes minutes, and what is tested is the config init writes, not the model).
    cached = demo.base_model_path(cache_dir() / "demo")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"a stand-in for the demo's base model")
    ws = tmp_path / "textures"
    text = config_text(demo.demo_model_settings(ws, progress=None))
    (ws / "cliploop.yaml").write_text(text)
    config = load_config(ws / "cliploop.yaml", env={})
    assert config.model.name == "cliploop-minilm-tiny" and config.model.checkpoint  # the demo's model, as asked
    # The general default (components/model/prompts.py: the lvp set is "a photo of a {}").
    assert [t("stone") for t in get_templates(config.evaluation.templates)] == ["a photo of a stone"]
    assert "handwritten" not in text
    # The demo itself still asks about digits.
    demo_overrides = demo.model_overrides(cache_dir() / "demo", progress=None)
    assert "evaluation.templates=a photo of the handwritten digit {}" in demo_overrides


# ---- `cliploop deploy` runs a copy of the config: it says so, and `cliploop status` says when they differ -------


def test_status_says_when_the_deployed_config_is_not_the_workspaces_and_deploy_says_it_is_a_copy(
    tmp_path, monkeypatch, capsys
):
    """``write_deployed`` is the copy `cliploop deploy` makes before it registers the deployments (which needs a
    Prefect server: tests/test_stack.py deploys for real)."""
    from flows.deploy import DEPLOYED_NOTE, write_deployed

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "cliploop.yaml").write_text("method:\n  name: lvp\n")
    monkeypatch.chdir(ws)
    assert main(["status"]) == 0
    assert "deployed" not in capsys.readouterr().out  # never deployed: nothing to compare

    copy = write_deployed(load_config(ws / "cliploop.yaml", env={}))
    assert main(["status"]) == 0
    assert "deployed" not in capsys.readouterr().out  # deployed as it is

    (ws / "cliploop.yaml").write_text("method:\n  name: finetune\n")  # edited after deploying
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"scheduled nights run {copy}" in out and "method.name: deployed lvp, here finetune" in out, out
    assert "run `cliploop deploy` again" in out
    assert main(["status", "--json"]) == 0
    assert '"method.name: deployed lvp, here finetune"' in capsys.readouterr().out
    # What `cliploop deploy` prints after deploying (flows/commands.py, cmd_deploy).
    assert "not cliploop.yaml" in DEPLOYED_NOTE and "cliploop deploy" in DEPLOYED_NOTE


# ---- `cliploop stack up` on a busy port leaves nothing running -------------------------------------------------


def _listening() -> socket.socket:
    """Another program on a port of 127.0.0.1 (the caller closes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_stack_up_with_a_busy_port_says_which_and_starts_nothing(tmp_path, capsys):
    """The object store came up first, then MLflow's port was found taken, and the store kept running."""
    from flows.lifeline import descendants, running, terminate

    with _listening() as free:
        s3_port = free.getsockname()[1]  # free again once closed
    before = descendants(os.getpid())
    with _listening() as busy:
        port = busy.getsockname()[1]
        ports = ["--port-s3", str(s3_port), "--port-mlflow", str(port)]
        try:
            code = main(["stack", "up", "-w", str(tmp_path / "ws"), *ports])
        finally:
            left = running(descendants(os.getpid()) - before)
            terminate(left)  # whatever the old code left, so the suite is not left with it
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1, err
    assert f"mlflow: port {port} on 127.0.0.1 is taken by another program" in err and "--port-mlflow" in err
    assert left == set(), "stack up left a server running"


# ---- the validation report a reviewer opens renders without the network -----------------------------------------


class _Page(HTMLParser):
    """Every element with its attributes, and the text a reader sees."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_the_validation_report_page_needs_no_network_and_holds_every_finding(tmp_path):
    """GX's Data Docs index loads its styles and scripts from CDNs and draws its table with them: offline it is
    blank. ``report.html`` (beside report.json, wherever a report is written) has no external link or script,
    and the findings are in the page itself, shown as text even when a label is written as markup."""
    from components.intake.drop_check import validate_location
    from tests.drops import make_task, read_manifest, write_manifest

    drop = make_task(tmp_path / "drops", "t-a", ["cat", "dog"])
    rows = read_manifest(drop)[1:]  # after the header
    rows[0][1] = "<i>kat</i>"  # a label task.yaml does not declare
    write_manifest(drop, rows)
    config = load_config(env={}, cwd=tmp_path, overrides=[f"workspace={tmp_path / 'ws'}"])
    report = validate_location(str(drop), config, tmp_path / "report")
    assert not report.success

    html = (tmp_path / "report" / "report.html").read_text()
    page = _Page()
    page.feed(html)
    tags = [tag for tag, _ in page.tags]
    assert "script" not in tags and "img" not in tags and "i" not in tags  # the label stayed text
    links = [a.get("href") or a.get("src") or "" for _, a in page.tags]
    assert not [u for u in links if "//" in u or u.startswith(("http:", "https:", "data:"))], links
    assert "http://" not in html and "https://" not in html and "@import" not in html  # nothing in the style either
    assert [a["href"] for tag, a in page.tags if tag == "a"] == ["data_docs/index.html"]  # GX's site, relative
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()

    text = " ".join(" ".join(page.text).split())
    assert "Task t-a: INVALID (1 of" in text
    # The rule, its verdict and the row, as task.yaml and the manifest make them (line 2: the first data row).
    assert "label-declared every label is a class declared in task.yaml FAILED: 1 problem(s)" in text
    assert f"2 {rows[0][0]} manifest.csv line 2 ({rows[0][0]}): label '<i>kat</i>' is not declared" in text
