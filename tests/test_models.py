"""Backbones from local files and s3:// URIs (a real S3-compatible server on 127.0.0.1), loaded without
pickle; corrupt, mismatched and pickled checkpoints are refused with a clear error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub.constants  # at collection, before any fixture runs, as the other test modules import it
import pytest
import torch

from components.model.backbones import (
    CheckpointError,
    encode_batch,
    load_backbone,
    pick_precision,
    register_builtin_configs,
    save_weights,
)
from components.model.prompts import class_text_embeddings, get_templates, task_templates
from components.settings.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    import open_clip

    register_builtin_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("cliploop-tiny", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return path, save_weights(model, path), model.state_dict()


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "cliploop-tiny", "pretrained": None, "device": "cpu", **kw})


def _same_weights(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_local_safetensors_with_checksum(tiny_weights):
    path, sha, state = tiny_weights
    backbone = load_backbone(_cfg(checkpoint=str(path), sha256=sha))
    assert _same_weights(backbone.model, state)
    assert backbone.reference == {"name": "cliploop-tiny", "path": str(path.resolve()), "sha256": sha}
    assert backbone.device == "cpu" and backbone.autocast_dtype is None and backbone.embed_dim == 64
    images = torch.randn(3, 3, 32, 32)
    features = encode_batch(backbone, images)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_torch_file_is_read_with_weights_only(tiny_weights, tmp_path):
    path, _, state = tiny_weights
    pt = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)  # a DDP training checkpoint
    assert _same_weights(load_backbone(_cfg(checkpoint=str(pt))).model, state)


class Payload:
    """Any object that is not a tensor: unpickling it could run code."""


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"weights": Payload()}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(_cfg(checkpoint=str(bad)))


def test_corrupt_truncated_and_mismatched_checkpoints(tiny_weights, tmp_path):
    path, sha, state = tiny_weights
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_backbone(_cfg(checkpoint=str(truncated)))
    with pytest.raises(CheckpointError, match="sha256 is"):
        load_backbone(_cfg(checkpoint=str(truncated), sha256=sha))
    partial = dict(state)
    partial.pop("logit_scale")
    partial["visual.proj"] = torch.zeros(3, 3)
    odd = tmp_path / "odd.safetensors"
    save_weights(partial, odd)
    with pytest.raises(CheckpointError, match="does not fit this model: 1 missing .*logit_scale.*another shape"):
        load_backbone(_cfg(checkpoint=str(odd)))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(_cfg(checkpoint=str(tmp_path / "nothing.safetensors")))
    with pytest.raises(CheckpointError, match="unknown model"):
        load_backbone(_cfg(name="no-such-model"))


def test_an_unknown_pretrained_tag_is_a_clear_error():
    """The tag path is open_clip's own (it downloads when the network allows); a bad tag fails before any download."""
    with pytest.raises(CheckpointError, match="pretrained='no-such-tag'"):
        load_backbone(_cfg(pretrained="no-such-tag"))


def test_a_known_tag_missing_from_the_cache_fails_offline_in_one_clear_error(tmp_path, monkeypatch):
    """No test may download. The hub's client reads HF_HUB_OFFLINE once, at its first import, and collecting the
    test modules makes that import before any fixture runs: set only by a fixture, it was read as unset, and a test
    that loaded a pretrained tag (an ingest with no config scores labels with the default model) waited out the
    hub's retries, a minute or more each time. tests/conftest.py sets it at its own import."""
    assert huggingface_hub.constants.is_offline_mode()
    monkeypatch.setenv("CLIPLOOP_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="pretrained='openai'"):
        load_backbone(_cfg(name="ViT-B-32", pretrained="openai"))


def test_s3_uri_is_downloaded_verified_and_cached(tiny_weights, s3_bucket, tmp_path, monkeypatch):
    import boto3

    path, sha, state = tiny_weights
    client = boto3.client("s3")
    client.upload_file(str(path), s3_bucket, "models/tiny.safetensors")
    uri = f"s3://{s3_bucket}/models/tiny.safetensors"
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPLOOP_CACHE", str(cache))
    backbone = load_backbone(_cfg(checkpoint=uri, sha256=sha))
    assert _same_weights(backbone.model, state)
    assert backbone.reference == {"name": "cliploop-tiny", "uri": uri, "sha256": sha}
    assert (cache / "weights" / f"{sha}.safetensors").is_file()
    # Cached by content: a second load needs no server.
    client.delete_object(Bucket=s3_bucket, Key="models/tiny.safetensors")
    assert _same_weights(load_backbone(_cfg(checkpoint=uri, sha256=sha)).model, state)

    # A replaced object is caught by its checksum (on a machine whose cache does not hold the expected
    # content already); a sidecar <key>.sha256 is used when no checksum is configured.
    monkeypatch.setenv("CLIPLOOP_CACHE", str(tmp_path / "other-machine"))
    client.put_object(Bucket=s3_bucket, Key="models/other.safetensors", Body=path.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="expected"):
        load_backbone(_cfg(checkpoint=f"s3://{s3_bucket}/models/other.safetensors", sha256=sha))
    client.put_object(Bucket=s3_bucket, Key="models/other.safetensors.sha256", Body=sha.encode())
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        load_backbone(_cfg(checkpoint=f"s3://{s3_bucket}/models/other.safetensors"))
    with pytest.raises(CheckpointError, match="must be .safetensors"):
        load_backbone(_cfg(checkpoint=f"s3://{s3_bucket}/models/tiny.pt"))
    with pytest.raises(CheckpointError, match="cannot fetch"):
        load_backbone(_cfg(checkpoint=f"s3://{s3_bucket}/models/missing.safetensors"))


def test_precision_choice():
    assert pick_precision("auto", "cpu") == (None, torch.float32)
    assert pick_precision("auto", "cuda") == (torch.bfloat16, torch.float32)
    assert pick_precision("bf16", "cpu") == (torch.bfloat16, torch.float32)
    assert pick_precision("bf16-weights", "cuda") == (None, torch.bfloat16)
    with pytest.raises(CheckpointError, match="fp16 needs a CUDA"):
        pick_precision("fp16", "cpu")


def test_prompt_templates_and_text_embeddings(tiny_weights):
    path, sha, _ = tiny_weights
    assert [t("dog") for t in get_templates("lvp")] == ["a photo of a dog"]
    assert [t("dog") for t in get_templates("single")] == ["a photo of a dog."]
    assert len(get_templates("ensemble")) == 80
    assert [t("x") for t in get_templates("a sketch of a {}")] == ["a sketch of a x"]
    assert [t("x") for t in task_templates(["a {} texture.", "a photo of a {}."])] == [
        "a x texture.",
        "a photo of a x.",
    ]
    assert len(task_templates(None)) == 80  # a task without prompts: CLIP's ensemble
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_templates("nope")
    backbone = load_backbone(_cfg(checkpoint=str(path), sha256=sha))
    ensemble = class_text_embeddings(backbone, ["golden_retriever", "cat"], get_templates("ensemble"))
    assert ensemble.shape == (2, 64) and torch.allclose(ensemble.norm(dim=-1), torch.ones(2), atol=1e-5)
    # Underscores are cleaned, as MTIL does: the same text as the spaced name.
    assert torch.equal(
        class_text_embeddings(backbone, ["golden_retriever"], get_templates("lvp")),
        class_text_embeddings(backbone, ["golden retriever"], get_templates("lvp")),
    )


@pytest.mark.slow  # trains the demo's base model (once per run)
def test_demo_base_model_gives_zero_shot_accuracy_well_above_chance(tmp_path, demo_base_model):
    """The demo's base model: a tiny image tower warmed up against the real pretrained MiniLM text tower
    (shipped in a package) on a base split disjoint from the demo tasks. Built for real once per test run
    (``demo_base_model`` in tests/conftest.py); asked again, it is found by its recipe, not trained again."""
    from components.scenarios import demo
    from components.settings.config_loading import load_config
    from components.training.learn_sequence import learn

    checkpoint = demo_base_model
    built = checkpoint.stat().st_mtime_ns
    assert demo.build_base_model(checkpoint.parent, progress=None) == checkpoint  # cached by recipe
    assert checkpoint.stat().st_mtime_ns == built
    drops = demo.build_drop_zone(tmp_path / "drops", include_bad=False)
    cfg = load_config(
        overrides=[
            f"workspace={tmp_path / 'ws'}",
            "model.name=cliploop-minilm-tiny",
            "model.pretrained=null",
            f"model.checkpoint={checkpoint}",
            f"evaluation.templates={demo.BASE_PROMPT}",
        ],
        env={},
    )
    result = learn([str(drops[0])], cfg, "zeroshot", validate_first=False)
    assert result.matrix.initial[0] > 60.0  # five classes: chance is 20%
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert result.state.backbone["sha256"] == digest


@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "components" / "model_configs").glob("*.json")),
)
def test_every_builtin_config_builds_and_embeds_at_its_own_size(name):
    import open_clip

    register_builtin_configs()
    model = open_clip.create_model(name, pretrained=None).eval()
    side = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, side, side))
        text = model.encode_text(tokenizer(["a photo of a cat", "a photo of a dog"]))
    assert image.shape == text.shape == (2, open_clip.get_model_config(name)["embed_dim"])
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
