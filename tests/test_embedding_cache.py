"""The frozen-encoder embedding cache (components/model/embedding_cache.py): that a hit is the bits of a fresh encode,
that an unfinished or damaged entry is rebuilt, that partials arriving out of order are stored in part order, what
memory keeps, and that a chain of LVP steps encodes each image once (counted where images are encoded,
``pool_engine.encode_parts``). What its key holds: tests/test_embedding_key.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from components.intake.shards import ShardWriter, write_index
from components.methods import get_method
from components.methods.lvp import build_pool
from components.model import pool_engine
from components.model.backbones import load_backbone
from components.model.data import load_task
from components.model.embedding_cache import (
    KIND,
    TENSORS,
    EmbeddingCache,
    entry_identity,
    entry_key,
    for_config,
    pool_partials,
    split_embeddings,
)
from components.model.pool_engine import LocalEngine, split_parts
from components.model.pools import PoolConfig
from components.settings.config_loading import load_config
from components.support.artifact_store import ArtifactStore
from components.training import learn_sequence
from components.training.run_context import context_for
from tests.conftest import tiny_overrides
from tests.drops import png_bytes


def _config(tmp_path, ckpt, *extra):
    sets = [f"workspace={tmp_path / 'ws'}", f"artifacts.root={tmp_path / 'store'}", "method.name=lvp", *extra]
    return load_config(overrides=tiny_overrides(ckpt, "evaluation.batch_size=3", *sets), env={})


@pytest.fixture
def setup(tmp_path, tiny_checkpoint, drops):
    config = _config(tmp_path, tiny_checkpoint)
    backbone = load_backbone(config.model)
    store = ArtifactStore(tmp_path / "store", tmp_path / "cache")
    return config, backbone, store, [load_task(str(d)) for d in drops[:2]]


def _stored_task(root: Path) -> Path:
    """A stored task whose train split spans several shards (parts)."""
    folder = root / "stored"
    writer = ShardWriter(folder / "shards", 1500)
    rows = []
    for i in range(10):
        data = png_bytes(500 + i)
        sha = hashlib.sha256(data).hexdigest()
        writer.add(sha, ".png", data)
        split = "test" if i % 4 == 3 else "train"
        rows.append({"path": f"i/{i}.png", "label": ["cat", "dog"][i % 2], "split": split, "sha256": sha})
    located = writer.close()
    for row in rows:
        where = located[row["sha256"] + ".png"]
        row.update(shard=where.shard, offset=where.offset, size=where.size, format="PNG")
    write_index(folder / "index.csv", rows)
    spec = {"task_id": "stored", "scenario": "class-incremental", "dataset": "toy", "classes": ["cat", "dog"]}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    (folder / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows)
    )
    return folder


def test_a_hit_returns_the_tensors_of_a_fresh_encode(setup):
    config, backbone, store, tasks = setup
    fresh = split_embeddings(context_for(config, backbone), tasks, "test")  # no cache: encoded
    ctx = context_for(config, backbone, embedding_cache=EmbeddingCache(store))
    before = pool_engine.encoded_images
    assert all(torch.equal(a, b) for a, b in zip(split_embeddings(ctx, tasks, "test"), fresh))  # a miss: stored
    assert pool_engine.encoded_images - before == sum(len(t.test) for t in tasks)
    reread = context_for(config, backbone, embedding_cache=EmbeddingCache(store))  # nothing in memory: from disk
    hits = split_embeddings(reread, tasks, "test")
    assert pool_engine.encoded_images - before == sum(len(t.test) for t in tasks)  # nothing encoded again
    assert all(torch.equal(a, b) for a, b in zip(hits, fresh))


@pytest.mark.parametrize("damage", ["no-marker", "flipped-byte"])
def test_an_unfinished_or_damaged_entry_is_rebuilt_not_used(setup, damage):
    config, backbone, store, (task, _) = setup
    ctx = context_for(config, backbone, embedding_cache=EmbeddingCache(store))
    (good,) = split_embeddings(ctx, [task], "test")
    key = entry_key(entry_identity(backbone, task, "test", ctx.batch_size, "pillow-draft2x"))
    folder = Path(store.root) / KIND / key
    if damage == "no-marker":
        (folder / "result.json").unlink()
    else:
        data = bytearray((folder / TENSORS).read_bytes())
        data[-1] ^= 0xFF
        (folder / TENSORS).write_bytes(bytes(data))
    cache = EmbeddingCache(store)
    assert cache.load(key) is None
    before = pool_engine.encoded_images
    (again,) = split_embeddings(context_for(config, backbone, embedding_cache=cache), [task], "test")
    assert pool_engine.encoded_images - before == len(task.test) and torch.equal(again, good)
    assert torch.equal(EmbeddingCache(store).load(key), good)  # complete again
    assert [p.name for p in folder.parent.iterdir()] == [key]  # no staging or stale folder left behind


def test_a_pool_from_cached_embeddings_is_byte_identical_to_one_encoded_on_the_spot(setup, tmp_path):
    config, backbone, store, _ = setup
    task = load_task(str(_stored_task(tmp_path)))
    assert len(split_parts(task, "train")) > 1
    cfg = PoolConfig(mode="bank")
    plain, _ = build_pool(task, context_for(config, backbone), cfg)
    cached = context_for(config, backbone, embedding_cache=EmbeddingCache(store))
    first, _ = build_pool(task, cached, cfg)  # a miss: encoded by the engine, stored
    before = pool_engine.encoded_images
    second, _ = build_pool(task, context_for(config, backbone, embedding_cache=EmbeddingCache(store)), cfg)
    assert pool_engine.encoded_images == before  # read from the store
    for pool in (first, second):
        assert all(torch.equal(pool.tensors()[k], v) for k, v in plain.tensors().items())


class ArrivalOrder:
    """The local engine's partials handed back last part first, as Ray's actors may finish them."""

    name = "reversed"

    def partials(self, task, split, ctx, gather):
        return list(reversed(LocalEngine().partials(task, split, ctx, gather)))


def test_partials_arriving_out_of_order_are_stored_and_returned_in_part_order(setup, tmp_path):
    """On a miss the engine's partials are stored as the split's embeddings: row i of the entry must be manifest row
    i whatever order the parts came back in, or every later hit (and every pool built from it) is scrambled."""
    config, backbone, store, _ = setup
    task = load_task(str(_stored_task(tmp_path)))
    parts = split_parts(task, "train")
    assert len(parts) > 1
    in_order = LocalEngine().partials(task, "train", context_for(config, backbone), gather=True)
    expected = torch.cat([p.embeddings for p in in_order])
    ctx = context_for(config, backbone, embedding_cache=EmbeddingCache(store))
    for gather in (True, False):
        got = pool_partials(ctx, task, "train", ArrivalOrder(), gather)  # a miss the first time, then a hit
        assert [p.part for p in got] == list(range(len(parts)))
        for p, want in zip(got, in_order):
            assert torch.equal(p.sums, want.sums) and torch.equal(p.counts, want.counts)
            if gather:
                assert torch.equal(p.embeddings, want.embeddings) and torch.equal(p.labels, want.labels)
            else:
                assert p.embeddings is None and p.labels is None
    key = entry_key(entry_identity(backbone, task, "train", ctx.batch_size, ctx.decoder))
    assert torch.equal(EmbeddingCache(store).load(key), expected)  # read back from the store, not from memory


def test_memory_keeps_the_most_recently_used_entries_within_its_budget():
    """Without a store the cache is memory only: entries over the budget are never kept, and when the budget is
    full the least recently used (saved or loaded) entry goes first."""
    one = torch.zeros(4, 8)  # 128 bytes of fp32
    cache = EmbeddingCache(None, memory_bytes=3 * 128)
    for name in "abc":
        cache.save(name, one + ord(name), {})
    assert all(torch.equal(cache.load(n), one + ord(n)) for n in "abc")  # exactly at the budget: all kept
    single = EmbeddingCache(None, memory_bytes=128)
    single.save("x", one, {})
    assert single.load("x") is not None  # one entry of exactly the budget fits
    assert cache.load("a") is not None  # a is now the most recently used; b the least
    cache.save("d", one, {})
    assert cache.load("b") is None and all(cache.load(n) is not None for n in "acd")
    cache.save("big", torch.zeros(4 * 3 + 1, 8), {})  # one row over the whole budget
    assert cache.load("big") is None and all(cache.load(n) is not None for n in "acd")
    cache.save("e", torch.zeros(4, 8, dtype=torch.float64), {})  # stored as fp32: 128 bytes, not 256
    assert cache.load("e").dtype == torch.float32 and sum(cache.load(n) is not None for n in "acde") == 3


def test_the_configured_cache_is_off_in_memory_or_in_the_artifact_store(tmp_path, tiny_checkpoint):
    assert for_config(_config(tmp_path, tiny_checkpoint, "artifacts.embedding_cache=false")) is None
    stored = for_config(_config(tmp_path, tiny_checkpoint))  # artifacts.root set
    assert stored.store is not None and Path(stored.store.root) == tmp_path / "store"
    outside = load_config(overrides=tiny_overrides(tiny_checkpoint, f"workspace={tmp_path / 'none'}"), env={})
    assert for_config(outside).store is None and not (tmp_path / "none").exists()  # nothing written there


def test_an_lvp_chain_encodes_each_image_once_with_the_cache_and_scores_the_same(tmp_path, tiny_checkpoint, drops):
    locations = [str(d) for d in drops[:2]]
    tasks = [load_task(loc) for loc in locations]
    distinct = sum(len(t.train) + len(t.test) for t in tasks)
    results = {}
    for cache in ("true", "false"):
        config = _config(tmp_path, tiny_checkpoint, f"artifacts.embedding_cache={cache}")
        before = pool_engine.encoded_images
        result = learn_sequence.learn(locations, config, validate_first=False)
        results[cache] = (pool_engine.encoded_images - before, result.matrix.to_dict())
    assert results["true"][0] == distinct  # each test image once, though both tasks are evaluated at every step
    assert results["false"][0] > distinct
    assert results["true"][1] == results["false"][1]


def test_only_methods_that_train_no_image_tower_are_scored_from_cached_embeddings():
    assert get_method("lvp").encodes_frozen() and get_method("zeroshot").encodes_frozen()
    for name in ("finetune", "zscl", "sg", "cvm"):
        assert not get_method(name).encodes_frozen()


def test_an_object_store_entry_round_trips_and_an_unmarked_one_is_a_miss(tmp_path, s3_bucket, tiny_checkpoint, drops):
    import boto3

    config = _config(tmp_path, tiny_checkpoint)
    backbone = load_backbone(config.model)
    task = load_task(str(drops[0]))
    store = ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "worker")
    (encoded,) = split_embeddings(context_for(config, backbone, embedding_cache=EmbeddingCache(store)), [task], "test")
    key = entry_key(entry_identity(backbone, task, "test", config.evaluation.batch_size, "pillow-draft2x"))
    elsewhere = EmbeddingCache(ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "orchestrator"))
    assert torch.equal(elsewhere.load(key), encoded)
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=f"art/{KIND}/{key}/result.json")
    assert EmbeddingCache(ArtifactStore(f"s3://{s3_bucket}/art", tmp_path / "third")).load(key) is None


def test_frozen_evaluation_from_embeddings_scores_what_images_score(setup, monkeypatch):
    from components.model.state import LearnerState
    from components.training import evaluation

    config, backbone, store, tasks = setup
    method = get_method("zeroshot")()
    state = LearnerState(method="zeroshot", backbone=backbone.reference)
    ctx = context_for(config, backbone, embedding_cache=EmbeddingCache(store))
    from_embeddings = evaluation.evaluate(method, state, tasks, ctx)
    owners, loader = evaluation._one_loader(tasks, "test", ctx)  # the path of methods that fine-tune the encoder
    tallies = [evaluation._Tally(task, state) for task in tasks]
    for owner, (images, labels) in zip(owners, loader):
        tallies[owner].add(method.scores(state, images, tallies[owner].keys, tallies[owner].names, ctx), labels)
    assert from_embeddings == {t.task.task_id: t.percent("test") for t in tallies}
    monkeypatch.setattr(evaluation, "GROUP_IMAGES", 1)  # one task's embeddings in memory at a time
    assert evaluation.evaluate(method, state, tasks, ctx) == from_embeddings


def test_writers_racing_on_one_key_leave_one_complete_entry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensor = torch.randn(2000, 64)
    for round_ in range(5):
        store = ArtifactStore(tmp_path / f"store{round_}", tmp_path / "cache")
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda cache: cache.save("k" * 32, tensor, {}), [EmbeddingCache(store) for _ in range(24)]))
        assert torch.equal(EmbeddingCache(store).load("k" * 32), tensor)
        assert [p.name for p in (Path(store.root) / KIND).iterdir()] == ["k" * 32]  # no staging folder left
