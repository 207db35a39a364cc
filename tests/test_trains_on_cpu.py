"""The CPU twin of tests/test_gpu.py's training check (tests/method_training.py): fine-tuning learns two tiny tasks
with finite losses, and both towers it says it trains have moved (tests/test_methods.py enrols every method)."""

from __future__ import annotations

from tests.method_training import assert_trained, learn_two_tasks


def test_fine_tuning_trains_on_cpu(tmp_path):
    result, initial = learn_two_tasks("finetune", tmp_path, "model.device=cpu", "model.precision=fp32")
    assert_trained("finetune", result, initial)
    assert all(step.report.train.peak_mem_mb is None for step in result.steps)  # no CUDA memory: it ran here
