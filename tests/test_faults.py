"""The fault suite (``pytest -m faults``): each test injects one fault for real and checks what must hold.

Faults are real: a second process racing on the registry (its timing widened with ``CLIPLOOP_FAULT``, see
``components/support/faults.py`` and ``tests/README.md``), a tracking server that refuses connections or answers 503,
a bit flipped in a stored shard on disk. Nothing of cliploop, MLflow or the ledger is mocked. The pipeline's
steps are called directly (as the flows call them) where Prefect adds nothing to what is checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.intake.ledger import Ledger
from components.pipeline import chain, review, steps
from components.registry.registry import from_config
from flows import retry
from tests.conftest import REPO
from tests.fault_kit import (
    CHECKPOINTED_FINETUNE,
    cli_args,
    env_with_prefect_api,
    fault_cfg,
    learn,
    states,
    steps_in_child,
)
from tests.fault_steps import learn_steps

pytestmark = pytest.mark.faults


# ---- defect 1: a reviewer's reject overridden by a concurrent approve ---------------------------------------


def test_a_reject_while_an_approve_waits_wins_and_the_approve_says_it_lost(tmp_path, tiny_checkpoint, ingested):
    """An approver is delayed between reading the version's review and taking the registry lock; a reject lands
    in that window. The approve must fail (non-zero, "lost a race"), never promote the rejected version."""
    cfg = fault_cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = learn(cfg)
    review.review_requested(cfg, version)
    mark = tmp_path / "approver-read-the-state"
    env = os.environ | {"CLIPLOOP_FAULT": f"after_decision_read:mark={mark},after_decision_read:sleep=4"}
    approver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "approve",
            str(version),
            "--reviewer",
            "rita",
            *cli_args(cfg, tiny_checkpoint),
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not mark.exists() and approver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert mark.exists(), approver.communicate()[0]

    assert review.decide(cfg, version, "reject", "sam", "forgets cats")["changed"] is True
    out, _ = approver.communicate(timeout=120)

    assert approver.returncode != 0 and "lost a race" in out, out
    registry = from_config(cfg)
    assert registry.alias("champion") is None and registry.alias("challenger") is None
    tags = registry.version_tags(version)
    assert tags["review"] == "rejected" and tags["reviewer"] == "sam"
    assert states(cfg) == {"t-a": "rejected"}
    # And a later approve of the rejected version is refused, naming the way back (requeue).
    with pytest.raises(chain.PipelineError, match="requeue t-a"):
        review.decide(cfg, version, "approve", "rita")


def test_a_timeout_never_overwrites_a_decision_made_a_moment_before(tmp_path, tiny_checkpoint, ingested):
    cfg = fault_cfg(tmp_path, tiny_checkpoint, start=ingested)
    version = learn(cfg)
    review.review_requested(cfg, version)
    review.decide(cfg, version, "approve", "rita")
    assert review.review_timed_out(cfg, version) is False
    review.review_requested(cfg, version)  # a resumed wait on a later night
    assert from_config(cfg).version_tags(version)["review"] == "approved"


# ---- defect 4: a crash between "version registered" and "alias set" -----------------------------------------


def test_a_kill_between_register_and_alias_is_resumed_by_the_rerun(tmp_path, tiny_checkpoint, ingested, prefect_api):
    from flows.cli import main

    cfg = fault_cfg(tmp_path, tiny_checkpoint, start=ingested)
    child = steps_in_child(cfg, "t-a", "after_register:kill")
    assert child.returncode == -9, child.stderr[-2000:]
    registry = from_config(cfg)
    versions = registry.client.search_model_versions("name = 'cliploop'")
    assert [int(v.version) for v in versions] == [1] and registry.alias("challenger") is None  # the fault's state

    version, update = learn_steps(cfg, "t-a")  # the rerun
    assert version == 1 and len(registry.client.search_model_versions("name = 'cliploop'")) == 1
    assert registry.alias("challenger") == 1 and states(cfg) == {"t-a": "learned"}
    assert review.apply_gate(cfg, version, update)["verdict"] == "pass"
    assert main(["lineage", "challenger", *cli_args(cfg, tiny_checkpoint)]) == 0
    assert main(["approve", "challenger", "--reviewer", "rita", *cli_args(cfg, tiny_checkpoint)]) == 0
    assert registry.alias("champion") == 1 and states(cfg) == {"t-a": "promoted"}
    artifacts = {a.path for a in registry.client.list_artifacts(registry.model_version(1).run_id)}
    assert "lineage.json" in artifacts


# ---- kill -9 of a training step after a checkpoint --------------------------------------------------------


def test_a_kill_after_a_training_checkpoint_resumes_there_and_registers_one_version(
    tmp_path, tiny_checkpoint, ingested
):
    import json

    cfg = fault_cfg(tmp_path, tiny_checkpoint, *CHECKPOINTED_FINETUNE, start=ingested)
    assert steps_in_child(cfg, "t-a", "after_checkpoint:kill").returncode == -9
    assert list((cfg.workspace_path / ".cliploop" / "checkpoints").rglob("checkpoint.json"))

    version, update = learn_steps(cfg, "t-a")
    training = json.loads((Path(update["out_dir"]) / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    registry = from_config(cfg)
    assert version == 1 and [int(v.version) for v in registry.versions()] == [1]


# ---- kill -9 / SIGTERM during the MLflow artifact upload --------------------------------------------------


def _runs(registry) -> list[tuple[str, str]]:
    return sorted(
        (r.info.status, r.data.tags.get("cliploop.abandoned", ""))
        for r in registry.client.search_runs([registry.experiment_id()])
    )


@pytest.mark.parametrize("signal_name", ["kill", "term"])
def test_a_kill_during_the_mlflow_upload_publishes_nothing_and_the_rerun_completes(
    tmp_path, tiny_checkpoint, ingested, signal_name, prefect_api
):
    cfg = fault_cfg(tmp_path, tiny_checkpoint, "approval.timeout_s=0", start=ingested)
    fault = f"during_artifact_upload:{signal_name}"
    if signal_name == "kill":
        assert steps_in_child(cfg, "t-a", fault).returncode == -9
        left = ("RUNNING", "")  # no code of ours ran after the kill
    else:  # a whole night in a child, stopped by SIGTERM mid-upload: it unwinds and says so
        night = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "nightly",
                *cli_args(cfg, tiny_checkpoint),
                "--set",
                f"drop_zone={tmp_path / 'incoming'}",
                "--set",
                "approval.timeout_s=0",
            ],
            cwd=REPO,
            env=env_with_prefect_api() | {"CLIPLOOP_FAULT": fault},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert night.returncode != 0, night.stdout[-2000:] + night.stderr[-2000:]
        left = ("FAILED", "")
        assert states(cfg) == {"t-a": "failed"}
    registry = from_config(cfg)
    assert registry.versions() == [] and _runs(registry) == [left]  # nothing published

    version, _ = learn_steps(cfg, "t-a")
    assert version == 1 and [int(v.version) for v in registry.versions()] == [1]
    assert _runs(registry) == sorted([("FINISHED", ""), ("FAILED", "true" if signal_name == "kill" else "")])
    assert registry.alias("challenger") == 1 and states(cfg) == {"t-a": "learned"}


# ---- defect 5: SIGTERM does not end a night; SIGKILL leaves Prefect's temporary server behind ------------


def _alive(processes) -> set:
    from flows.lifeline import running

    return running(processes)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _night_until_learning(cfg, ckpt, settings: list[str], env: dict | None = None) -> tuple[subprocess.Popen, set]:
    """``cliploop nightly`` in a child process, once its task is being learned: (process, its descendants)."""
    from flows.lifeline import descendants

    sets = [a for s in settings for a in ("--set", s)]
    log = cfg.workspace_path.parent / f"night-{time.time_ns()}.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "nightly", *cli_args(cfg, ckpt), *sets],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 240
    while states(cfg).get("t-a") != "learning" and child.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert states(cfg).get("t-a") == "learning", f"never learning (exit {child.poll()}): {log.read_text()[-3000:]}"
    time.sleep(2)  # into the training loop
    return child, descendants(child.pid)


def test_sigterm_ends_a_night_within_seconds_and_sigkill_leaves_no_process_behind(
    tmp_path, tiny_checkpoint, ingested, prefect_api
):
    settings = [
        f"drop_zone={tmp_path / 'incoming'}",
        "method.name=finetune",
        "method.settings.iterations=1000000",
        "method.settings.batch_size=2",
        "method.settings.warmup_steps=0",
        "approval.timeout_s=0",
    ]
    cfg = fault_cfg(tmp_path, tiny_checkpoint, *settings[1:], start=ingested)

    # The SIGTERM'd night talks to the module's Prefect server (starting a temporary one costs seconds here);
    # the SIGKILL'd one below starts its own, the process that must not outlive it.
    child, below = _night_until_learning(cfg, tiny_checkpoint, settings, env_with_prefect_api())
    started = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    assert time.monotonic() - started < 30 and child.returncode == 128 + signal.SIGTERM
    time.sleep(1)
    assert not _alive(below), [_cmdline(p) for p, _ in _alive(below)]
    with Ledger(cfg.workspace_path / ".cliploop" / "ledger.sqlite") as ledger:
        record = ledger.get("t-a")
    assert record.state == "failed" and "SIGTERM" in record.reason

    child, below = _night_until_learning(cfg, tiny_checkpoint, settings)  # the failed task is tried again
    assert any("uvicorn" in _cmdline(pid) for pid, _ in below)
    child.kill()
    child.wait(timeout=30)
    deadline = time.time() + 20
    while _alive(below) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(below), [_cmdline(p) for p, _ in _alive(below)]
    assert states(cfg) == {"t-a": "learning"}  # no code of ours ran; the next night's reconcile says why

    # The next night is not blocked: the killed night's flow runs, left Running in Prefect's database, are
    # marked Crashed, the ledger entry is reclaimed, and the task is learned.
    import json

    quick = [*settings, "method.settings.iterations=2"]
    night = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "nightly",
            "--json",
            *cli_args(cfg, tiny_checkpoint),
            *[a for s in quick for a in ("--set", s)],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = json.loads(night.stdout[night.stdout.index("{") :])
    assert len(summary["swept"]) == 2, summary  # the nightly flow run and its continual-update subflow run
    assert any("interrupted" in line for line in summary["reconciled"])
    assert [u["outcome"] for u in summary["updates"]] == ["awaiting-review"] and states(cfg) == {"t-a": "learned"}


# ---- defect 3: shard bytes trained on without a check -------------------------------------------------------


def _flip_a_bit_inside_an_image(cfg, task_id: str) -> dict:
    from components.intake.shards import read_index

    folder = cfg.workspace_path / "data" / "tasks" / task_id
    row = next(r for r in read_index(folder / "index.csv") if r["split"] == "train")
    shard = folder / "shards" / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + row["size"] - 8] ^= 0x10  # in the JPEG's entropy-coded data, before its end marker
    os.chmod(shard, 0o644)
    shard.write_bytes(bytes(data))
    return row | {"damaged": bytes(data[row["offset"] : row["offset"] + row["size"]])}


@pytest.mark.parametrize("method", ["finetune", "lvp"])
def test_a_flipped_bit_in_a_stored_shard_stops_the_step_naming_shard_and_row(
    tmp_path, tiny_checkpoint, ingested, method, capsys
):
    from components.intake.shards import CorruptShard
    from components.model.data import decode_rgb

    extra = (
        ["method.settings.iterations=2", "method.settings.batch_size=2", "method.settings.warmup_steps=0"]
        if method == "finetune"
        else []
    )
    cfg = fault_cfg(tmp_path, tiny_checkpoint, f"method.name={method}", *extra, start=ingested)
    row = _flip_a_bit_inside_an_image(cfg, "t-a")
    decode_rgb(row["damaged"])  # the damaged JPEG still decodes: only the checksum can tell

    chain.start_learning(cfg, "t-a")
    with pytest.raises(CorruptShard) as corrupt:
        pools = {"t-a": steps.build_pool(cfg, "t-a")["pool_dir"]} if steps.builds_pools(cfg) else {}
        steps.run_update(cfg, "t-a", None, pools)
    message = str(corrupt.value)
    assert row["shard"] in message and row["path"] in message and "SHA-256" in message
    assert not retry.is_transient(corrupt.value)  # retrying cannot fix damaged data
    assert not list((cfg.workspace_path / ".cliploop" / "runs").glob("*/result.json"))

    # `cliploop learn` on the stored task says the same in one line (exit 1), no traceback.
    from flows.cli import main

    capsys.readouterr()
    stored = str(cfg.workspace_path / "data" / "tasks" / "t-a")
    argv = ["learn", "--method", method, stored, *cli_args(cfg, tiny_checkpoint)]
    assert main([*argv, *[a for s in extra for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err
    assert "stored task data damaged" in err and row["path"] in err and "Traceback" not in err


def test_the_sweep_recognises_this_chain_by_config_or_by_config_path(tmp_path, tiny_checkpoint):
    """The deployed nightly is started with ``config_path``, its subflows with the portable ``config``: a zombie
    of either kind is this chain's; another workspace's is not."""
    from flows.nightly import _chain_of

    cfg = fault_cfg(tmp_path, tiny_checkpoint)
    path = tmp_path / "cliploop.yaml"
    path.write_text(f"workspace: {cfg.workspace_path}\n")
    ours = {str(cfg.workspace_path), cfg.mlflow.registered_model}
    assert _chain_of({"config": cfg.portable()}) == ours
    assert _chain_of({"config_path": str(path), "overrides": None}) == ours
    assert _chain_of({"config_path": str(tmp_path / "gone.yaml")}) != ours
    other = cfg.portable() | {"workspace": str(tmp_path / "elsewhere")}
    assert _chain_of({"config": other}) != ours
