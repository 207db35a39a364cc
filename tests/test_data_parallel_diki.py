"""Data-parallel training of DIKI (components/model/replicas.py): two workers, each a process on a gloo process
group with its slice of every global batch, learn two tasks and end where one process ends on the same global
batches: every tensor the learner state carries (each task's image and text prefixes, its Gaussian) and the logged
losses. A planted desynchronisation (the loss over each worker's own slice, as a method that does not gather
would compute it) ends elsewhere, so the check can fail.

The workers are processes started here (``torch.multiprocessing``), as in tests/test_data_parallel_tuned.py; one
spawn runs both two-worker jobs in turn. The backbone is frozen, so the kit's weights file is empty: the state's
method tensors are what is compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.data_parallel_kit import train
from tests.drops import make_task
from tests.test_data_parallel import _free_port

ATOL, RTOL = 1e-5, 1e-4  # fp32: gathered features and averaged gradients sum in another order than one process's

# Global batches of 5 over 8 training images: 5 then 3 per epoch, cut 3 + 2 and 2 + 1, so a loss averaged on each
# worker's slice is not the batch's. Plain SGD, DIKI's own optimizer (lr below the official 5 for the tiny random
# model's larger gradients). No augmentation: the same pixels in every run.
SETTINGS = {"iterations": 3, "batch_size": 5, "warmup_steps": 0, "augment": False, "lr": 0.5}
PLANT = "tests.test_data_parallel_diki:loss_over_its_own_slice"


def loss_over_its_own_slice() -> None:
    """DIKI's training step with nothing gathered: each worker's mean cross-entropy over its own slice."""
    import torch.nn.functional as F

    from components.methods.diki import DIKI
    from components.methods.prefix_injection import injected
    from components.methods.tuning import normalize

    def training_step(self, batch):
        images, labels = batch[:2]
        with injected(self.image_blocks, self.slot["image"], None):
            features = normalize(self.model.encode_image(images).float())
        with injected(self.text_blocks, self.slot["text"], None):
            text = normalize(self.model.encode_text(self.label_tokens).float())
        return {"ce": F.cross_entropy(self.scale * features @ text.T, labels)}

    DIKI.training_step = training_step


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-parallel-diki")
    drops = [
        make_task(root / "incoming", "t-a", ["cat", "dog"], train=4, test=1),
        make_task(root / "incoming", "t-b", ["emu", "owl"], train=4, test=1),
    ]
    return {"drops": [str(d) for d in drops], "overrides": tiny_overrides(tiny_checkpoint), "root": root}


def _job(base: dict, run: str, plant: str | None = None) -> dict:
    job = {"method": "diki", "drops": base["drops"], "overrides": base["overrides"], "settings": SETTINGS}
    return {**job, "out": str(base["root"] / run), "plant": plant}


def _several(rank: int, world: int, ports: list[int], jobs: list[dict]) -> None:
    for port, job in zip(ports, jobs):
        train(rank, world, port, job)


def _outcome(job: dict) -> dict:
    from safetensors.torch import load_file

    from components.model.state import LearnerState

    out = Path(job["out"])
    state = LearnerState.load(out / "state")
    return {
        "weights": state.weights,
        "weights_file": load_file(out / "weights.safetensors"),
        "tensors": state.method_tensors,
        "losses": json.loads((out / "losses.json").read_text()),
    }


@pytest.fixture(scope="module")
def runs(base):
    """One process, then two workers and the planted two workers (one spawn)."""
    alone = _job(base, "one")
    train(0, 1, 0, alone)
    jobs = [_job(base, "two"), _job(base, "planted", PLANT)]
    ports = [_free_port() for _ in jobs]
    torch.multiprocessing.spawn(_several, args=(2, ports, jobs), nprocs=2, join=True)
    return {"one": _outcome(alone), "two": _outcome(jobs[0]), "planted": _outcome(jobs[1])}


def _differences(one: dict, two: dict) -> list[tuple[str, float]]:
    assert set(two["tensors"]) == set(one["tensors"])
    return [
        (key, (a - two["tensors"][key]).abs().max().item())
        for key, a in one["tensors"].items()
        if not torch.allclose(two["tensors"][key], a, atol=ATOL, rtol=RTOL)
    ]


@pytest.mark.slow  # processes that each load torch and train (make test runs it; make check does not)
def test_two_workers_learn_two_tasks_as_one_process_does(runs):
    one, two = runs["one"], runs["two"]
    assert _differences(one, two) == []
    rounded = [[{k: round(v, 4) for k, v in row.items()} for row in task] for task in one["losses"]]
    assert [[{k: round(v, 4) for k, v in row.items()} for row in task] for task in two["losses"]] == rounded


@pytest.mark.slow
def test_what_the_comparison_covers_is_in_the_state_and_the_backbone_is_not(runs):
    """Both tasks' prefixes and Gaussians are there, training moved the prefix values off their zero start (so the
    comparison above is not of untouched tensors), and no backbone weight was written."""
    one = runs["one"]
    kinds = ("image", "text", "mean", "covariance")
    assert set(one["tensors"]) == {f"diki.{k}.{t}" for k in kinds for t in ("t-a", "t-b")}
    for task in ("t-a", "t-b"):
        for tower in ("image", "text"):
            assert one["tensors"][f"diki.{tower}.{task}"][:, 1].abs().max() > 1e-4
    assert one["weights"] is None and one["weights_file"] == {}


@pytest.mark.slow
def test_a_loss_over_each_workers_own_slice_ends_elsewhere(runs):
    """The check can fail: without the gather, each worker's loss is its slice's mean, and the prefixes move
    otherwise."""
    found = _differences(runs["one"], runs["planted"])
    assert found and all(key.startswith(("diki.image.", "diki.text.")) for key, _ in found)
