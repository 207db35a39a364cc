"""The CPU image path: task indexes parsed once per process, and Pillow's JPEG draft mode for large images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from components.intake import shards
from components.intake.shards import read_index, write_index
from components.model.data import decode_rgb
from tests.conftest import MemoryImages


def _rows(n: int, shard: str = "shard-00000.tar") -> list[dict]:
    return [
        {"path": f"img/{i}.jpg", "label": "cat", "split": "train", "sha256": f"{i:064x}", "shard": shard}
        | {"offset": 512 * i, "size": 100 + i, "format": "JPEG", "width": 8, "height": 8}
        for i in range(n)
    ]


def test_an_index_is_parsed_once_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "index.csv"
    write_index(path, _rows(3))
    first, second = read_index(path), read_index(tmp_path / "." / "index.csv")
    assert first == second and first is not second  # each caller gets its own list...
    assert all(a is b for a, b in zip(first, second))  # ...of the rows parsed once
    assert first[1]["offset"] == 512 and first[1]["size"] == 101 and first[1]["domain"] is None

    write_index(path, _rows(4, shard="shard-00001.tar"))  # replaced, as ingestion writes it: parsed afresh
    again = read_index(path)
    assert len(again) == 4 and again[0]["shard"] == "shard-00001.tar"


def test_the_index_cache_keeps_a_bounded_number_of_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "INDEX_CACHE_ROWS", 5)
    monkeypatch.setattr(shards, "_INDEX_CACHE", type(shards._INDEX_CACHE)())
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"t{i}" / "index.csv")
        paths[-1].parent.mkdir()
        write_index(paths[-1], _rows(3))
        read_index(paths[-1])
    assert list(shards._INDEX_CACHE) == [str(paths[2].resolve())]  # the least recently read went first


# ---- Pillow's draft mode ------------------------------------------------------------------------------------


def _jpeg(side: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A picture with structure at every scale: gradients, rings, stripes, blobs and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    rings = np.sin(40 * np.hypot(x - 0.3, y - 0.6))
    stripes = np.sign(np.sin(25 * (x + 0.5 * y)))
    blobs = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.005) for cx, cy in rng.random((6, 2)))
    pixels = np.stack([x * 255, 128 + 100 * rings * y, 128 + 60 * stripes + 120 * blobs], axis=-1)
    pixels += rng.normal(0, 6, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format=fmt, quality=92)
    return buf.getvalue()


def test_draft_mode_shrinks_large_jpegs_and_keeps_their_embeddings(tiny_backbone):
    from components.model.backbones import encode_batch
    from components.model.data import ImageDataset, input_size

    preprocess = tiny_backbone.preprocess
    assert input_size(preprocess) == (32, 32) and input_size(tiny_backbone.preprocess_train) == (32, 32)
    blobs = {f"big{i}.jpg": _jpeg(1024, seed=i) for i in range(3)}
    items = [(name, 0) for name in blobs]
    plain = ImageDataset(MemoryImages(blobs), items, preprocess, "pillow")
    draft = ImageDataset(MemoryImages(blobs), items, preprocess, "pillow-draft2x")
    assert decode_rgb(blobs["big0.jpg"], draft.draft_to).size == (128, 128)  # 1/8 scale: still >= 32 px
    assert decode_rgb(blobs["big0.jpg"]).size == (1024, 1024)
    full = torch.stack([plain[i][0] for i in range(len(items))])
    fast = torch.stack([draft[i][0] for i in range(len(items))])
    assert not torch.equal(full, fast)  # draft mode did decode differently
    cosine = (encode_batch(tiny_backbone, full) * encode_batch(tiny_backbone, fast)).sum(dim=1)
    assert cosine.min() >= 0.995, cosine


def test_draft_mode_at_vit_b_16_input_size_keeps_the_preprocessed_pixels():
    """ViT-B/16's own eval transform (224 px): at 2x and 4x the input, the model sees nearly the same tensor."""
    import open_clip

    from components.model.data import input_size

    preprocess = open_clip.image_transform(224, is_train=False)
    assert input_size(preprocess) == (224, 224)
    for side, scaled in ((448, 224), (1024, 256)):
        data = _jpeg(side, seed=side)
        assert decode_rgb(data, (224, 224)).size == (scaled, scaled)
        full, fast = preprocess(decode_rgb(data)), preprocess(decode_rgb(data, (224, 224)))
        assert torch.nn.functional.cosine_similarity(full.flatten(), fast.flatten(), dim=0) >= 0.999


def test_images_draft_mode_does_not_touch_give_the_same_bytes(tiny_backbone):
    from components.model.data import ImageDataset

    blobs = {
        "small.jpg": _jpeg(63),  # under twice the 32-px input on a side: decoded in full
        "big.png": _jpeg(512, fmt="PNG"),  # not a JPEG: no draft mode
        "wide.jpg": _wide_jpeg(600, 40),  # wide, but its height is under twice the input
    }
    items = [(name, 0) for name in blobs]
    for transform in (tiny_backbone.preprocess, lambda im: torch.tensor(np.asarray(im))):
        plain = ImageDataset(MemoryImages(blobs), items, transform, "pillow")
        draft = ImageDataset(MemoryImages(blobs), items, transform, "pillow-draft2x")
        for i in range(len(items)):
            assert torch.equal(plain[i][0], draft[i][0]), items[i]
    with pytest.raises(ValueError, match="unknown decoder"):
        ImageDataset(MemoryImages(blobs), items, tiny_backbone.preprocess, "dali")  # nvjpeg is one now


def _wide_jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def test_a_pool_records_its_decoder_and_a_prebuilt_pool_decoded_otherwise_is_refused(tmp_path, tiny_backbone):
    """The decoder a pool was built with is in its meta and in its key (every input of the key:
    tests/test_pool_key.py), and a prebuilt pool is checked against this run's decoder, whichever way the two
    differ; the other fields a prebuilt pool is checked on: tests/test_pools.py."""
    from components.methods.base import Context
    from components.methods.lvp import LVP, build_pool
    from components.model import data
    from components.model.pools import PoolError
    from tests.drops import make_task

    task = data.load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=2, test=1, image_format="jpg"))
    method = LVP()
    pool, _ = build_pool(task, Context(tiny_backbone), method.settings)
    assert pool.meta["decoder"] == data.DECODER == "pillow-draft2x"
    pool.save(tmp_path / "pools")
    for run_decoder in ("pillow-draft2x", "pillow", "torch-jpeg"):
        ctx = Context(tiny_backbone, decoder=run_decoder, prebuilt_pools={"t-a": str(tmp_path / "pools")})
        if run_decoder == pool.meta["decoder"]:
            assert method.prebuilt(task, ctx).meta == pool.meta
            continue
        with pytest.raises(PoolError, match="its decoder does not match"):
            method.prebuilt(task, ctx)  # a pool decoded in full (an older cliploop) is not this run's pixels


def test_a_prebuilt_pool_is_accepted_for_a_copy_of_its_task_in_another_folder(tmp_path, tiny_checkpoint):
    """A pool built on one worker from its cached copy of a task is used by a training step on another worker,
    whose copy of the same task lies in another folder: the folder is not part of what the pool is checked on."""
    import shutil

    from components.methods.base import Context
    from components.methods.lvp import LVP, build_pool
    from components.model import data
    from components.model.backbones import load_backbone
    from components.settings.config_loading import load_config
    from tests.conftest import tiny_overrides
    from tests.drops import make_task

    config = load_config(overrides=tiny_overrides(tiny_checkpoint, f"workspace={tmp_path / 'ws'}"), env={})
    here = make_task(tmp_path / "worker-a", "t-a", ["cat", "dog"], train=2, test=1)
    there = shutil.copytree(here, tmp_path / "worker-b" / "t-a")
    method, ctx = LVP(), Context(load_backbone(config.model))
    pool, _ = build_pool(data.load_task(here), ctx, method.settings)
    pool.save(tmp_path / "pools")
    prebuilt = Context(ctx.backbone, prebuilt_pools={"t-a": str(tmp_path / "pools")})
    assert method.prebuilt(data.load_task(there), prebuilt).class_keys == pool.class_keys
