"""Config precedence and errors, and shard round trips (the ledger's transitions: tests/test_ledger.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.intake.shards import ShardReader, ShardWriter
from components.settings.config import ConfigError
from components.settings.config_file import default_config_yaml
from components.settings.config_loading import load_config
from components.support.storage import sha256_bytes


def test_precedence_defaults_file_env_flags(tmp_path):
    (tmp_path / "cliploop.yaml").write_text("validation:\n  max_pixels: 100\n  min_side: 4\nshards: {target_mb: 7}\n")
    env = {"CLIPLOOP__VALIDATION__MAX_PIXELS": "200", "CLIPLOOP__DVC__PUSH": "false"}
    cfg = load_config(env=env, cwd=tmp_path, overrides=["validation.max_pixels=300"])
    assert cfg.validation.max_pixels == 300  # flag beats env beats file
    assert cfg.validation.min_side == 4  # file beats default
    assert cfg.dvc.push is False  # env parsed as YAML scalar
    assert cfg.shards.target_mb == 7
    assert cfg.validation.max_image_bytes == 32 * 1024 * 1024  # default
    assert cfg.workspace_path == tmp_path.resolve()  # relative to the config file


@pytest.mark.parametrize(
    "text, key",
    [
        ("validation:\n  max_pixel: 5\n", "validation.max_pixel: unknown key"),
        ("validation:\n  max_pixels: -1\n", "validation.max_pixels"),
        ("validation:\n  formats: [JPEG, GIF]\n", "validation.formats.1"),
        ("shards: 3\n", "shards"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    (tmp_path / "cliploop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(env={}, cwd=tmp_path)


def test_bad_env_and_flag_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"validation\.min_side"):
        load_config(env={"CLIPLOOP__VALIDATION__MIN_SIDE": "many"}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(env={}, cwd=tmp_path, overrides=["novalue"])


def test_default_file_round_trips_and_resolved_config_is_written(tmp_path):
    (tmp_path / "cliploop.yaml").write_text(default_config_yaml())
    cfg = load_config(env={}, cwd=tmp_path)
    assert cfg == load_config(env={}, cwd=tmp_path / "..", path=tmp_path / "cliploop.yaml")
    written = cfg.write_resolved(tmp_path / "out")
    assert yaml.safe_load(written.read_text())["validation"]["max_pixels"] == cfg.validation.max_pixels
    assert len(cfg.sha256()) == 64


def test_shards_round_trip_dedupe_and_are_byte_identical(tmp_path):
    blobs = [bytes([i]) * (1000 + i) for i in range(20)]
    outs = []
    for name in ("a", "b"):
        writer = ShardWriter(tmp_path / name, target_bytes=5000)
        for blob in blobs + blobs[:3]:  # duplicates are stored once
            writer.add(sha256_bytes(blob), ".bin", blob)
        outs.append(writer.close())
    located = outs[0]
    assert len(located) == 20 and len({loc.shard for loc in located.values()}) > 1
    with ShardReader(tmp_path / "a") as reader:
        for blob in blobs:
            assert reader.read(located[sha256_bytes(blob) + ".bin"], sha256_bytes(blob)) == blob
    for shard in sorted(Path(tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_corrupt_shard_is_detected_on_read(tmp_path):
    writer = ShardWriter(tmp_path, target_bytes=1 << 20)
    blob = b"x" * 600
    writer.add(sha256_bytes(blob), ".bin", blob)
    where = writer.close()[sha256_bytes(blob) + ".bin"]
    path = tmp_path / where.shard
    data = bytearray(path.read_bytes())
    data[where.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with ShardReader(tmp_path) as reader, pytest.raises(IOError, match="corrupt"):
        reader.read(where, sha256_bytes(blob))
