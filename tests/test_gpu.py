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


@pytest.mark.parametrize("name", ["finetune", "lwf", "wise-ft", "zscl", "sg", "gnsp", "ctp", "cvm"])
def test_every_fine_tuning_method_trains_on_cuda_with_bf16_autocast(name, tmp_path):
    """Two tiny tasks on the GPU (bf16 autocast, fp32 master weights): finite losses, weights moved."""
    import open_clip

    from components.methods import get_method
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
    config = load_config(
        overrides=[
            f"workspace={tmp_path / 'ws'}",
            "model.name=cliploop-tiny",
            "model.pretrained=null",
            f"model.checkpoint={path}",
            f"method.name={name}",
            "method.settings.iterations=3",
            "method.settings.batch_size=4",
            "method.settings.warmup_steps=0",
            *(
                ["method.settings.ensemble_every=2"]
                if "ensemble_every" in get_method(name).Settings.model_fields
                else []
            ),
        ],
        env={},
        cwd=tmp_path,
    )
    result = learn([str(d) for d in drops], config, validate_first=False)
    assert result.state.weights is not None and all(t.device.type == "cpu" for t in result.state.weights.values())
    assert all(v is not None for v in result.matrix.matrix[-1])
