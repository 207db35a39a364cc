"""The methods' set-up, without learning: the reproduction configs validate, the pipeline asks a method whether it
builds pools, method code imports no platform library, the demo's method choice and schedule, and the prompt form
of the reference captions (ZSCL, GNSP) and of CVM's concepts. Split from tests/test_methods.py, which learns."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.methods import available_methods, get_method
from components.model.data import load_task
from components.settings.config_loading import load_config
from components.training.learn import context_for
from tests.conftest import tiny_overrides
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(available_methods())


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("setup")
    return {
        "overrides": tiny_overrides(tiny_checkpoint),
        "drops": [make_task(root, "t-a", ["cat", "dog"], train=4, test=2)],
    }


def test_reproduction_configs_load_and_their_method_settings_validate():
    from components.training.learn import make_method

    configs = sorted((REPO / "benchmarks" / "reproduce").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        config = load_config(str(path), env={})
        method = make_method(config)
        assert method.name == config.method.name
        if "per_task" in method.Settings.model_fields:
            for key in method.settings.per_task:
                method.settings.for_task(key, key)  # every per-task override validates


def test_the_pipeline_asks_the_method_whether_it_builds_pools(tmp_path, monkeypatch):
    """Pool building is a capability a method class declares, not a method name the pipeline knows."""
    from components import methods
    from components.methods.lvp import LVP
    from components.pipeline import steps

    def config(name):
        return load_config(overrides=[f"workspace={tmp_path}", f"method.name={name}"], env={}, cwd=tmp_path)

    assert {n for n in METHODS if steps.builds_pools(config(n))} == {"lvp"}
    twin = type("PoolTwin", (LVP,), {})  # the registry is restored after the test
    monkeypatch.setitem(methods._REGISTRY, "pool-twin", twin)
    assert steps.builds_pools(config("pool-twin"))
    monkeypatch.setattr(twin, "builds_pools", False)
    assert not steps.builds_pools(config("pool-twin"))


def test_method_code_imports_no_platform_library():
    """Methods and the trainer run without the platform: no prefect, mlflow or boto3 anywhere in them."""
    import ast

    files = sorted((REPO / "components" / "methods").glob("*.py")) + [
        REPO / "components" / "training" / "trainer.py",
        REPO / "components" / "training" / "callbacks.py",
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in {"prefect", "mlflow", "boto3", "botocore"}, (
                    f"{path.name} imports {name}"
                )


def test_demo_refuses_an_unknown_method(tmp_path, capsys):
    from flows.cli import main

    assert main(["demo", "--dir", str(tmp_path / "demo"), "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err and not (tmp_path / "demo-nope").exists()


def test_the_demo_gives_every_training_method_one_schedule_unless_the_user_chose_one():
    from flows.demo import DEMO_ITERATIONS, demo_schedule

    tenth = DEMO_ITERATIONS // 10
    common = [f"method.settings.iterations={DEMO_ITERATIONS}", "method.settings.batch_size=64"]
    adamw = [*common, f"method.settings.warmup_steps={tenth}", "method.settings.lr=0.0001"]
    assert demo_schedule("finetune", []) == demo_schedule("ctp", ["gate.max_forgetting=5"]) == adamw
    assert demo_schedule("zscl", []) == [
        *common,
        f"method.settings.warmup_steps={tenth}",
        f"method.settings.ensemble_every={tenth}",
        "method.settings.lr=0.0001",
    ]
    assert demo_schedule("sg", []) == [*common, f"method.settings.warmup_steps={tenth}"]  # SGD keeps its step size
    assert demo_schedule("zscl", ["method.settings.iterations=1000"]) == []
    assert demo_schedule("finetune", ["method.settings.epochs=2"]) == []
    assert demo_schedule("lvp", []) == demo_schedule("zeroshot", []) == []  # no training


def test_reference_captions_take_the_learners_prompt_form_unless_a_caption_is_set(tiny, tmp_path):
    """ZSCL and GNSP distil on reference captions. The official "a photo of a {}" is CLIP's own prompt (cliploop's
    default template); a model pretrained on other captions (the glyph base's "a glyph of {}") would be distilled
    on text it never saw, so the captions follow the configured template unless reference_caption says otherwise."""
    import dataclasses

    from components.methods.reference import ReferenceSet, ReferenceSettings
    from components.model.backbones import load_backbone

    task = load_task(str(tiny["drops"][0]))
    name = task.class_names[0]
    for templates, caption, expected in (
        (None, None, f"a photo of a {name}"),  # the default templates: the official caption
        ("a glyph of {}", None, f"a glyph of {name}"),
        ("a glyph of {}", "an image of {}", f"an image of {name}"),
    ):
        extra = [f"evaluation.templates={templates}"] if templates else []
        config = load_config(overrides=[*tiny["overrides"], *extra], env={}, cwd=tmp_path)
        ctx = context_for(config, load_backbone(config.model))
        reference = ReferenceSet(task, ctx, size=50, batch_size=4, seed=0, caption=caption)
        assert expected in reference.distinct
    # With templates "task", a reference set outside the stream brings its own task.yaml prompts.
    config = load_config(overrides=[*tiny["overrides"], "evaluation.templates=task"], env={}, cwd=tmp_path)
    ctx = context_for(config, load_backbone(config.model))
    sketched = dataclasses.replace(task, prompts=["a sketch of {}"])
    assert f"a sketch of {name}" in ReferenceSet(sketched, ctx, size=50, batch_size=4, seed=0).distinct
    with pytest.raises(ValueError, match="needs a {}"):
        ReferenceSettings(reference_caption="no slot")


def test_cvm_concepts_take_the_learners_prompt_form_unless_a_prompt_is_set(tiny, tmp_path):
    """CVM's concept table is its classifier. Its prompt was fixed at "a photo of a {}" while every other
    method and the evaluation prompt through the configured templates, so a model pretrained on other captions
    (the glyph base's "a glyph of {}") was scored through text it never saw once CVM took over."""
    from components.model.backbones import load_backbone

    key, name = "d/cat", "cat"
    for templates, prompt, expected in (
        (None, None, "a photo of a cat"),  # the default templates: what the setting's old default said
        ("a glyph of {}", None, "a glyph of cat"),
        ("a glyph of {}", "an image of {}", "an image of cat"),
    ):
        extra = [f"evaluation.templates={templates}"] if templates else []
        config = load_config(overrides=[*tiny["overrides"], *extra], env={}, cwd=tmp_path)
        ctx = context_for(config, load_backbone(config.model))
        method = get_method("cvm")({"prompt": prompt} if prompt else {})
        assert method.prompt_for(key, name, ctx) == expected
    with pytest.raises(ValueError, match="needs a {}"):
        get_method("cvm").Settings(prompt="no slot")
