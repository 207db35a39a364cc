"""Training one task on several data-parallel workers under Ray Train (``compute.train_workers``,
components/training/ray_train.py), on a real local Ray with gloo on the CPU: ``cliploop learn --json`` prints the same
accuracy matrix with two workers as with one, and a worker killed mid-training is restarted by Ray Train from the last
checkpoint, with exactly one version registered.

That each method's maths gives one process's parameters on the same global batch, and that a desynchronised variant
does not, is checked without Ray (tests/test_data_parallel*.py: the same workers as plain processes, which start in
seconds); here what Ray Train adds: the job crossing to the workers, the result and the checkpoints coming back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.registry.registry import from_config
from flows.cli import main
from tests.conftest import RAY_TRAIN_POLL_S, tiny_overrides
from tests.drops import make_task
from tests.fault_kit import CHECKPOINTED_FINETUNE, fault_cfg
from tests.fault_steps import learn_steps
from tests.test_data_parallel import _comparable

pytest.importorskip("ray.train")
# Each training starts a group of Ray workers (make test runs them; make check does not), on the test process's one
# local Ray (tests/conftest.py, local_ray).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

# A worker is killed this long after its checkpoint: a dozen of the controller's collections (tests/conftest.py).
KILL_AFTER_S = 12 * RAY_TRAIN_POLL_S

# fp32: the gathered logits and the averaged gradients sum in another order than one process's.
ATOL, RTOL = 1e-5, 1e-4


def _learn(tmp: Path, drops: list[Path], overrides: list[str], workers: int, capsys) -> dict:
    out = tmp / f"out-{workers}"
    sets = [*overrides, f"compute.train_workers={workers}", "compute.ray_cpus=2"]
    argv = ["learn", *map(str, drops), "--json", "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out) | {"state": out / "state"}


def test_learn_prints_the_same_matrix_with_two_workers_as_with_one(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """Two tasks (the second starts from the first's learned state, which crosses to the workers as files): global
    batches of 5 and 3 over 8 training images, cut 3 + 2 and 2 + 1 between the workers."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    drops = [
        make_task(tmp_path / "incoming", "t-a", ["cat", "dog"], train=4, test=2),
        make_task(tmp_path / "incoming", "t-b", ["emu", "owl"], train=4, test=2),
    ]
    settings = ["iterations=3", "batch_size=5", "warmup_steps=0", "augment=false"]  # fine-tune's own lr
    overrides = tiny_overrides(tiny_checkpoint, "method.name=finetune", *[f"method.settings.{s}" for s in settings])
    one = _learn(tmp_path, drops, overrides, 1, capsys)
    two = _learn(tmp_path, drops, overrides, 2, capsys)
    assert two["accuracy_matrix"] == one["accuracy_matrix"]  # to the printed precision: every entry
    assert two["metrics"] == one["metrics"]
    a, b = load_file(one["state"] / "backbone.safetensors"), load_file(two["state"] / "backbone.safetensors")
    base = load_file(tiny_checkpoint[0])
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed  # training moved the weights, so agreeing says something
    for key in a:
        found, expected = _comparable(b[key], key), _comparable(a[key], key)
        assert torch.allclose(found, expected, atol=ATOL, rtol=RTOL), (key, (found - expected).abs().max().item())


@pytest.mark.faults
def test_a_worker_killed_after_a_checkpoint_is_restarted_there_and_one_version_is_registered(
    tmp_path, tiny_checkpoint, ingested, monkeypatch
):
    """The first worker to reach the step-2 checkpoint is killed (SIGKILL, ``kill_once``) a little after it; Ray
    Train restarts the group, every worker resumes from that checkpoint, and the step registers one version."""
    killed = tmp_path / "killed"
    cfg = fault_cfg(
        tmp_path,
        tiny_checkpoint,
        *CHECKPOINTED_FINETUNE,
        "compute.train_workers=2",
        "compute.ray_cpus=2",
        start=ingested,
    )
    # Ray Train's controller collects the workers' reports every RAY_TRAIN_POLL_S (a checkpoint counts once every
    # worker's report of it was collected): the kill comes well after that, as a crash long after the checkpoint would.
    monkeypatch.setenv("CLIPLOOP_FAULT", f"after_checkpoint:sleep={KILL_AFTER_S},after_checkpoint:kill_once={killed}")
    version, update = learn_steps(cfg, "t-a")
    assert killed.is_file()  # a worker was killed for real
    training = json.loads((Path(update["out_dir"]) / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    assert version == 1 and [int(v.version) for v in from_config(cfg).versions()] == [1]


@pytest.mark.faults
def test_workers_out_of_restarts_fail_in_one_line_and_one_process_resumes_from_their_checkpoint(
    tmp_path, tiny_checkpoint, ingested, monkeypatch
):
    """With no restart allowed, the kill ends the step with one line; the step run again with one process (the
    same run key: the number of workers is not part of a result) resumes from the workers' step-2 checkpoint."""
    from components.training.ray_train import TrainWorkersError

    killed = tmp_path / "killed"
    settings = [*CHECKPOINTED_FINETUNE, "compute.ray_cpus=2"]
    cfg = fault_cfg(
        tmp_path, tiny_checkpoint, *settings, "compute.train_workers=2", "compute.train_retries=0", start=ingested
    )
    monkeypatch.setenv("CLIPLOOP_FAULT", f"after_checkpoint:sleep={KILL_AFTER_S},after_checkpoint:kill_once={killed}")
    with pytest.raises(TrainWorkersError) as failed:
        learn_steps(cfg, "t-a")
    assert killed.is_file() and "\n" not in str(failed.value)
    assert str(failed.value).startswith("task t-a: training on 2 workers failed: ")

    monkeypatch.delenv("CLIPLOOP_FAULT")
    version, update = learn_steps(fault_cfg(tmp_path, tiny_checkpoint, *settings), "t-a")
    training = json.loads((Path(update["out_dir"]) / "eval" / "training.json").read_text())
    assert training["resumed_from"] == 2 and [r["step"] for r in training["losses"]] == [2, 3]
    assert version == 1 and [int(v.version) for v in from_config(cfg).versions()] == [1]


def test_workers_handed_dvc_addresses_fetch_the_tasks_themselves(tmp_path, tiny_checkpoint, ingested, monkeypatch):
    """A step handed the tasks' DVC content addresses (as a GPU worker is) hands the training workers the addresses,
    never a folder of this machine's: with the workspace's task folder gone, the step still trains and evaluates."""
    import shutil

    from components.model.data import load_task
    from components.pipeline import chain, step_io, steps
    from components.training.ray_train import make_job

    cfg = fault_cfg(
        tmp_path,
        tiny_checkpoint,
        "method.name=finetune",
        "method.settings.iterations=2",
        "method.settings.batch_size=2",
        "method.settings.warmup_steps=0",
        "compute.train_workers=2",
        "compute.ray_cpus=2",
        start=ingested,
    )
    chain.start_learning(cfg, "t-a")
    addresses = step_io.addresses(cfg, ["t-a"])
    task = load_task(step_io.locator(cfg, addresses)("t-a"))  # fetched by address, as the step's driver does
    job = make_job(cfg, "finetune", task, None, {"t-a": task}, {}, addresses)
    assert job.tasks == {"t-a": {"address": addresses["t-a"]}}
    shutil.move(cfg.workspace_path / "data" / "tasks" / "t-a", tmp_path / "elsewhere")
    update = steps.run_update(cfg, "t-a", None, {}, None, addresses)
    assert update["final_row"]["t-a"] is not None and update["cached"] is False
