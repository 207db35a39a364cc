"""LwF, ZSCL and GNSP trained by two data-parallel workers (components/model/replicas.py) end where one process ends
on the same global batches (docs/methods/lwf.md, docs/methods/zscl.md, docs/methods/gnsp.md, each "Training on
several workers"):

- LwF distils the global batch: the teacher's features are gathered with the student's;
- ZSCL and GNSP split every global reference batch as they split the task batch and distil over the whole of it;
  ZSCL's weight ensemble becomes the saved weights, so it is compared too;
- GNSP stores the Grams one process stores (each worker passes over its own Gram batches, the sums are added over
  the workers), and its projector acts on the second task.

Both workers end with the very same tensors (weights and Grams), and a planted fault per method, each a function
below that patches the method in the worker processes, ends elsewhere. The slices are uneven: global task batches of
5 and 3 (8 images) cut 3 + 2 and 2 + 1, reference batches of 3 cut 2 + 1, Gram batches 3, 3, 2 shared 2 + 1 (and one
batch, the second worker without).

Every two-worker run shares one pair of processes (``_workers`` runs the jobs one after another, each on a
process group of its own): starting the processes is most of a run's time on this machine."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.data_parallel_kit import train
from tests.drops import make_task

# fp32: the gathered logits, the averaged gradients and the summed Grams add in another order than one process.
ATOL, RTOL = 1e-5, 1e-4
HERE = "tests.test_data_parallel_reference"
METHODS = ("lwf", "zscl", "gnsp")
PLANTS = {
    "lwf": f"{HERE}:plant_lwf_distilling_its_own_slice",
    "zscl": f"{HERE}:plant_zscl_distilling_its_own_reference_slice",
    "gnsp": f"{HERE}:plant_gnsp_grams_of_its_own_batches",
}

# ---- in the worker processes: the planted faults, and what every worker ends with ------------------------

_undo: list = []  # (owner, attribute, what it was; None: it was inherited)
_out: str | None = None  # the running job's folder


def _patch(owner, name: str, value) -> None:
    _undo.append((owner, name, vars(owner).get(name)))
    setattr(owner, name, value)


def _unplant() -> None:
    while _undo:
        owner, name, old = _undo.pop()
        if old is None:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def plant_lwf_distilling_its_own_slice() -> None:
    """LwF's distillation over this worker's rows alone (teacher's and student's), the task loss still global."""
    from components.methods.lwf import LwF
    from components.methods.tuning import image_text_distill

    def training_step(self, batch):
        images, labels = batch[:2]
        ce, features, text = self.task_loss(images, labels)
        start, stop = self.ctx.replicas.bounds(len(features))
        with torch.no_grad():
            teacher = self.scale * self.encode_image(images, self.teacher) @ self.teacher_text.T
        student = self.scale * features[start:stop] @ text.T
        s = self.settings
        return {"ce": ce, "lwf": s.distill_weight * image_text_distill(teacher, student, s.temperature)}

    _patch(LwF, "training_step", training_step)


def plant_zscl_distilling_its_own_reference_slice() -> None:
    """ZSCL's reference loss over this worker's slice of the reference batch alone."""
    from components.methods.zscl import ZSCL

    whole = ZSCL.joint_forward

    def joint_forward(self, images, labels):
        step = whole(self, images, labels)
        start, stop = self.ctx.replicas.bounds(len(step.rows))
        return dataclasses.replace(
            step, rows=step.rows[start:stop], captions=step.captions[start:stop], reference=step.reference[start:stop]
        )

    _patch(ZSCL, "joint_forward", joint_forward)


def plant_gnsp_grams_of_its_own_batches() -> None:
    """GNSP's Grams from this worker's Gram batches alone, not summed over the workers (the first worker's state,
    and its projector, then hold part of the task)."""
    from components.methods import gnsp

    summed = gnsp.task_grams
    _patch(
        gnsp,
        "task_grams",
        lambda model, batches, device, autocast, replicas=None: summed(model, batches, device, autocast),
    )


def _record_every_worker() -> None:
    """Each worker writes what it ends a task with (weights, method tensors) to ``rank<r>.safetensors``: the kit
    writes the first worker's alone."""
    from safetensors.torch import save_file

    from components.methods.tuning import TunedCLIP

    end = TunedCLIP.end_task

    def end_task(self):
        state = end(self)
        tensors = {f"weights/{k}": v for k, v in state.weights.items()}
        tensors |= {f"method/{k}": v for k, v in state.method_tensors.items()}
        Path(_out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{_out}/rank{self.ctx.replicas.rank}.safetensors")
        return state

    _patch(TunedCLIP, "end_task", end_task)


def _workers(rank: int, world: int, ports: list[int], jobs: list[dict]) -> None:
    global _out
    for port, job in zip(ports, jobs):
        _out = job["out"]
        _record_every_worker()
        try:
            train(rank, world, port, job)
        finally:
            _unplant()


# ---- the runs ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def jobs(tiny_checkpoint, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("data-parallel-reference")
    first = make_task(root / "incoming", "t-a", ["cat", "dog"], train=4, test=1)  # 8 training images each
    second = make_task(root / "incoming", "t-b", ["emu", "owl"], train=4, test=1, salt="b")
    reference = make_task(root / "incoming", "ref", ["fox", "yak", "ant"], train=2, test=1, salt="r")  # 6 images
    # Plain SGD: the weights move by the lr times the gradient, so fp32 reordering stays fp32-sized in them. AdamW
    # divides each step by the gradient's own running size, and where an element's gradients nearly cancel it
    # enlarges that noise: one element in 16384 ended 4e-5 away on an AMD EPYC (tests/test_data_parallel.py
    # checks AdamW's workers against one process, with the keys where that happens set aside).
    common = {"batch_size": 5, "warmup_steps": 0, "augment": False, "optimizer": "sgd", "lr": 0.1, "iterations": 3}
    # 5 of the 6 reference images in batches of 3: [0 1 2] [3 4 0] [1 2 3] ..., each cut 2 + 1.
    referenced = {**common, "reference_set": str(reference), "reference_size": 5, "reference_batch_size": 3}
    job = {"overrides": tiny_overrides(tiny_checkpoint)}
    return {
        "lwf": {**job, "method": "lwf", "drops": [str(first)], "settings": common},
        # Merges after steps 0 and 2, and the final weights after step 3.
        "zscl": {
            **job,
            "method": "zscl",
            "drops": [str(first)],
            "settings": {**referenced, "iterations": 4, "ensemble_every": 2},
        },
        # Two tasks: the projector acts from the second on. Gram batches of 3 over the first task's 8 images (3,
        # 3, 2: the workers take 2 + 1), one of 8 over the second's (the second worker has none and adds zeros).
        # SGD, not AdamW: the tiny model's Gram spectra have eigenvalues close together at the protected rank,
        # so rounding in the Grams turns the projector slightly, and AdamW, dividing each element by its own
        # size, turns an element the projection left near zero into an lr-sized step of either sign. One process
        # with AdamW, its first task's Grams perturbed by 1e-7 (what two workers' sums differ by), ended its
        # second task up to 2.6e-4 away from itself; with SGD two workers end within 1.2e-7 of one process,
        # after moving the weights by 1e-2.
        "gnsp": {
            **job,
            "method": "gnsp",
            "drops": [str(first), str(second)],
            "settings": {
                **referenced,
                "gram_batch_size": 3,
                "per_task": {"t-b": {"gram_batch_size": 8}},
            },
        },
        "root": root,
    }


def _result(out: Path) -> dict:
    from safetensors.torch import load_file

    from components.model.state import LearnerState

    return {
        "weights": load_file(out / "weights.safetensors"),
        "grams": dict(LearnerState.load(out / "state").method_tensors),
        "losses": json.loads((out / "losses.json").read_text()),
        "ranks": [load_file(p) for p in sorted(out.glob("rank*.safetensors"))],
    }


@pytest.fixture(scope="module")
def one(jobs) -> dict[str, dict]:
    """Each method learnt by one process (this one)."""
    found = {}
    for method in METHODS:
        out = jobs["root"] / f"one-{method}"
        train(0, 1, 0, {**jobs[method], "out": str(out)})
        found[method] = _result(out)
    return found


@pytest.fixture(scope="module")
def two(jobs) -> dict[str, dict]:
    """Each method learnt by two workers, then again with its planted fault ("<method>-planted")."""
    runs = {m: {**jobs[m], "out": str(jobs["root"] / f"two-{m}")} for m in METHODS}
    runs |= {
        f"{m}-planted": {**jobs[m], "plant": PLANTS[m], "out": str(jobs["root"] / f"planted-{m}")} for m in METHODS
    }
    ports = [_free_port() for _ in runs]
    torch.multiprocessing.spawn(_workers, args=(2, ports, list(runs.values())), nprocs=2, join=True)
    return {name: _result(Path(job["out"])) for name, job in runs.items()}


def _comparable(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """Without the keys' third of an attention's input bias (tests/test_data_parallel.py says why: its gradient is
    fp32 noise, which AdamW turns into lr-sized steps in a different direction in each run)."""
    if not key.endswith("in_proj_bias"):
        return tensor
    third = tensor.numel() // 3
    return torch.cat([tensor[:third], tensor[2 * third :]])


def _elsewhere(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors differ beyond fp32's tolerance."""
    assert set(a) == set(b)
    return [k for k in a if not torch.allclose(_comparable(b[k], k), _comparable(a[k], k), atol=ATOL, rtol=RTOL)]


# ---- the checks ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # processes that each load torch and train (make test runs it; make check does not)
@pytest.mark.parametrize("method", METHODS)
def test_two_workers_learn_what_one_process_learns(one, two, method):
    alone, pair = one[method], two[method]
    assert _elsewhere(alone["weights"], pair["weights"]) == []
    # Every loss term logged is the global batch's: the same numbers as one process's.
    assert len(pair["losses"]) == len(alone["losses"])
    for mine, theirs in zip(pair["losses"], alone["losses"]):
        assert [{k: pytest.approx(v, rel=RTOL, abs=ATOL) for k, v in row.items()} for row in mine] == theirs
    # Both workers end with the very same weights (and Grams): nothing a worker keeps drifts from the others.
    first, second = pair["ranks"]
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(first[f"weights/{k}"], v) for k, v in pair["weights"].items())  # what the kit saved
    if method == "gnsp":  # the Gram sums of both tasks, one process's
        assert len(alone["grams"]) == 2 * 2 + 1 and _elsewhere(alone["grams"], pair["grams"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_method_that_is_not_synchronised_ends_elsewhere(one, two, method):
    """The check above can fail: each method with its planted fault (the functions above) ends away from one
    process: LwF distilling each worker's own slice, ZSCL its own slice of the reference batch, GNSP storing the
    Grams of the first worker's Gram batches alone (and projecting the second task's gradients with them)."""
    alone, planted = one[method], two[f"{method}-planted"]
    assert _elsewhere(alone["weights"], planted["weights"])
    if method == "gnsp":
        assert _elsewhere(alone["grams"], planted["grams"])
        # The first task is not projected: the projector of the first worker's batches moves the second.
        assert any(
            k.startswith("visual.transformer.resblocks.") and k.endswith("mlp.c_fc.weight")
            for k in _elsewhere(alone["weights"], planted["weights"])
        )


def test_a_reference_batch_smaller_than_the_workers_is_refused(tiny_backbone, tmp_path):
    """Each worker encodes its slice of every reference batch: a worker without one is refused before training, in
    one line naming the sizes (no process group is needed to refuse)."""
    from components.methods import MethodError, get_method
    from components.methods.base import Context
    from components.model.data import load_task
    from components.model.replicas import Replicas
    from components.model.state import LearnerState

    task = load_task(make_task(tmp_path, "t-a", ["cat", "dog"], train=2, test=1))  # 4 images
    for method in ("zscl", "gnsp"):
        learner = get_method(method)({"reference_batch_size": 1, "warmup_steps": 0})
        state = LearnerState(method=method, backbone=tiny_backbone.reference)
        with pytest.raises(
            MethodError, match=f"{method}: a reference batch of 1 images cannot be split over 2 workers"
        ):
            learner.begin_task(state, task, Context(tiny_backbone, replicas=Replicas(0, 2)))
