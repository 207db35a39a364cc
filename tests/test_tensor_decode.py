"""The tensor decode path (components/model/tensor_decode.py): batched JPEG decoding and preprocessing as tensor
operations. On CPU (``torch-jpeg``) CI checks the algorithm against the Pillow path; the ``gpu`` tests check
nvJPEG's kernel where a CUDA device is present."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.model.data import ImageDataset, decode_rgb, decoder_key, load_task, resolve_decoder
from tests.conftest import MemoryImages
from tests.drops import write_manifest

SIDES = (40, 63, 100, 150, 257)  # under, near and over the tiny model's 32-px input; odd sizes too


def _picture(width: int, height: int, seed: int, kind: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """Structure at several scales (a class-dependent pattern, rings, blobs) and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    angle = kind * np.pi / 4
    stripes = np.sin((8 + 4 * kind) * (np.cos(angle) * x + np.sin(angle) * y) * np.pi)
    rings = np.sin(30 * np.hypot(x - rng.random(), y - rng.random()))
    base = np.array([[60, 200, 90], [200, 60, 60], [70, 90, 220], [220, 200, 60]][kind % 4], dtype=float)
    pixels = base + 50 * stripes[..., None] + 25 * rings[..., None] + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def _batch(dataset: ImageDataset) -> torch.Tensor:
    images, _ = dataset.collate([dataset[i] for i in range(len(dataset))])
    return dataset.finish_batch(images)


def test_tensor_path_embeddings_agree_with_pillows_and_other_formats_fall_back(tiny_backbone):
    from components.model.backbones import encode_batch
    from components.model.tensor_decode import decode_batch

    blobs = {f"{w}x{h}.jpg": _picture(w, h, seed=w + h, kind=w % 4) for w in SIDES for h in (w, w * 2 // 3 + 7)}
    blobs["grey.jpg"] = _picture(90, 70, seed=1, mode="L")
    blobs["art.png"] = _picture(120, 80, seed=2, fmt="PNG")  # not a JPEG: the Pillow path
    blobs["cmyk.jpg"] = _picture(64, 48, seed=3, mode="CMYK")  # four components: the Pillow path
    items = [(name, 0) for name in blobs]
    pillow = ImageDataset(MemoryImages(blobs), items, tiny_backbone.preprocess, "pillow")
    tensor = ImageDataset(MemoryImages(blobs), items, tiny_backbone.preprocess, "torch-jpeg")
    assert isinstance(tensor[0][0], torch.Tensor) and tensor[0][0].dtype == torch.uint8  # the workers read bytes
    reference, decoded = _batch(pillow), _batch(tensor)
    assert decoded.shape == reference.shape == (len(blobs), 3, 32, 32) and tensor.fallbacks == 2
    cosine = (encode_batch(tiny_backbone, reference) * encode_batch(tiny_backbone, decoded)).sum(dim=1)
    assert cosine.min() >= 0.995, cosine
    # At most a level or two of 255 apart (libjpeg's IDCT and the resize's rounding), never another picture.
    assert (decoded - reference).abs().max() < 0.05

    _, fell_back = decode_batch(
        [blobs[name] for name, _ in items], tensor.tensor_spec, "cpu", lambda d: pillow.transform(decode_rgb(d))
    )
    assert [items[i][0] for i in fell_back] == ["art.png", "cmyk.jpg"]
    for i in fell_back:  # a fallback image is exactly the Pillow path's
        assert torch.equal(decoded[i], reference[i])


def test_a_jpeg_the_decoder_refuses_falls_back_alone():
    import open_clip

    from components.model.tensor_decode import decode_batch, tensor_preprocess

    preprocess = open_clip.image_transform(32, is_train=False)
    good = _picture(80, 60, seed=4)
    broken = good[: len(good) // 3]  # a truncated JPEG: the batch call fails, the image is retried on its own
    seen = []

    def fallback(data: bytes) -> torch.Tensor:
        seen.append(data)
        return torch.zeros(3, 32, 32)

    out, fell_back = decode_batch([good, broken, good], tensor_preprocess(preprocess), "cpu", fallback)
    assert fell_back == [1] and seen == [broken] and torch.equal(out[0], out[2]) and out[0].abs().sum() > 0


def test_transforms_the_tensor_path_cannot_reproduce_are_refused():
    import open_clip

    from components.model.tensor_decode import UnsupportedTransform

    train = open_clip.image_transform(32, is_train=True)  # random resized crop: training decodes with Pillow
    with pytest.raises(UnsupportedTransform, match="RandomResizedCrop"):
        ImageDataset(MemoryImages({}), [], train, "torch-jpeg")
    with pytest.raises(ValueError, match="needs a CUDA device|torch-jpeg runs the same"):
        resolve_decoder("nvjpeg", "cpu")


def _drop(root, classes: int = 3, train: int = 4, test: int = 6) -> str:
    """A task drop of JPEGs of varied sizes, each class its own pattern."""
    folder = root / "t-jpeg"
    (folder / "img").mkdir(parents=True)
    names = [f"c{k}" for k in range(classes)]
    (folder / "task.yaml").write_text(
        yaml.safe_dump({"task_id": "t-jpeg", "scenario": "class-incremental", "dataset": "toy", "classes": names})
    )
    rows, rng = [], np.random.default_rng(0)
    for k, name in enumerate(names):
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                w, h = (int(v) for v in rng.integers(36, 140, 2))
                rel = f"img/{split}-{name}-{i}.jpg"
                (folder / rel).write_bytes(_picture(w, h, seed=1000 * k + 10 * i + len(split), kind=k))
                rows.append([rel, name, split])
    write_manifest(folder, rows)
    return str(folder)


def _same_top1_either_way(tmp_path, backbone, decoder: str) -> None:
    """An LVP pool built, and the task evaluated, with Pillow and with ``decoder``: the same top-1."""
    from components.methods.base import Context
    from components.methods.lvp import LVP, build_pool
    from components.model.state import LearnerState
    from components.training.evaluation import accuracy

    task = load_task(_drop(tmp_path))
    results = {}
    for name in ("pillow-draft2x", decoder):
        method, ctx = LVP(), Context(backbone, batch_size=8, decoder=name)
        state = LearnerState(method="lvp", backbone=backbone.reference)
        method.begin_task(state, task, ctx)
        state = method.end_task()
        assert state.pools["t-jpeg"].meta["decoder"] == name  # the pool says how it was decoded
        results[name] = (accuracy(method, state, task, ctx), state.pools["t-jpeg"])
    (pillow_top1, pillow_pool), (tensor_top1, tensor_pool) = results["pillow-draft2x"], results[decoder]
    assert pillow_top1 > 100 / 3 + 10  # the classes are told apart: the agreement below is about something
    assert abs(pillow_top1 - tensor_top1) <= 0.5
    cosine = torch.nn.functional.cosine_similarity(pillow_pool.image_means(), tensor_pool.image_means(), dim=1)
    assert cosine.min() >= 0.995 and torch.equal(pillow_pool.counts, tensor_pool.counts)
    again, _ = build_pool(task, Context(backbone, batch_size=8, decoder=decoder), LVP().settings)
    assert torch.equal(again.sums, tensor_pool.sums)  # decoded ahead in a thread, still the same bits


def test_an_lvp_pool_built_and_evaluated_either_way_gives_the_same_top1(tmp_path, tiny_backbone):
    _same_top1_either_way(tmp_path, tiny_backbone, "torch-jpeg")


def test_the_decoder_is_in_the_pool_and_run_keys(tmp_path, tiny_checkpoint):
    from components.intake.ledger import TaskRecord
    from components.pipeline import steps
    from components.settings.config_loading import load_config
    from tests.conftest import tiny_overrides

    record = TaskRecord("t-a", "learned", "digest", dvc_md5="md5")

    def config(*extra):
        return load_config(overrides=tiny_overrides(tiny_checkpoint, f"workspace={tmp_path / 'ws'}", *extra), env={})

    auto, cpu_auto, pillow, tensor = (
        config(),
        config("model.device=cpu"),
        config("model.device=cpu", "model.decoder=pillow-draft2x"),
        config("model.device=cpu", "model.decoder=torch-jpeg"),
    )
    assert decoder_key(auto.model) == "auto(cuda:nvjpeg,cpu:pillow-draft2x)"
    assert decoder_key(cpu_auto.model) == decoder_key(pillow.model) == "pillow-draft2x"
    assert decoder_key(config("model.device=cuda").model) == "nvjpeg"
    assert resolve_decoder("auto", "cuda:0") == "nvjpeg" and resolve_decoder("auto", "cpu") == "pillow-draft2x"
    assert steps.pool_key(pillow, record) != steps.pool_key(tensor, record)
    assert steps.pool_key(auto, record) != steps.pool_key(tensor, record)

    def run_key(cfg):
        from components.registry.registry import run_key

        return run_key(None, "t-a", "md5", f"{cfg.sha256()}+{decoder_key(cfg.model)}")

    assert run_key(pillow) != run_key(tensor)  # evaluation's pixels depend on the decoder too


def test_frozen_encoders_take_bf16_weights_on_cuda_and_stay_fp32_on_cpu(tiny_checkpoint):
    from components.model.backbones import encode_batch, frozen_precision, load_backbone
    from components.settings.config import ModelConfig

    path, sha = tiny_checkpoint
    cfg = ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path), sha256=sha, device="cpu")
    assert frozen_precision(cfg, "cuda") == "bf16-weights" and frozen_precision(cfg, "cpu") == "fp32"
    assert frozen_precision(cfg.model_copy(update={"precision": "fp32"}), "cuda") == "fp32"
    plain, frozen = load_backbone(cfg), load_backbone(cfg, frozen=True)
    assert frozen.weights_dtype == torch.float32 and frozen.autocast_dtype is None  # CPU pools keep their bits
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(encode_batch(plain, images), encode_batch(frozen, images))
    bf16 = load_backbone(cfg.model_copy(update={"frozen_precision": "bf16-weights"}), frozen=True)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    on_device = encode_batch(bf16, images, on_device=True)
    assert on_device.dtype == torch.float32 and (on_device * encode_batch(plain, images)).sum(dim=1).min() > 0.98


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gpu_backbone(tiny_checkpoint):
    from components.model.backbones import load_backbone
    from components.settings.config import ModelConfig

    path, sha = tiny_checkpoint
    return load_backbone(
        ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path), sha256=sha, device="cuda"),
        frozen=True,  # bf16 weights, as pools are built on a GPU
    )


@pytest.mark.gpu
@needs_cuda
def test_nvjpeg_embeddings_agree_with_pillows_on_cuda(tiny_backbone, gpu_backbone):
    from components.model.backbones import encode_batch

    gpu = gpu_backbone
    blobs = {f"{w}.jpg": _picture(w, w * 3 // 4, seed=w, kind=w % 4) for w in SIDES} | {"a.png": _picture(50, 50, 5)}
    items = [(name, 0) for name in blobs]
    pillow = ImageDataset(MemoryImages(blobs), items, gpu.preprocess, "pillow")
    nvjpeg = ImageDataset(MemoryImages(blobs), items, gpu.preprocess, "nvjpeg", gpu.device)
    decoded = _batch(nvjpeg)
    assert decoded.device.type == "cuda"
    cosine = (encode_batch(tiny_backbone, _batch(pillow)) * encode_batch(tiny_backbone, decoded.cpu())).sum(dim=1)
    assert cosine.min() >= 0.995, cosine
    assert nvjpeg.fallbacks == 1  # the PNG


@pytest.mark.gpu
@needs_cuda
def test_an_lvp_pool_built_with_nvjpeg_gives_pillows_top1_on_cuda(tmp_path, gpu_backbone):
    _same_top1_either_way(tmp_path, gpu_backbone, "nvjpeg")
