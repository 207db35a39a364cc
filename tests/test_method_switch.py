"""A chain keeps its method (``components/pipeline/chain_method.py``; docs/pipeline.md, "One chain, one method").

``cliploop nightly --set method.name=lwf`` on a chain learned with LVP used to ingest the drop zone, start training,
fail on the LVP learner state after about 90 s and exit 4 ("safe to re-run", which it is not) under a page of
tracebacks. Now it is refused at once, in one line, with exit 2, and nothing changes: no task ingested, no run,
no version. The registry is real (MLflow on a SQLite file); its champion is a zero-shot learner state registered
and approved by the pipeline's own calls, tagged as learned with LVP (no training: seconds).
"""

from __future__ import annotations

import shutil
import time

import pytest

from components.intake.workspace import ensure_workspace, open_ledger
from components.model.state import ClassEntry, LearnerState
from components.pipeline import chain_method, review
from components.registry.registry import from_config
from components.settings.config_loading import load_config
from flows.cli import main
from tests.conftest import _empty_mlflow_store
from tests.drops import make_task


@pytest.fixture(scope="module")
def lvp_chain(tmp_path_factory):
    """A workspace whose champion (version 1) was learned with LVP, and a new drop waiting in its drop zone. Beside
    it in the same registry, model ``waiting``: its version 1 (the same run) waits for review, with no champion."""
    root = tmp_path_factory.mktemp("switch")
    cfg = load_config(overrides=[f"workspace={root / 'ws'}", f"drop_zone={root / 'incoming'}"], env={}, cwd=root)
    ensure_workspace(cfg)
    shutil.copyfile(_empty_mlflow_store(), cfg.workspace_path / ".cliploop" / "mlflow.db")
    out = root / "runs" / "t-a"
    entries = [ClassEntry(i, f"toy/{c}", c, "toy", "t-a") for i, c in enumerate(["cat", "dog"])]
    state = LearnerState(method="zeroshot", backbone={"name": "cliploop-tiny"}, classes=entries)
    state.tasks = [{"task_id": "t-a"}]
    state.save(out / "state")
    cfg.write_resolved(out)
    tags = {"task_id": "t-a", "method": "lvp", "parent_version": ""}
    run_id = from_config(cfg).log_update(out, "t-a", {"cl.last": 90.0}, {"t-a": 90.0}, {}, tags)
    review.decide(cfg, from_config(cfg).register(run_id, "key-t-a", tags | {"review": "pending"}), "approve", "rita")
    waiting = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"registered_model": "waiting"})})
    from_config(waiting).register(run_id, "key-t-a", tags | {"review": "pending"})
    make_task(root / "incoming", "t-b", ["emu", "owl"], train=2, test=1)
    return cfg, waiting


def _with_method(cfg, name: str):
    return cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": name})})


def _unchanged(cfg) -> None:
    """Nothing of the chain moved: no task in the ledger, no new version or run, no stored task data."""
    registry = from_config(cfg)
    with open_ledger(cfg) as ledger:
        assert [r.task_id for r in ledger.all()] == []
    assert [int(v.version) for v in registry.versions()] == [1] and registry.alias("champion") == 1
    assert len(registry.client.search_runs([registry.experiment_id()])) == 1
    assert not (cfg.workspace_path / "data" / "tasks" / "t-b").exists()


def test_nightly_with_another_method_is_refused_at_once_in_one_line(lvp_chain, capsys):
    cfg, _ = lvp_chain
    started = time.monotonic()
    code = main(
        ["nightly", "-w", str(cfg.workspace_path), "--set", f"drop_zone={cfg.drop_zone}", "--set", "method.name=lwf"]
    )
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err  # a configuration error: not 4, "storage failed, safe to re-run"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("cliploop nightly: method.name is 'lwf'")
    assert "version 1 of 'cliploop'" in lines[0] and "learned with 'lvp'" in lines[0]
    assert "new workspace" in lines[0] and "cliploop init NEW" in lines[0] and "One chain, one method" in lines[0]
    assert elapsed < 30, elapsed  # no Prefect, no ingestion, no training (it took about 90 s before)
    _unchanged(cfg)


def test_the_chains_own_method_and_a_chain_not_started_pass(lvp_chain, tmp_path):
    cfg, _ = lvp_chain
    chain_method.check(_with_method(cfg, "lvp"))
    assert chain_method.chain_method(cfg) == ("champion", 1, "lvp")
    fresh = load_config(overrides=[f"workspace={tmp_path / 'fresh'}", "method.name=lwf"], env={}, cwd=tmp_path)
    chain_method.check(fresh)  # no registry yet: no chain to keep, and none is made by looking
    assert not (tmp_path / "fresh").exists()


def test_a_waiting_challenger_of_another_method_holds_a_chain_with_no_champion(lvp_chain):
    """Model ``waiting`` has no champion, but approving its version 1 would make LVP the chain's method."""
    _, waiting = lvp_chain
    assert from_config(waiting).alias("champion") is None
    with pytest.raises(chain_method.MethodSwitch, match=r"this chain's challenger \(version 1 of 'waiting'\) .* 'lvp'"):
        chain_method.check(_with_method(waiting, "lwf"))
    chain_method.check(_with_method(waiting, "lvp"))


def test_a_deployed_night_with_another_method_is_refused_before_it_starts(lvp_chain):
    """The scheduled ``nightly`` deployment (its config edited, or its ``method`` parameter set) refuses the same
    way, before anything changes. ``nightly.fn`` is the flow's own function without a Prefect run: the refusal
    comes before the night needs one."""
    from flows.nightly import nightly

    cfg, _ = lvp_chain
    with pytest.raises(chain_method.MethodSwitch, match="method.name is 'lwf' but this chain's champion"):
        nightly.fn(config=_with_method(cfg, "lwf").portable())
    with pytest.raises(chain_method.MethodSwitch, match="method.name is 'finetune' but"):
        nightly.fn(config=cfg.portable(), method="finetune")
    _unchanged(cfg)
