"""Training a method resumes exactly from its checkpoint (the trainable weights, the optimizer moments and the
method's running state), and ZSCL's weight ensemble averages the weights it is documented to (docs/methods/zscl.md).
Split from tests/test_methods.py; one task of the tiny model, a few steps."""

from __future__ import annotations

import pytest
import torch

from components.methods import get_method
from components.model.data import load_task
from components.settings.config_loading import load_config
from components.training.learn import context_for
from tests.conftest import tiny_overrides
from tests.drops import make_task


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    return {
        "overrides": tiny_overrides(tiny_checkpoint),
        "drops": [make_task(root, "t-a", ["cat", "dog"], train=4, test=2)],
    }


@pytest.mark.slow  # two trainings per method
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
