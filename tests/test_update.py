"""One continual step at a time (the nightly pipeline's train + evaluate): chaining steps through saved
learner states gives the same matrix as learning the whole sequence at once."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from components.model.state import LearnerState
from components.training.learn import LearnError, learn_step
from components.training.learn_sequence import learn
from tests.cl_reference import expected_metrics
from tests.test_learn import _cfg


def test_chained_steps_through_saved_states_match_a_whole_sequence(tmp_path, tiny_checkpoint, drops):
    cfg = _cfg(tmp_path, tiny_checkpoint)
    locations = {d.name: str(d) for d in drops}
    parent = None
    for i, drop in enumerate(drops):
        result = learn_step(str(drop), cfg, parent, locate=locations.__getitem__, out_dir=tmp_path / f"v{i}")
        parent = LearnerState.load(tmp_path / f"v{i}" / "state")  # what the next night reads from the registry
    whole = learn([str(d) for d in drops], cfg, "lvp", validate_first=False)

    m, w = result.matrix, whole.matrix
    assert m.tasks == w.tasks == ["t-a", "t-b", "t-c"]
    assert m.matrix[-1] == w.matrix[-1]  # final accuracies
    for i in range(3):
        for j in range(i + 1):
            assert m.matrix[i][j] == w.matrix[i][j]  # everything learned so far
    assert m.matrix[0][1] == w.matrix[0][1] and m.matrix[1][2] == w.matrix[1][2]  # transfer before learning
    assert m.matrix[0][2] is None  # a task two steps ahead was not known yet
    assert m.initial == w.initial
    # The step's metrics are the definitions (docs/metrics.md) applied to its matrix, not merely the sequence's.
    assert result.metrics == pytest.approx(expected_metrics(m.to_dict()), abs=1e-6)
    a = m.matrix  # by hand for the two a reviewer reads first: tasks 1 and 2 against the last row
    assert result.metrics["cl.bwt"] == pytest.approx(((a[2][0] - a[0][0]) + (a[2][1] - a[1][1])) / 2, abs=1e-6)
    forgetting = ((max(a[0][0], a[1][0]) - a[2][0]) + (a[1][1] - a[2][1])) / 2
    assert result.metrics["cl.forgetting"] == pytest.approx(forgetting, abs=1e-6)
    assert whole.metrics == pytest.approx(expected_metrics(w.to_dict()), abs=1e-6)
    assert [t["task_id"] for t in parent.tasks] == ["t-a", "t-b", "t-c"]

    with pytest.raises(LearnError, match="already learned"):
        learn_step(str(drops[0]), cfg, parent, locate=locations.__getitem__)
    other = _cfg(tmp_path, tiny_checkpoint, "method.name=zeroshot")
    with pytest.raises(LearnError, match="keeps one method"):
        learn_step(str(drops[0]), other, parent, locate=locations.__getitem__)


def test_a_fine_tuning_sequence_is_its_chain_of_steps(tmp_path, tiny_checkpoint, drops):
    """``cliploop learn`` is a loop over the pipeline's step: with training (random crops included), the
    sequence and the chain through saved states reach the same weights and the same accuracies."""
    import torch

    cfg = _cfg(
        tmp_path,
        tiny_checkpoint,
        "method.name=finetune",
        "method.settings.iterations=2",
        "method.settings.batch_size=4",
        "method.settings.warmup_steps=0",
        "method.settings.lr=0.001",
    )
    locations = {d.name: str(d) for d in drops[:2]}
    parent = None
    for i, drop in enumerate(drops[:2]):
        step = learn_step(str(drop), cfg, parent, locate=locations.__getitem__, out_dir=tmp_path / f"v{i}")
        assert step.report.train is not None and step.report.train.train_steps == 2
        parent = LearnerState.load(tmp_path / f"v{i}" / "state")
    whole = learn([str(d) for d in drops[:2]], cfg, validate_first=False)

    assert set(parent.weights) == set(whole.state.weights)
    assert all(torch.equal(parent.weights[k], whole.state.weights[k]) for k in parent.weights)
    assert step.matrix.matrix[-1] == whole.matrix.matrix[-1] and step.matrix.initial == whole.matrix.initial
    assert any(not torch.equal(parent.weights[k], v) for k, v in load_file(tiny_checkpoint[0]).items())  # it trained
    assert [s.task_id for s in whole.steps] == ["t-a", "t-b"]
    assert whole.timings.learn_s == pytest.approx(sum(s.timings.learn_s for s in whole.steps))
