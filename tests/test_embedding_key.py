"""The embedding cache's key (components/model/embedding_cache.py; docs/library.md, "The embedding cache"): a digest of
what decides a split's embeddings and of nothing else. Each test changes one thing the definition names (the image
tower's weights and their names, dtypes and shapes, the device type, the autocast dtype, the eval preprocessing,
the decoder, the batch size, the split's content and order, the split, the format) and finds the key changed, and
changes what it does not name (a path, the text tower, an object's address in a repr, the CUDA device index, the
identity's key order) and finds it kept; so dropping any one field from the key fails here.

Some towers here are hand-made torch modules (real modules, not stand-ins for a running model): only they can hold
the same bytes under another name, dtype or shape, which a loaded model never shows side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil

import pytest
import torch

from components.intake.shards import ShardWriter, write_index
from components.model import embedding_cache
from components.model.data import load_task
from components.model.embedding_cache import content_digest, encoder_digest, entry_identity, entry_key
from tests.drops import make_task, read_manifest, write_manifest

FIELDS = {"format", "encoder", "device", "autocast", "preprocess", "decoder", "batching", "content", "split"}


@pytest.fixture(scope="module")
def drop(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("key"), "t-key", ["cat", "dog"], train=3, test=2)


def _key(backbone, task, split="test", batch_size=3, decoder="pillow-draft2x"):
    return entry_key(entry_identity(backbone, task, split, batch_size, decoder))


def test_the_identity_names_what_the_docs_name_and_no_path(tiny_backbone, drop):
    task = load_task(str(drop))
    ident = entry_identity(tiny_backbone, task, "test", 3, "pillow-draft2x")
    assert set(ident) == FIELDS
    assert ident["format"] == embedding_cache.FORMAT == 1
    assert ident["device"] == "cpu" and ident["autocast"] == "None" and ident["split"] == "test"
    assert ident["decoder"] == "pillow-draft2x" and ident["batching"] == {"batch_size": 3, "within": "part"}
    assert ident["preprocess"].startswith("Compose(") and "Resize(size=32" in ident["preprocess"]
    assert str(drop) not in repr(ident) and drop.name not in repr(ident)
    assert re.fullmatch("[0-9a-f]{32}", entry_key(ident))
    # The same things, asked again from other objects, are the same key (a moved or reloaded task included).
    moved = shutil.copytree(drop, drop.parent / "elsewhere" / "t-key")
    assert _key(tiny_backbone, load_task(str(moved))) == entry_key(ident)


def test_the_key_is_a_digest_of_every_field_and_not_of_their_order(tiny_backbone, drop):
    ident = entry_identity(tiny_backbone, load_task(str(drop)), "test", 3, "pillow-draft2x")
    key = entry_key(ident)
    assert entry_key(dict(reversed(list(ident.items())))) == key
    for name in FIELDS:
        assert entry_key({**ident, name: "other"}) != key, name
    assert entry_key({**ident, "batching": {"batch_size": 3, "within": "shard"}}) != key


def test_format_device_type_autocast_and_preprocess_each_change_the_key(tiny_backbone, drop, monkeypatch):
    import open_clip

    task = load_task(str(drop))
    key = _key(tiny_backbone, task)
    other = {
        "device": dataclasses.replace(tiny_backbone, device="cuda:0"),  # digest only: nothing runs on it
        "bf16": dataclasses.replace(tiny_backbone, autocast_dtype=torch.bfloat16),
        "fp16": dataclasses.replace(tiny_backbone, autocast_dtype=torch.float16),
        "size": dataclasses.replace(tiny_backbone, preprocess=open_clip.image_transform(48, is_train=False)),
        "mean": dataclasses.replace(
            tiny_backbone, preprocess=open_clip.image_transform(32, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
        ),
    }
    keys = {name: _key(backbone, task) for name, backbone in other.items()}
    assert len(set(keys.values()) | {key}) == len(other) + 1, keys
    # The device's type decides the kernels, not which card of that type.
    assert _key(dataclasses.replace(tiny_backbone, device="cuda:1"), task) == keys["device"]
    assert _key(dataclasses.replace(tiny_backbone, device="cpu"), task) == key
    monkeypatch.setattr(embedding_cache, "FORMAT", 2)  # a new entry layout never reads an old one
    assert _key(tiny_backbone, task) != key


def test_an_object_address_in_the_preprocess_repr_is_not_part_of_the_key(tiny_backbone, drop):
    """A transform holding a plain function shows its address in its repr; another process (or another copy of
    the same transform) has another address and must find the same entry."""
    from torchvision.transforms import Compose

    def make():
        def to_rgb(image):
            return image.convert("RGB")

        return Compose([to_rgb, *tiny_backbone.preprocess.transforms])

    first, second = make(), make()
    assert re.search(" at 0x[0-9a-f]+", repr(first)) and repr(first) != repr(second)
    task = load_task(str(drop))
    keys = [_key(dataclasses.replace(tiny_backbone, preprocess=p), task) for p in (first, second)]
    assert keys[0] == keys[1] != _key(tiny_backbone, task)


def test_decoder_batch_size_and_split_each_change_the_key(tiny_backbone, drop):
    task = load_task(str(drop))
    key = _key(tiny_backbone, task)
    others = [
        _key(tiny_backbone, task, decoder="pillow"),
        _key(tiny_backbone, task, batch_size=4),
        _key(tiny_backbone, task, split="train"),
    ]
    assert len({key, *others}) == 4


def _tower(**tensors) -> torch.nn.Module:
    """A model whose image tower (``visual``) holds exactly these buffers, registered in this order."""
    model, visual = torch.nn.Module(), torch.nn.Module()
    for name, tensor in tensors.items():
        visual.register_buffer(name, tensor)
    model.visual = visual
    return model


def test_the_encoder_digest_covers_each_tensors_name_dtype_shape_and_bytes(tiny_backbone):
    w = torch.arange(6, dtype=torch.float32)
    digest = {
        "base": _tower(a=w.reshape(2, 3), b=torch.ones(2)),
        "bytes": _tower(a=w.reshape(2, 3) + 1, b=torch.ones(2)),
        "name": _tower(a2=w.reshape(2, 3), b=torch.ones(2)),  # same bytes, dtypes, shapes and order
        "shape": _tower(a=w.reshape(3, 2), b=torch.ones(2)),  # same bytes, names and dtypes
        "dtype": _tower(a=w.reshape(2, 3).view(torch.int32), b=torch.ones(2)),  # same bytes, names and shapes
        "more": _tower(a=w.reshape(2, 3), b=torch.ones(2), z=torch.zeros(0)),  # an empty tensor more
    }
    found = {k: encoder_digest(dataclasses.replace(tiny_backbone, model=m)) for k, m in digest.items()}
    assert len(set(found.values())) == len(found), found
    # The order the tensors were registered in is not part of it.
    assert (
        encoder_digest(dataclasses.replace(tiny_backbone, model=_tower(b=torch.ones(2), a=w.reshape(2, 3))))
        == (found["base"])
    )


def test_the_image_towers_weights_change_the_key_and_the_text_towers_do_not(tiny_checkpoint, drop):
    """Learned image weights are another key; a text tower that learns (prompts, heads) leaves the images'
    embeddings, and so the entry, as they were. An in-place update is seen though the model object is the same."""
    from components.model.backbones import load_backbone
    from components.settings.config import ModelConfig

    path, sha = tiny_checkpoint
    cfg = ModelConfig(name="cliploop-tiny", pretrained=None, checkpoint=str(path), sha256=sha, device="cpu")
    backbone, task = load_backbone(cfg), load_task(str(drop))
    key = _key(backbone, task)
    assert _key(load_backbone(cfg), task) == key  # the same weights loaded again
    with torch.no_grad():
        backbone.model.token_embedding.weight.add_(1.0)
        backbone.model.ln_final.weight.mul_(2.0)
    assert _key(backbone, task) == key
    with torch.no_grad():
        next(backbone.model.visual.parameters()).add_(1e-3)
    changed = _key(backbone, task)
    assert changed != key
    with torch.no_grad():
        next(backbone.model.visual.parameters()).sub_(1e-3).add_(2e-3)
    assert _key(backbone, task) not in (key, changed)


def _stored_copy(drop, root):
    """The drop as ingestion stores it (shards and an index with each image's SHA-256), in manifest order."""
    folder = root / "stored"
    writer = ShardWriter(folder / "shards", 1 << 20)
    rows = []
    for rel, label, split in read_manifest(drop)[1:]:  # after the header
        data = (drop / rel).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        writer.add(sha, ".png", data)
        rows.append({"path": rel, "label": label, "split": split, "sha256": sha, "format": "PNG"})
    located = writer.close()
    for row in rows:
        where = located[row["sha256"] + ".png"]
        row.update(shard=where.shard, offset=where.offset, size=where.size)
    write_index(folder / "index.csv", rows)
    shutil.copy(drop / "task.yaml", folder / "task.yaml")
    shutil.copy(drop / "manifest.csv", folder / "manifest.csv")
    return folder


def test_content_is_the_images_in_manifest_order_whether_dropped_or_stored(tiny_backbone, drop, tmp_path):
    """The content field is a digest of the split's images' SHA-256s in manifest order: a drop (its images hashed)
    and the task stored from it (its index's SHA-256s) have the same one; another image or another order, not."""
    task = load_task(str(drop))
    stored = load_task(str(_stored_copy(drop, tmp_path)))
    try:
        for split in ("test", "train"):
            assert content_digest(stored, split) == content_digest(task, split)
            assert _key(tiny_backbone, stored, split) == _key(tiny_backbone, task, split)
        assert content_digest(task, "train") != content_digest(task, "test")  # asked in turn of one task object
    finally:
        stored.source.close()

    swapped = shutil.copytree(drop, tmp_path / "swapped")
    rows = read_manifest(swapped)[1:]
    tests = [i for i, row in enumerate(rows) if row[2] == "test"]
    rows[tests[0]], rows[tests[1]] = rows[tests[1]], rows[tests[0]]
    write_manifest(swapped, rows)
    reordered = load_task(str(swapped))
    assert sorted(r for r, _ in reordered.test) == sorted(r for r, _ in task.test)
    assert content_digest(reordered, "test") != content_digest(task, "test")
    assert content_digest(reordered, "train") == content_digest(task, "train")

    changed = shutil.copytree(drop, tmp_path / "changed")
    victim = changed / rows[tests[0]][0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # one bit of one test image (its bytes are hashed, never decoded, here)
    victim.write_bytes(bytes(data))
    assert content_digest(load_task(str(changed)), "test") != content_digest(task, "test")
    assert _key(tiny_backbone, load_task(str(changed))) != _key(tiny_backbone, task)
    assert content_digest(load_task(str(changed)), "train") == content_digest(task, "train")


def test_a_stored_tasks_content_follows_its_index(tiny_backbone, drop, tmp_path):
    """A stored task's content comes from its index.csv (which its DVC md5 covers): another SHA-256 there is another
    key, though the folder and every other field are the same."""
    folder = _stored_copy(drop, tmp_path)
    first = load_task(str(folder))
    key = _key(tiny_backbone, first)
    first.source.close()
    text = (folder / "index.csv").read_text()
    test_row = next(line for line in text.splitlines() if ",test," in line)
    sha = re.search("[0-9a-f]{64}", test_row).group(0)
    (folder / "index.csv").write_text(text.replace(sha, "0" * 64))
    again = load_task(str(folder))
    try:
        assert _key(tiny_backbone, again) != key
        assert _key(tiny_backbone, again, "train") == _key(tiny_backbone, load_task(str(drop)), "train")
    finally:
        again.source.close()
