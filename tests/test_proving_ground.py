"""The glyph proving ground: its drops are deterministic, disjoint and valid, its base model is cached by
recipe and loads like any checkpoint, and the benchmark prints its JSON (a micro run, marked slow)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from components.scenarios import glyph_bench, glyph_model, glyphs
from components.scenarios.glyph_bench import GlyphBench

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "pretrain_classes": 12,
    "pretrain_per_class": 2,
    "reference_per_class": 1,
    "tasks": 3,
    "task_classes": 3,
    "train_per_class": 2,
    "test_per_class": 2,
    "heldout_classes": 3,
    "heldout_per_class": 2,
}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_the_drops_are_the_same_bytes_from_a_seed_and_others_from_another(tmp_path):
    say = lambda message: None  # noqa: E731
    glyph_bench.write_bench(GlyphBench(seed=3, **TINY), tmp_path / "a", say=say)
    glyph_bench.write_bench(GlyphBench(seed=3, **TINY), tmp_path / "b", say=say)
    glyph_bench.write_bench(GlyphBench(seed=4, **TINY), tmp_path / "c", say=say)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    tasks = json.loads((tmp_path / "a" / "bench.json").read_text())["tasks"]
    assert _digest(tmp_path / "a" / tasks[0]) != _digest(tmp_path / "c" / tasks[0])


def test_look_alikes_are_one_class_named_after_the_first():
    kept = {g.char for g in glyphs.candidates()}
    # Latin A, Greek Alpha and Cyrillic A draw the same picture: only Latin A (the lowest code point) stays.
    assert "A" in kept and "\u0391" not in kept and "\u0410" not in kept
    assert "\u03b1" in kept  # Greek small alpha has a shape of its own
    keys = [glyphs._shape_key(g.char, g.fonts[0]) for g in glyphs.candidates()]
    assert len(set(keys)) == len(keys) and None not in keys
    assert all(g.name == unicodedata.name(g.char).lower() for g in glyphs.candidates()[:50])


def test_sequence_and_held_out_classes_are_never_pretrained_on_and_one_base_serves_every_seed():
    a, b = (glyph_bench.plan(GlyphBench(seed=s, **TINY)) for s in (1, 2))
    for p in (a, b):
        cil = [t for t in p.tasks if t.scenario == "class-incremental"]
        assert not set(p.pretrain) & p.task_classes() and not set(p.heldout) & (set(p.pretrain) | p.task_classes())
        assert sum(len(t.classes) for t in cil) == len({c for t in cil for c in t.classes})  # tasks disjoint
        assert set(p.tasks[-1].classes) == p.task_classes()  # the domain-incremental task keeps the label space
        assert not {t.domain for t in p.tasks} & set(glyphs.PRETRAIN_DOMAINS)
    assert a.pretrain == b.pretrain and a.tasks != b.tasks
    with pytest.raises(ValueError, match="packaged fonts give"):
        glyph_bench.plan(GlyphBench(pretrain_classes=len(glyphs.candidates())))


def test_the_sequence_takes_only_the_chosen_new_domains_and_refuses_others():
    assert "pixelated" not in GlyphBench().domains  # erases the glyph at 32 pixels: left out by default
    chosen = ("dotted", "inverted")
    p = glyph_bench.plan(GlyphBench(seed=5, domains=chosen, **TINY))
    assert {t.domain for t in p.tasks} <= set(chosen)
    for wrong in (("filled", "dotted"), ("dotted", "sepia")):  # a pretraining domain; not a domain at all
        with pytest.raises(ValueError, match="not a domain pretraining never saw"):
            GlyphBench(domains=wrong)


def test_the_drops_pass_cliploops_own_validation_in_order(tmp_path):
    from components.intake.drop_check import validate_location
    from components.model.data import load_task
    from components.settings.config_loading import load_config
    from components.training.learn_sequence import validate_sequence

    bench = GlyphBench(seed=0, **{**TINY, "tasks": 2})
    layout = glyph_bench.write_bench(bench, tmp_path / "drops", say=lambda m: None)
    config = load_config(overrides=[f"workspace={tmp_path / 'ws'}"], env={}, cwd=tmp_path)
    validate_sequence([str(tmp_path / "drops" / t) for t in layout["tasks"]], config)  # raises when refused
    assert validate_location(str(tmp_path / "drops" / layout["heldout"]), config).success
    # The held-out set is a dataset of its own: scored among its own classes before and after every task.
    datasets = {load_task(tmp_path / "drops" / d).dataset for d in layout["tasks"]}
    assert load_task(tmp_path / "drops" / layout["heldout"]).dataset not in datasets


def test_the_cut_vocabulary_tokenises_like_clips_and_the_base_model_is_cached_by_recipe(tmp_path):
    import open_clip

    from components.model.backbones import load_backbone, register_builtin_configs
    from components.settings.config import ModelConfig

    register_builtin_configs()
    cut, full = open_clip.get_tokenizer(glyph_model.MODEL), open_clip.get_tokenizer("ViT-B-32")
    config = json.loads((glyph_model.CONFIG_DIR / f"{glyph_model.MODEL}.json").read_text())
    assert config["text_cfg"]["vocab_size"] == cut.vocab_size < 4000
    texts = [g.name for g in glyphs.candidates()[::97]] + ["a red glyph of upwards double arrow"]
    decode = lambda tok, text: [tok.decoder[i] for i in tok.encode(text)]  # noqa: E731
    assert all(decode(cut, t) == decode(full, t) for t in texts)

    bench = GlyphBench(**TINY)
    key = glyph_model.recipe_key
    assert key(glyph_model.recipe(bench)) == key(glyph_model.recipe(bench.model_copy(update={"seed": 9})))
    assert key(glyph_model.recipe(bench)) != key(glyph_model.recipe(bench, steps=7))
    assert key(glyph_model.recipe(bench)) != key(glyph_model.recipe(bench.model_copy(update={"pretrain_seed": 1})))
    path = glyph_model.build_base_model(bench, tmp_path, progress=lambda m: None, steps=3, warmup=1)
    assert path.name == f"glyph-base-{key(glyph_model.recipe(bench, steps=3, warmup=1))}.safetensors"
    mtime = path.stat().st_mtime_ns
    assert glyph_model.build_base_model(bench, tmp_path, progress=None, steps=3, warmup=1) == path
    assert path.stat().st_mtime_ns == mtime  # found in the cache, not rebuilt
    overrides = dict(o.split("=", 1) for o in glyph_model.model_overrides(path))
    backbone = load_backbone(
        ModelConfig(name=overrides["model.name"], checkpoint=str(path), sha256=overrides["model.sha256"], device="cpu")
    )
    assert backbone.reference["sha256"] == overrides["model.sha256"] and backbone.embed_dim == 128


def test_a_setting_a_method_cannot_take_is_refused_in_one_line_before_anything_is_built(tmp_path, capsys):
    """The script's own ``main`` (in this process: the refusal comes before anything that a fresh process would
    change is loaded)."""
    from benchmarks.proving_ground import main

    cases = {
        ("--methods", "nope"): "unknown method 'nope'",
        ("--methods", "finetune", "--set", "method.settings.alpha=0.5"): "method.settings.alpha: unknown key",
        ("--methods", "cvm", "--set", "method.settings.prompt=bad"): "needs a {} where the class name goes",
    }
    for args, message in cases.items():
        capsys.readouterr()
        code = main(["--work", str(tmp_path / "w"), *args])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0] and not out, err[-1000:]
        assert not (tmp_path / "w").exists()  # no drops written, no base model pretrained


@pytest.mark.slow  # about 100 s on 2 shared cores: every method learns two tiny tasks
def test_the_benchmark_prints_every_methods_figures(tmp_path):
    from components.methods import available_methods

    sizes = {**TINY, "tasks": 2, "pretrain_classes": 30, "pretrain_per_class": 3}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "proving_ground.py"), "--seed", "1", "--iterations", "3"]
        + ["--base-steps", "5", "--work", str(tmp_path), "--bench", json.dumps(sizes)]
        + ["--set", "evaluation.batch_size=64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["methods"]) == set(available_methods())
    keys = {"matrix", "forgetting", "forgetting_fixed", "new_task", "transfer", "avg", "last"}
    for figures in report["methods"].values():
        assert keys | {"zero_shot_retention", "seconds"} <= set(figures)
        assert len(figures["matrix"]) == 2 and figures["forgetting"] is not None
    assert report["methods"]["zeroshot"]["zero_shot_retention"] == 0
    assert report["overrides"] == ["evaluation.batch_size=64"] and report["jobs"] >= 1
    towers = report["methods"]["finetune"]["held_out_by_tower"]
    assert set(towers) == {"learned", "image_learned", "text_learned"}
    assert all(0 <= v <= 100 for v in towers.values()) and report["methods"]["zeroshot"]["held_out_by_tower"] is None
    assert {"all", "3_way", "3_way_chance"} <= set(report["zero_shot_heldout"])
