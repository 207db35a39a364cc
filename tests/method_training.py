"""Two tiny tasks learned by a fine-tuning method, and what "it trained" means, checked the same way on the GPU
(tests/test_gpu.py, opt-in) and on the CPU (tests/test_trains_on_cpu.py): every step's losses are numbers, the
learned weights are finite and back on the host, and each tower the method says it trains (``Method.trained``,
docs/contracts.md) has moved from the weights it started from."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from components.methods.tuning import TEXT_TOWER

ITERATIONS = 3


def learn_two_tasks(name: str, tmp_path: Path, *sets: str):
    """``cliploop learn`` of two tiny tasks with method ``name`` (three optimiser steps a task), from fixed random
    weights; returns the result and the weights it started from."""
    import open_clip
    from safetensors.torch import load_file

    from components.methods import get_method
    from components.model.backbones import register_builtin_configs, save_weights
    from components.settings.config_loading import load_config
    from components.training.learn_sequence import learn
    from tests.drops import make_task

    register_builtin_configs()
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_weights(open_clip.create_model("cliploop-tiny", pretrained=None), path)
    drops = [
        make_task(tmp_path, "t-a", ["cat", "dog"], train=4, test=2),
        make_task(tmp_path, "t-b", ["emu", "owl"], train=4, test=2),
    ]
    fields = get_method(name).Settings.model_fields
    config = load_config(
        overrides=[
            f"workspace={tmp_path / 'ws'}",
            "model.name=cliploop-tiny",
            "model.pretrained=null",
            f"model.checkpoint={path}",
            f"method.name={name}",
            f"method.settings.iterations={ITERATIONS}",
            "method.settings.batch_size=4",
            "method.settings.warmup_steps=0",
            *(["method.settings.ensemble_every=2"] if "ensemble_every" in fields else []),
            *sets,
        ],
        env={},
        cwd=tmp_path,
    )
    return learn([str(d) for d in drops], config, validate_first=False), load_file(str(path))


def tower(name: str) -> str:
    return "text" if name.startswith(TEXT_TOWER) else "image"


def assert_trained(name: str, result, initial: dict[str, torch.Tensor]) -> None:
    from components.methods import get_method

    cls = get_method(name)
    assert len(result.steps) == 2
    for step in result.steps:
        train = step.report.train
        assert train is not None and train.train_steps == ITERATIONS and len(train.losses) >= 1, step.task_id
        terms = [v for row in train.losses for k, v in row.items() if k not in ("step", "lr")]
        assert terms and all(isinstance(v, float) and math.isfinite(v) for v in terms), (step.task_id, train.losses)
    weights = result.state.weights
    assert weights is not None and set(weights) >= set(initial)
    assert all(t.device.type == "cpu" for t in weights.values())
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    moved = {tower(k) for k, v in initial.items() if not torch.equal(weights[k].to(v.dtype), v)}
    declared = (cls.trained | (cls.trained_later or frozenset())) & {"image", "text"}
    assert declared and declared <= moved, (name, sorted(declared), sorted(moved))
    assert all(v is not None for v in result.matrix.matrix[-1])
