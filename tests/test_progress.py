"""Progress of long work: pool building, training and evaluation report it through ``components/support/progress.py``;
the console shows it (``flows/progress.py``), also when its output is not a terminal. The Prefect artifact sink is
tested in tests/test_flows.py, which has a Prefect API at hand."""

from __future__ import annotations

import io
import re

import pytest

from components.settings.config_loading import load_config
from components.support import progress
from components.training.learn import learn_step
from flows.progress import ConsoleProgress, artifact_key
from tests.conftest import tiny_overrides


class Recorder:
    """A sink that keeps every piece of work it is shown."""

    def __init__(self) -> None:
        self.works: list[Work] = []

    def __call__(self) -> Work:
        self.works.append(Work())
        return self.works[-1]

    def named(self, prefix: str) -> list[Work]:
        return [w for w in self.works if w.what.startswith(prefix)]


class Work:
    def __init__(self) -> None:
        self.started, self.advances, self.closed = 0, [], 0

    def start(self, total, what, unit):
        self.started += 1
        self.total, self.what, self.unit = total, what, unit

    def advance(self, n):
        self.advances.append(n)

    def close(self):
        self.closed += 1

    @property
    def whole(self) -> bool:
        """Started once, advanced to its total, closed once."""
        return self.started == 1 and sum(self.advances) == self.total and self.closed == 1


def _cfg(tmp_path, ckpt, *extra):
    return load_config(overrides=[f"workspace={tmp_path / 'ws'}", *tiny_overrides(ckpt, *extra)], env={}, cwd=tmp_path)


def test_training_pool_building_and_evaluation_report_their_work(tmp_path, tiny_checkpoint, drops):
    """One learn step of fine-tuning with pools (rebuilt from the fine-tuned encoder): every step of the schedule,
    every training image of the pool, every test image of each evaluation, each started once and closed once."""
    recorder = Recorder()
    settings = [f"method.settings.{k}" for k in ("iterations=3", "batch_size=4", "warmup_steps=0", "classifier=pool")]
    with progress.reporting(recorder):
        learn_step(str(drops[0]), _cfg(tmp_path, tiny_checkpoint, "method.name=finetune", *settings))
    (train,) = recorder.named("train ")
    assert (train.what, train.unit, train.total, train.advances, train.closed) == (
        "train t-a (finetune)",
        "step",
        3,
        [1, 1, 1],
        1,
    )
    (pool,) = recorder.named("pool ")
    assert pool.what == "pool t-a" and pool.unit == "img" and pool.total == 8 and pool.whole  # 2 classes x 4 train
    evaluations = recorder.named("evaluate ")
    assert evaluations and all(w.what == "evaluate t-a (test)" and w.total == 4 and w.whole for w in evaluations)
    assert len(recorder.works) == len(evaluations) + 2
    assert progress.installed() == []  # the sink is gone with its block


def test_a_failing_display_never_fails_the_work(caplog):
    class Broken:
        def start(self, total, what, unit): ...
        def advance(self, n):
            raise OSError("display gone")

        def close(self): ...

    recorder = Recorder()
    with progress.reporting(Broken, recorder), progress.tracked(3, "work") as work:
        for _ in range(3):
            work.advance(1)
    assert recorder.works[0].whole and work.done == 3
    assert [r.message for r in caplog.records if "display gone" in r.message] != []


def test_console_without_a_terminal_prints_lines_with_rate_and_eta():
    stream = io.StringIO()
    sink = ConsoleProgress(stream, every_s=0, tty=False)  # every tick is due
    with progress.reporting(sink):
        with progress.tracked(10, "train t-a (gnsp)", unit="step") as work:
            work.advance(4)
            sink.tick()
            work.advance(6)
    lines = stream.getvalue().splitlines()
    assert re.search(r"^train t-a \(gnsp\): 4/10 step \(40%\) \[\d\d:\d\d<.*, .*step/s\]$", lines[0]), lines
    assert lines[-1].startswith("train t-a (gnsp): 10/10 step (100%)")

    quiet = io.StringIO()
    sink = ConsoleProgress(quiet, every_s=3600, tty=False)
    with progress.reporting(sink), progress.tracked(5, "evaluate t-a (test)", unit="img") as work:
        work.advance(5)
        sink.tick()  # not due: short work leaves no line
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(
    "what, key", [("train t-a (gnsp)", "progress-train-t-a-gnsp"), ("ingest + validate", "progress-ingest-validate")]
)
def test_artifact_keys_are_what_prefect_accepts(what, key):
    assert artifact_key(what) == key
