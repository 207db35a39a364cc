"""One continual step at a time (the nightly pipeline's train + evaluate): chaining steps through saved
learner states gives the same matrix as learning the whole sequence at once."""

from __future__ import annotations

import pytest

from components.learn import learn
from components.state import LearnerState
from components.update import UpdateError, learn_next
from tests.test_learn import _cfg, drops, tiny_checkpoint  # noqa: F401  (shared fixtures)


def test_chained_steps_through_saved_states_match_a_whole_sequence(tmp_path, tiny_checkpoint, drops):  # noqa: F811
    cfg = _cfg(tmp_path, tiny_checkpoint)
    locations = {d.name: str(d) for d in drops}
    parent = None
    for i, drop in enumerate(drops):
        result = learn_next(str(drop), cfg, parent, locate=locations.__getitem__, out_dir=tmp_path / f"v{i}")
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
    assert result.metrics["cl.bwt"] == whole.metrics["cl.bwt"]
    assert result.metrics["cl.forgetting"] == whole.metrics["cl.forgetting"]
    assert [t["task_id"] for t in parent.tasks] == ["t-a", "t-b", "t-c"]

    with pytest.raises(UpdateError, match="already learned"):
        learn_next(str(drops[0]), cfg, parent, locate=locations.__getitem__)
    other = _cfg(tmp_path, tiny_checkpoint, "method.name=zeroshot")
    with pytest.raises(UpdateError, match="keeps one method"):
        learn_next(str(drops[0]), other, parent, locate=locations.__getitem__)
