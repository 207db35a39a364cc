"""The model plane end to end on tiny models: order invariance, pools built in another process,
the learner-state bundle, and `cliploop learn` without any platform service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.intake import ingestion
from components.methods import available_methods, get_method
from components.model.data import load_task
from components.model.merged_pool import merge
from components.model.state import LearnerState, StateError
from components.settings.config_loading import load_config
from components.training.learn import context_for
from components.training.learn_sequence import learn
from flows.cli import main
from tests.cl_reference import expected_metrics
from tests.conftest import tiny_overrides
from tests.drops import make_task

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, ckpt, *extra):
    return load_config(overrides=[f"workspace={tmp_path / 'ws'}", *tiny_overrides(ckpt, *extra)], env={}, cwd=tmp_path)


def test_registry_lists_methods():
    methods = available_methods()
    assert {"lvp", "zeroshot"} <= set(methods) and all(methods.values())
    with pytest.raises(Exception, match="unknown method"):
        get_method("no-such-method")


def test_merged_pools_and_predictions_do_not_depend_on_task_order(tmp_path, tiny_checkpoint, drops):
    """Same tasks, different orders (including a domain-incremental one adding to known classes):
    bit-identical merged mean pools and identical predictions."""
    cfg = _cfg(tmp_path, tiny_checkpoint)
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        result = learn([str(drops[i]) for i in order], cfg, "lvp", validate_first=False)
        results.append(result)
    merged = [merge(list(r.state.pools.values()), get_method("lvp")().settings) for r in results]
    keys = merged[0].class_keys
    assert all(m.class_keys == keys for m in merged)
    probe = torch.nn.functional.normalize(
        torch.randn(32, results[0].state.pools["t-a"].dim, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    first = merged[0].scores(probe)
    for other in merged[1:]:
        assert torch.equal(other.scores(probe), first)
    # Final accuracy of each task is the same whichever order it was learned in.
    finals = [dict(zip(r.matrix.tasks, r.matrix.matrix[-1])) for r in results]
    assert all(f == finals[0] for f in finals)


@pytest.mark.slow  # two ingestions and two learn runs
def test_order_invariance_through_real_ingestion(tmp_path, tiny_checkpoint, drops):
    """Two workspaces ingest the class-incremental tasks in opposite orders; their stored tasks give
    bit-identical pools."""
    pools = []
    for name, order in (("w1", [0, 1]), ("w2", [1, 0])):
        cfg = load_config(
            overrides=[f"workspace={tmp_path / name}", *tiny_overrides(tiny_checkpoint)], env={}, cwd=tmp_path
        )
        for i in order:
            assert ingestion.ingest(str(drops[i]), cfg).status == "accepted"
        stored = [str(tmp_path / name / "data" / "tasks" / t) for t in ("t-a", "t-b")]
        result = learn([stored[i] for i in order], cfg, "lvp")
        pools.append(merge(list(result.state.pools.values()), get_method("lvp")().settings))
    a, b = pools
    assert a.class_keys == b.class_keys
    probe = torch.nn.functional.normalize(torch.randn(16, a.dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    assert torch.equal(a.scores(probe), b.scores(probe))


@pytest.mark.slow  # a pool built in a child process
def test_pool_built_in_another_process_equals_inline(tmp_path, tiny_checkpoint, drops):
    from components.methods.lvp import build_pool
    from components.model.backbones import load_backbone

    cfg = _cfg(tmp_path, tiny_checkpoint)
    ctx = context_for(cfg, load_backbone(cfg.model))
    inline, stats = build_pool(load_task(str(drops[0])), ctx, get_method("lvp")().settings)
    assert stats.images == 8 and stats.seconds > 0
    inline_files = inline.save(tmp_path / "inline")

    args = [sys.executable, "-m", "components.pipeline.stored_pool", str(drops[0]), "--out", str(tmp_path / "sub")]
    for item in tiny_overrides(tiny_checkpoint):
        args += ["--set", item]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files"] == inline_files
    assert (tmp_path / "sub" / "t-a.safetensors").read_bytes() == (tmp_path / "inline" / "t-a.safetensors").read_bytes()


def test_learner_state_round_trip_and_integrity(tmp_path, tiny_checkpoint, drops):
    cfg = _cfg(tmp_path, tiny_checkpoint)
    result = learn([str(d) for d in drops[:2]], cfg, "lvp", validate_first=False)
    folder = tmp_path / "state"
    manifest = result.state.save(folder)
    assert manifest["format"] == 1 and manifest["method"] == "lvp"
    assert {"pools/t-a.safetensors", "pools/t-b.safetensors", "history.json"} <= set(manifest["files"])
    loaded = LearnerState.load(folder, expect_backbone=result.state.backbone)
    assert [c.key for c in loaded.classes] == [c.key for c in result.state.classes]
    assert torch.equal(loaded.pools["t-a"].sums, result.state.pools["t-a"].sums)
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pt"))

    with pytest.raises(StateError, match="not for"):
        LearnerState.load(folder, expect_backbone={"name": "ViT-B-16", "sha256": "0" * 64})
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    blob = tampered / "pools" / "t-b.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(StateError, match="sha256"):
        LearnerState.load(tampered)
    manifest_path = tampered / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(StateError, match="format"):
        LearnerState.load(tampered)


@pytest.mark.slow  # a learn run, then a fresh process
def test_cli_learn_writes_matrix_metrics_plots_and_a_state_a_fresh_process_can_use(
    tmp_path, tiny_checkpoint, drops, capsys
):
    out = tmp_path / "run"
    held_out = make_task(tmp_path, "held-out", ["yak", "ant", "bee"], dataset="other", train=1, test=3)
    argv = ["learn", "--method", "lvp", str(drops[0]), str(drops[1]), "--out", str(out), "--json"]
    for item in tiny_overrides(tiny_checkpoint, f"evaluation.zero_shot_set={held_out}"):
        argv += ["--set", item]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    matrix = payload["accuracy_matrix"]
    assert matrix["tasks"] == ["t-a", "t-b"] and len(matrix["matrix"]) == 2 and len(matrix["initial"]) == 2
    assert set(payload["metrics"]) >= {"cl.avg_incremental", "cl.last", "cl.forgetting", "cl.bwt", "mtil.transfer"}
    # The held-out set is scored before and after every step (never trained on): zero-shot retention.
    zero_shot = matrix["zero_shot"]
    assert zero_shot["name"] == "held-out" and len(zero_shot["after"]) == 2
    assert payload["metrics"]["zs.retention_abs"] == pytest.approx(
        zero_shot["after"][-1] - zero_shot["initial"], abs=1e-5
    )
    assert payload["metrics"]["zs.retention_abs"] == 0.0  # LVP freezes CLIP: an unseen dataset scores as before
    for rel in (
        "eval/accuracy_matrix.json",
        "eval/heatmap.png",
        "eval/curves.png",
        "config.resolved.yaml",
        "state/manifest.json",
    ):
        assert (out / rel).is_file(), rel
    # The run's metrics and those `cliploop metrics` recomputes from the saved matrix file (an auditor's check) are
    # the definitions of docs/metrics.md applied to that file.
    saved = json.loads((out / "eval" / "accuracy_matrix.json").read_text())
    assert saved == matrix
    expected = expected_metrics(saved)
    assert expected["cl.forgetting"] is not None and expected["zs.retention_rel"] is not None  # all of them checked
    assert payload["metrics"] == pytest.approx(expected, abs=1e-6)
    assert main(["metrics", str(out / "eval" / "accuracy_matrix.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(expected, abs=1e-6)

    # A fresh process loads the bundle and predicts the same labels as the run that made it.
    script = f"""
import json, sys, torch
from components.settings.config_loading import load_config
from components.model.data import load_task
from components.training.evaluation import accuracy
from components.training.learn import context_for, make_method
from components.model.backbones import load_backbone
from components.model.state import LearnerState
cfg = load_config(overrides={tiny_overrides(tiny_checkpoint)!r}, env={{}})
state = LearnerState.load({str(out / "state")!r})
ctx = context_for(cfg, load_backbone(cfg.model))
method = make_method(cfg, state.method)
print(json.dumps([accuracy(method, state, load_task(p), ctx) for p in {[str(drops[0]), str(drops[1])]!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx(matrix["matrix"][-1])


def test_learn_refuses_an_invalid_drop(tmp_path, tiny_checkpoint, drops):
    from components.training.learn import LearnError
    from tests.drops import append_rows

    bad = make_task(tmp_path, "t-bad", ["yak"])
    append_rows(bad, [["img/none.png", "yak", "train"]])
    with pytest.raises(LearnError, match="not in the drop"):
        learn([str(drops[0]), str(bad)], _cfg(tmp_path, tiny_checkpoint), "lvp")
