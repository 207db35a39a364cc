"""Where a data-parallel training's checkpoints live (components/training/train_storage.py), and the latest taken
back for a step that trains again with any number of workers: on folders laid out as Ray Train lays them out
(``<storage>/<name>/checkpoint_<time>/``), written here by hand."""

from __future__ import annotations

import json
from pathlib import Path

from components.settings.config_loading import load_config
from components.training.train_storage import adopt_latest, latest, place_of, remove


def _checkpoint(folder: Path, next_step: int | None, tensors: bytes = b"t") -> None:
    folder.mkdir(parents=True)
    if next_step is not None:
        (folder / "checkpoint.json").write_text(json.dumps({"next_step": next_step}))
        (folder / "checkpoint.safetensors").write_bytes(tensors)
    else:  # the learned state the first worker reports last: not a checkpoint to resume from
        (folder / "learned.json").write_text("{}")


def test_a_training_is_placed_by_the_steps_own_checkpoint_folder(tmp_path):
    config = load_config(env={}, cwd=tmp_path)
    steps = tmp_path / "checkpoints" / "key1"
    assert place_of(config, steps, "t-a").run == f"{(steps / 'ray-train').resolve()}/train-t-a"
    shared = load_config(overrides=[f"compute.train_storage={tmp_path / 'shared'}"], env={}, cwd=tmp_path)
    # One storage for every step: the run key keeps two steps of the same task apart.
    assert place_of(shared, steps, "t-a").run == f"{tmp_path / 'shared'}/key1-t-a"
    assert place_of(shared, tmp_path / "key2", "t-a").run != place_of(shared, steps, "t-a").run
    s3 = load_config(overrides=["compute.train_storage=s3://bucket/train"], env={}, cwd=tmp_path)
    assert place_of(s3, steps, "t-a").run == "bucket/train/key1-t-a"


def test_the_furthest_checkpoint_is_adopted_and_a_further_one_of_the_step_kept(tmp_path):
    config = load_config(env={}, cwd=tmp_path)
    steps = tmp_path / "checkpoints" / "key1"
    place = place_of(config, steps, "t-a")
    assert latest(place) is None and adopt_latest(place, steps / "t-a") == 0  # nothing yet: nothing copied
    run = Path(place.run)
    _checkpoint(run / "checkpoint_2026-12-06_10-00-00", 2, b"two")
    _checkpoint(run / "checkpoint_2026-12-06_10-00-09", 4, b"four")
    _checkpoint(run / "checkpoint_2026-12-06_10-00-30", None)  # the newest folder, but no checkpoint
    assert latest(place) == (str(run / "checkpoint_2026-12-06_10-00-09"), 4)
    assert adopt_latest(place, steps / "t-a") == 4
    assert (steps / "t-a" / "checkpoint.safetensors").read_bytes() == b"four"
    (steps / "t-a" / "checkpoint.json").write_text(json.dumps({"next_step": 6}))  # the step's own went further
    assert adopt_latest(place, steps / "t-a") == 6
    assert json.loads((steps / "t-a" / "checkpoint.json").read_text())["next_step"] == 6
    remove(place)
    assert not run.exists() and latest(place) is None
    remove(place)  # twice: nothing there, no error
