"""Step-counted settings follow the schedule (or the schedule is refused), and every method declares which
parts of the model it trains, checked against what its set-up leaves trainable."""

from __future__ import annotations

import pytest

from components.methods import available_methods, get_method
from components.methods.base import MethodError
from components.methods.tuning import TEXT_TOWER
from components.model.backbones import load_backbone
from components.model.data import load_task
from components.model.state import LearnerState
from components.settings.config_loading import load_config
from components.training.callbacks import Callback
from components.training.learn import context_for, learn_step, make_method
from components.training.trainer import fit
from flows.cli import main
from flows.demo import DEMO_ITERATIONS, demo_schedule
from tests.conftest import tiny_overrides

METHODS = sorted(available_methods())


def _config(tmp_path, ckpt, *extra):
    return load_config(overrides=tiny_overrides(ckpt, *extra), env={}, cwd=tmp_path)


def _begin(config, task_location: str, state: LearnerState | None = None, locate=None):
    backbone = load_backbone(config.model, weights=state.weights if state else None)
    ctx = context_for(config, backbone, locate_task=locate)
    method = make_method(config)
    method.begin_task(
        state or LearnerState(method=method.name, backbone=backbone.reference), load_task(task_location), ctx
    )
    return method, ctx


class _LearningRates(Callback):
    """The learning rate the optimizer holds after each step (what the trainer set, not a formula)."""

    def __init__(self):
        self.rates: list[float] = []

    def on_step_end(self, run, step, losses, seconds):
        self.rates.append(run.optimizer.param_groups[0]["lr"])


@pytest.mark.slow  # the demo's 60 iterations
def test_a_demo_run_of_60_iterations_leaves_warmup_and_decays(tmp_path, tiny_checkpoint, drops):
    """The demo's finetune: the optimizer reaches the peak lr after a tenth of the run, then the cosine
    takes it down (with the official 100 warmup steps it would still be climbing at step 60)."""
    schedule = demo_schedule("finetune", [])
    quick = ["method.settings.augment=false", "method.settings.batch_size=2"]  # the schedule is the demo's
    config = _config(tmp_path, tiny_checkpoint, "method.name=finetune", *schedule, *quick)
    method, ctx = _begin(config, str(drops[0]))
    rates = _LearningRates()
    fit(method, load_task(str(drops[0])), ctx, callbacks=[rates])
    peak, warmup = method.settings.lr, DEMO_ITERATIONS // 10
    assert len(rates.rates) == DEMO_ITERATIONS
    assert max(rates.rates) == pytest.approx(peak) == rates.rates[warmup - 1]  # warmup over after a tenth
    tail = rates.rates[warmup:]
    assert all(a >= b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.01 * peak  # cosine, to the floor


@pytest.mark.slow  # the demo's 60 iterations with ZSCL's reference set
def test_zscl_ensemble_interval_follows_the_demo_schedule(tmp_path, tiny_checkpoint, drops):
    """A tenth of the run, as the official 100 of 1000: merges after steps 0, 6, ..., 54, plus the start and
    the final weights (with the official interval of 100 it would be three points)."""
    schedule = demo_schedule("zscl", [])
    config = _config(
        tmp_path,
        tiny_checkpoint,
        "method.name=zscl",
        *schedule,
        "method.settings.augment=false",
        "method.settings.batch_size=2",
        "method.settings.reference_batch_size=2",
    )
    method, ctx = _begin(config, str(drops[0]))
    fit(method, load_task(str(drops[0])), ctx)
    assert method.merged == 1 + 10 + 1 and method.settings.ensemble_every == DEMO_ITERATIONS // 10


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.strip().splitlines() if line != "cliploop: configuration error:"]


@pytest.mark.parametrize(
    "settings,expected",
    [
        (["method.name=finetune", "method.settings.iterations=60"], "warmup_steps (100) > iterations (60)"),
        (
            ["method.name=zscl", "method.settings.iterations=60", "method.settings.warmup_steps=6"],
            "ensemble_every (100) >= iterations (60)",
        ),
        (
            ["method.name=gnsp", "method.settings.per_task={aircraft: {iterations: 50}}"],
            "per_task.aircraft: warmup_steps (100) > iterations (50)",
        ),
    ],
)
def test_config_refuses_a_schedule_its_step_counts_cannot_follow(settings, expected, tmp_path, capsys):
    argv = ["config", "-w", str(tmp_path / "ws")]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and expected in lines[0], lines


def test_learn_refuses_it_before_anything_loads_and_a_fitting_schedule_resolves(tmp_path, capsys, drops):
    ws = ["-w", str(tmp_path / "ws")]
    short = ["--set", "method.settings.iterations=60"]
    assert main(["learn", "--method", "lwf", str(drops[0]), *ws, *short]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "warmup_steps (100) > iterations (60)" in lines[0]
    assert not (tmp_path / "ws").exists()
    # The warmup may span the whole run (the official GNSP Aircraft schedule: 100 warmup steps of 100).
    assert main(["config", *ws, "--set", "method.name=gnsp", "--set", "method.settings.iterations=100"]) == 0
    fitting = ["--set", "method.settings.warmup_steps=6", "--set", "method.settings.ensemble_every=6"]
    assert main(["config", *ws, "--set", "method.name=zscl", *short, *fitting]) == 0
    capsys.readouterr()
    # The demo keeps its own schedule off when the user chooses the length, and refuses before building anything.
    demo = tmp_path / "demo"
    assert main(["demo", "--dir", str(demo), "--method", "lwf", "--set", "method.settings.iterations=30"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "warmup_steps (100) > iterations (30)" in lines[0]
    assert not list(tmp_path.glob("demo*"))


def test_recorded_settings_still_load_and_only_a_run_refuses_them():
    """A state learned before the refusal recorded such settings: serving validates them and must still load."""
    cls = get_method("zscl")
    recorded = cls.Settings.model_validate({"iterations": 60, "warmup_steps": 6})
    assert [where for where, _ in cls.config_problems(recorded)] == ["ensemble_every"]
    assert get_method("lvp").config_problems(get_method("lvp").Settings()) == []


def test_an_epoch_schedule_is_checked_when_the_task_starts(tmp_path, tiny_checkpoint, drops):
    """CTP counts epochs: the task's length is known only from its images (8 in batches of 128: one step)."""
    config = _config(
        tmp_path, tiny_checkpoint, "method.name=ctp", "method.settings.epochs=1", "method.settings.warmup_steps=5"
    )
    with pytest.raises(MethodError, match=r"ctp: task t-a runs 1 steps: warmup_steps \(5\) > steps \(1\)"):
        _begin(config, str(drops[0]))


def _trained_parts(method) -> frozenset[str]:
    """The parts whose parameters the trainer would update after the method's set-up."""
    model_params = {id(p): n for n, p in method.ctx.backbone.model.named_parameters()}
    parts = set()
    for name, p in method.trainable_parameters():
        if not p.requires_grad:
            continue
        name = model_params.get(id(p))
        parts.add("head" if name is None else "text" if name.startswith(TEXT_TOWER) else "image")
    return frozenset(parts)


@pytest.mark.parametrize("name", METHODS)
def test_a_method_trains_the_parts_it_declares(name, tmp_path, tiny_checkpoint, drops):
    cls = get_method(name)
    config = _config(tmp_path, tiny_checkpoint, f"method.name={name}", *demo_schedule(name, []))
    method, _ = _begin(config, str(drops[0]))
    if not cls.trains:  # no optimisation loop: the encoders stay as loaded
        assert cls.trained <= {"pools"} and cls.builds_pools == ("pools" in cls.trained)
        return
    assert _trained_parts(method) == cls.trained
    if cls.trained_later is not None:  # from the second task on (GNSP: only image-tower matrices)
        quick = ["method.settings.iterations=2", "method.settings.warmup_steps=0", "method.settings.batch_size=4"]
        config = _config(tmp_path, tiny_checkpoint, f"method.name={name}", *quick)
        state = learn_step(str(drops[0]), config).state
        later, _ = _begin(config, str(drops[1]), state, locate=lambda task_id: load_task(str(drops[0])))
        assert _trained_parts(later) == cls.trained_later != cls.trained


def test_cliploop_methods_says_what_each_method_trains(capsys):
    assert main(["methods", "gnsp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("trains: image tower + text tower on the first task, then image tower")
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "trains: nothing (frozen)" in listing and "trains: image tower (its last block only)" in listing


def test_a_methods_demo_sets_it_beside_fine_tuning_on_a_matched_schedule():
    """The baseline keeps the demo's schedule, or the user's schedule settings that fine-tuning also has (a
    method's own settings, such as a reference set, are not fine-tuning's); its figures print beside the method's."""
    from types import SimpleNamespace

    from flows.demo import DEMO_ADAMW_LR, DEMO_ITERATIONS, baseline_overrides
    from flows.demo_report import baseline_text

    default = baseline_overrides([])
    assert default[0] == "method.name=finetune" and f"method.settings.iterations={DEMO_ITERATIONS}" in default
    assert f"method.settings.lr={DEMO_ADAMW_LR}" in default
    assert f"method.settings.warmup_steps={DEMO_ITERATIONS // 10}" in default
    mine = ["method.settings.iterations=40", "method.settings.warmup_steps=4", "method.settings.reference_set=r"]
    chosen = baseline_overrides([*mine, "method.settings.lr=0.001", "gate.max_forgetting=5"])
    assert chosen == ["method.name=finetune", *mine[:2], "method.settings.lr=0.001"]

    updates = [
        {"task_id": "a", "version": 1, "metrics": {"cl.last": 90.0, "cl.forgetting": None}},
        {"task_id": "b", "version": 2, "metrics": {"cl.last": 70.0, "cl.forgetting": 12.0}},
    ]
    run = SimpleNamespace(
        summary={"updates": updates},
        config=SimpleNamespace(method=SimpleNamespace(name="gnsp")),
        baseline={"method": "finetune", "tasks": ["a", "b"], "forgetting": 62.0, "last": 35.5, "seconds": 9.0},
    )
    text = "\n".join(baseline_text(run))
    assert "gnsp against plain fine-tuning of the same tasks (a, b)" in text
    rows = {line.split()[0]: line.split()[1:3] for line in text.splitlines()[4:]}
    assert rows == {"gnsp": ["12.00", "70.00"], "finetune": ["62.00", "35.50"]}
    assert baseline_text(SimpleNamespace(**{**vars(run), "baseline": None})) == []
