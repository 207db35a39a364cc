"""GPU checks (opt-in: ``pytest -m gpu``; skipped where no CUDA device is present, as in CI)."""

from __future__ import annotations

import pytest
import torch

from components.model.backbones import encode_batch, load_backbone, register_builtin_configs, save_weights
from components.settings.config import ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_precision_on_cuda_is_bf16_autocast_and_close_to_fp32(tmp_path):
    import open_clip

    register_builtin_configs()
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_weights(open_clip.create_model("cliploop-tiny", pretrained=None), path)
    gpu = load_backbone(ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path)))
    cpu = load_backbone(ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path), device="cpu"))
    assert gpu.device == "cuda" and gpu.autocast_dtype == torch.bfloat16
    images = torch.randn(64, 3, 32, 32)
    on_gpu, on_cpu = encode_batch(gpu, images), encode_batch(cpu, images)
    assert on_gpu.dtype == torch.float32 and on_gpu.device.type == "cpu"
    cosine = (on_gpu * on_cpu).sum(dim=1)
    assert cosine.min() > 0.99  # bf16 autocast changes bits, not meaning


FINE_TUNING = ["finetune", "lwf", "wise-ft", "zscl", "sg", "gnsp", "ctp", "cvm"]


@pytest.mark.parametrize("name", FINE_TUNING)
def test_every_fine_tuning_method_trains_on_cuda_with_bf16_autocast(name, tmp_path):
    """Two tiny tasks on the GPU (bf16 autocast, fp32 master weights): finite losses, weights moved.
    Its CPU twin, in the fast suite: tests/test_trains_on_cpu.py."""
    from tests.method_training import assert_trained, learn_two_tasks

    result, initial = learn_two_tasks(name, tmp_path)
    assert all(step.report.train.peak_mem_mb for step in result.steps)  # measured on CUDA only: it ran there
    assert_trained(name, result, initial)
