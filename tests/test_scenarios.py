"""Benchmark scenarios as data, and their conversion into valid task drops (offline: torchvision's FakeData)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.scenarios.catalog import COMPLETE, ScenarioError, convert, list_scenarios, load_scenario
from components.settings.config_loading import load_config
from components.training.learn_sequence import validate_sequence
from flows.cli import main

ORDER_I = [
    "aircraft",
    "caltech101",
    "cifar100",
    "dtd",
    "eurosat",
    "flowers",
    "food",
    "mnist",
    "oxfordpet",
    "stanfordcars",
    "sun397",
]
ORDER_II = [
    "stanfordcars",
    "food",
    "mnist",
    "oxfordpet",
    "flowers",
    "sun397",
    "aircraft",
    "caltech101",
    "dtd",
    "eurosat",
    "cifar100",
]


def test_shipped_scenarios_load_and_follow_the_published_protocols():
    assert set(list_scenarios()) == {"cifar100-10steps", "mtil-order1", "mtil-order2", "domainnet-6domains"}
    assert [t.dataset for t in load_scenario("mtil-order1").tasks] == ORDER_I
    assert [t.dataset for t in load_scenario("mtil-order2").tasks] == ORDER_II
    random_split = {t.dataset for t in load_scenario("mtil-order1").tasks if t.split.kind == "random"}
    assert random_split == {"caltech101", "eurosat", "sun397"}
    assert all(t.split.seed == 42 for t in load_scenario("mtil-order1").tasks if t.split.kind == "random")

    cifar = load_scenario("cifar100-10steps")
    steps = [t.classes for t in cifar.tasks]
    assert len(steps) == 10 and all(len(s) == 10 for s in steps)
    np.random.seed(1993)  # the class order of iCaRL / PyCIL, stored in the file, checked here
    assert sum(steps, []) == np.random.permutation(100).tolist()
    assert len(cifar.class_names) == 100 and cifar.class_names[:3] == ["apple", "aquarium_fish", "baby"]

    domainnet = load_scenario("domainnet-6domains")
    assert [t.domain for t in domainnet.tasks] == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    assert [t.scenario for t in domainnet.tasks][:2] == ["class-incremental", "domain-incremental"]


def _fake_scenario(tmp_path, split):
    source = {
        "kind": "torchvision",
        "class": "FakeData",
        "kwargs": {"size": 60, "image_size": [3, 16, 16], "num_classes": 4},
    }
    if split == "official":
        source |= {"train": {"random_offset": 0}, "test": {"random_offset": 1000}}
    doc = {
        "name": "fake",
        "description": "two tiny tasks",
        "source": "torchvision FakeData",
        "tasks": [
            {
                "task_id": "fake-a",
                "dataset": "fake",
                "scenario": "class-incremental",
                "source": source,
                "split": {"kind": split},
                "classes": [0, 1],
                "prompts": ["a photo of class {}."],
            },
            {
                "task_id": "fake-b",
                "dataset": "fake",
                "scenario": "class-incremental",
                "source": source,
                "split": {"kind": split},
                "classes": [2, 3],
            },
        ],
    }
    path = tmp_path / f"fake-{split}.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("split", ["official", "random"])
def test_convert_writes_valid_drops_and_is_idempotent(tmp_path, split):
    scenario = load_scenario(_fake_scenario(tmp_path, split))
    out = tmp_path / "drops"
    folders = convert(scenario, out, tmp_path / "root", limit_per_class=5, say=lambda m: None)
    assert [f.name for f in folders] == ["fake-a", "fake-b"]
    validate_sequence([str(f) for f in folders], load_config(env={}))  # raises on any invalid drop
    import yaml

    spec = yaml.safe_load((folders[0] / "task.yaml").read_text())
    assert spec["classes"] == ["0", "1"] and spec["prompts"] == ["a photo of class {}."]
    rows = (folders[0] / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,label,split" and {r.split(",")[2] for r in rows[1:]} == {"train", "test"}
    assert max(sum(1 for r in rows[1:] if r.endswith(f",{c},train")) for c in "01") <= 5

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    convert(scenario, out, tmp_path / "root", limit_per_class=5, say=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert (folders[0] / COMPLETE).is_file()

    if split == "random":  # a seeded split: converting again elsewhere gives the same files
        again = convert(scenario, tmp_path / "again", tmp_path / "root", limit_per_class=5, say=lambda m: None)
        assert (again[0] / "manifest.csv").read_text() == (folders[0] / "manifest.csv").read_text()


def test_bad_scenarios_and_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "name": "x",
                "description": "d",
                "source": "s",
                "tasks": [
                    {
                        "task_id": "a",
                        "dataset": "d",
                        "scenario": "class-incremental",
                        "split": {"kind": "official"},
                        "source": {"kind": "torchvision", "class": "MNIST", "train": {}},
                    }
                ],
            }
        )
    )
    with pytest.raises(ScenarioError, match="official split needs the test part"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="no scenario 'nope'"):
        load_scenario("nope")
    assert main(["scenario", "list"]) == 0
    assert "mtil-order1" in capsys.readouterr().out
    assert main(["scenario", "show", "nope"]) == 2
    assert (
        main(
            [
                "scenario",
                "convert",
                "mtil-order1",
                "--root",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--tasks",
                "mtili-08-mnist",
            ]
        )
        == 2
    )  # MNIST is not there and download was not asked for
    assert "MNIST" in capsys.readouterr().err
    # The glyph proving ground's writer refuses a domain pretraining saw, in one line, before writing anything.
    assert main(["scenario", "glyphs", "--out", str(tmp_path / "g"), "--domains", "dotted,filled"]) == 2
    assert "not a domain pretraining never saw" in capsys.readouterr().err and not (tmp_path / "g").exists()
