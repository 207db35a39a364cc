"""A night that waits for a reviewer says so (``flows/update.py``, ``await_review``; ``flows/progress.py``).

It used to print ``night: 0/1 night (0%)`` every 10 s for up to an hour off a terminal (``cliploop nightly | cat``)
and never said that it waited, for which version, how long at most, or how to decide. Now every console, terminal
or not, gets the version, the longest wait and the three ways to decide, then a line now and then with the time
waited; the version's page in MLflow says how to decide there. Expected texts come from what the issue asks a
reviewer be told (version, limit, the three ways), durations worked out by hand.
"""

from __future__ import annotations

import io
import shutil
import time

from components.registry import review_page
from components.support import progress
from flows.console import review_wait_text
from flows.progress import ConsoleProgress, duration_text, say


def test_a_wait_past_its_limit_says_so():
    bar = ConsoleProgress(io.StringIO(), tty=False)()
    bar.start(60, "waiting for a review of v3", "s")
    bar.t0 -= 62  # started 62 s ago: the pause ended a poll after its 60 s
    assert bar.line() == "waiting for a review of v3: 1 min 2 s waited (limit 1 min)"
    bar.close()


def test_durations_read_as_a_person_says_them():
    cases = {0: "0 s", 45: "45 s", 60: "1 min", 125: "2 min 5 s", 3600: "1 h", 5400: "1 h 30 min", 7260: "2 h 1 min"}
    assert {s: duration_text(s) for s in cases} == cases


def test_the_wait_names_the_version_its_limit_and_the_three_ways_to_decide():
    text = review_wait_text(3, "digits-chalk", "cliploop", 3600)
    first, *ways, last = text.splitlines()
    assert first.startswith("version 3 (task digits-chalk) waits for a review, for at most 1 h")
    assert len(ways) == 3
    assert ways[0].strip().startswith("cliploop approve 3 --reviewer NAME") and "cliploop reject 3" in ways[0]
    assert "model 'cliploop' version 3: set the tag cliploop.review to approved (or rejected)" in ways[1]
    assert "move the alias champion to version 3" in ways[2]
    assert "stays challenger" in last


def _night_waiting(sink: ConsoleProgress, wait_s: float) -> None:
    """What a waiting night shows: the night as a piece of work, the announcement, then the wait (unit s)."""
    with progress.reporting(sink), progress.tracked(1, "night", unit="night"):
        say(review_wait_text(3, "t-c", "cliploop", 3600))
        with progress.tracked(3600, "waiting for a review of v3", unit="s"):
            time.sleep(wait_s)


def test_off_a_terminal_the_wait_is_said_then_the_time_waited_now_and_then():
    out = io.StringIO()
    _night_waiting(ConsoleProgress(out, every_s=0.1, tty=False, wait_every_s=0.5), wait_s=1.8)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("version 3 (task t-c) waits for a review, for at most 1 h")
    after = lines[5:]  # after the announcement's five lines: only the time waited, every wait_every_s
    assert after and all(line.startswith("waiting for a review of v3: ") for line in after[:-1]), lines
    assert all(line.endswith(" s waited of at most 1 h") for line in after[:-1]), lines
    assert 2 <= len(after) - 1 <= 4, lines  # 1.8 s at one line per 0.5 s (not the night's line every 0.1 s)
    assert not any("/3600" in line for line in lines)  # a wait is time, not a count
    assert lines[-1].startswith("night: 0/1 night")  # the night's own closing line, once the wait ended


def test_on_a_terminal_the_wait_is_said_above_a_bar_of_the_time_waited():
    out = io.StringIO()
    _night_waiting(ConsoleProgress(out, every_s=0.1, tty=True), wait_s=1.2)
    text = out.getvalue()
    assert "version 3 (task t-c) waits for a review, for at most 1 h" in text
    assert "waiting for a review of v3: 00:01 waited of at most 1 h" in text


def test_the_version_page_says_how_to_decide_in_mlflow():
    page = review_page.description(
        version=2, task_id="t-b", parent_version=1, method="lvp", run_id="r", metrics={"cl.last": 60.0}, gate=None
    )
    here = page[page.index("### Decide here, in MLflow") :]
    assert "set this version's tag `cliploop.review` to `approved`" in here
    assert "add the alias `champion` to it" in here and "to `rejected`" in here
    assert "`cliploop.reviewer` (your name)" in here and "cliploop approve 2 --reviewer NAME" in here


def test_a_paused_review_tells_the_console_and_shows_the_time_waited(tmp_path, prefect_api):
    """``await_review`` for real: a version registered by the pipeline's own calls (a zero-shot state, no training),
    a flow run paused for its review for 3 s, a console that is no terminal."""
    from prefect import flow

    from components.intake.workspace import ensure_workspace
    from components.model.state import ClassEntry, LearnerState
    from components.registry.registry import from_config
    from components.settings.config_loading import load_config
    from flows.update import await_review
    from tests.conftest import _empty_mlflow_store

    cfg = load_config(overrides=[f"workspace={tmp_path / 'ws'}", "approval.timeout_s=3"], env={}, cwd=tmp_path)
    ensure_workspace(cfg)
    shutil.copyfile(_empty_mlflow_store(), cfg.workspace_path / ".cliploop" / "mlflow.db")
    state = LearnerState(
        method="zeroshot", backbone={"name": "cliploop-tiny"}, classes=[ClassEntry(0, "toy/cat", "cat", "toy", "t-a")]
    )
    state.save(tmp_path / "run" / "state")
    cfg.write_resolved(tmp_path / "run")
    tags = {"task_id": "t-a", "method": "lvp", "parent_version": ""}
    registry = from_config(cfg)
    run_id = registry.log_update(tmp_path / "run", "t-a", {"cl.last": 90.0}, {"t-a": 90.0}, {}, tags)
    version = registry.register(run_id, "key-t-a", tags)

    out = io.StringIO()
    with progress.reporting(ConsoleProgress(out, every_s=60, tty=False, wait_every_s=1.0)):
        outcome = flow(name="wait-for-review")(lambda: await_review(cfg, version, "t-a"))()
    lines = out.getvalue().splitlines()
    assert outcome == "awaiting-review" and registry.version_tags(version)["review"] == "timed-out"
    assert lines[0] == f"version {version} (task t-a) waits for a review, for at most 3 s (approval.timeout_s); " + (
        "decide in one of three ways:"
    )
    assert f"cliploop approve {version} --reviewer NAME" in lines[1] and "cliploop.review" in lines[2]
    waited = [line for line in lines if line.startswith(f"waiting for a review of v{version}: ")]
    assert waited and waited[0].endswith(" s waited of at most 3 s"), lines
    assert waited[-1].endswith((" s waited of at most 3 s", " s waited (limit 3 s)")), lines  # its closing line
