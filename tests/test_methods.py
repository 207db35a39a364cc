"""Every registered method, end to end on CPU: two tiny tasks (train), the learner state saved, loaded in
a fresh process, and the same predictions from it. A new method is covered by registering it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.data import load_task
from components.learn import context_for, learn
from components.methods import available_methods, get_method
from components.state import LearnerState
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(available_methods())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Fixed random tiny-model weights and two class-incremental tasks."""
    import open_clip

    from components.models import register_builtin_configs, save_weights

    root = tmp_path_factory.mktemp("methods")
    register_builtin_configs()
    torch.manual_seed(0)
    path = root / "tiny.safetensors"
    sha = save_weights(open_clip.create_model("cliploop-tiny", pretrained=None), path)
    drops = [make_task(root, "t-a", ["cat", "dog"], train=4, test=2),
             make_task(root, "t-b", ["emu", "owl"], train=4, test=2)]
    return {"root": root, "overrides": ["model.name=cliploop-tiny", "model.pretrained=null", f"model.checkpoint={path}",
                                        f"model.sha256={sha}", "evaluation.batch_size=16"], "drops": drops}


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
    if trains:  # the fine-tuned weights are in the bundle, as safetensors
        assert state.weights is not None and (tmp_path / "out" / "state" / "backbone.safetensors").is_file()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]

    # In this process: the scores the run's model gives the test images of both tasks.
    loaded = LearnerState.load(tmp_path / "out" / "state")
    from components.models import load_backbone

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
from components.config import load_config
from components.data import load_task
from components.learn import context_for
from components.methods import get_method
from components.models import load_backbone
from components.state import LearnerState
from tests.test_methods import _test_images
config = load_config(overrides={overrides!r}, env={{}}, cwd=Path({str(tmp_path)!r}))
state = LearnerState.load({str(tmp_path / 'out' / 'state')!r})
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
    from components.data import decode_rgb

    task = load_task(location)
    dataset = task.dataset_for("test", lambda im: im)
    return [(decode_rgb(dataset.read_bytes(i)), label) for i, (_, label) in enumerate(task.test)]
