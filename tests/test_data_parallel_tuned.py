"""Data-parallel training of CTP, SG and CVM (components/model/replicas.py): two workers, each a process on a gloo
process group with its slice of every global batch, learn two tasks and end where one process ends on the same
global batches: the weights, the state each method carries to the next task (CTP's queues and its reservoir, SG's
and CVM's exemplar memories, CVM's concepts and map) and the logged losses (CVM's concept anchoring included). For
each method a planted desynchronisation (CTP enqueueing only its own keys, SG distilling its own slice, CVM's loss
over its own slice) ends elsewhere, so the check can fail.

The workers are processes started here (``torch.multiprocessing``), as in tests/test_data_parallel.py; each spawn
runs several jobs in turn (a process group each), since starting the processes costs more than training the tiny
model. Plants persist in a worker process, so each one touches only its own method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.model.replicas import Replicas
from tests.conftest import tiny_overrides
from tests.data_parallel_kit import train
from tests.drops import make_task
from tests.test_data_parallel import _comparable, _free_port

ATOL, RTOL = 1e-5, 1e-4  # fp32: gathered features and averaged gradients sum in another order than one process's

# Global batches of 5 over 8 training images (and 12 with replay): 5 then 3 (or 2) per epoch, cut 3 + 2 and 2 + 1
# (or 1 + 1), so a loss averaged on each worker's slice is not the batch's. No augmentation: the same pixels.
COMMON = {"iterations": 3, "batch_size": 5, "warmup_steps": 0, "augment": False}
# SGD for all three (SG's own optimizer; CTP's and CVM's is AdamW): AdamW divides each gradient by its running size,
# so an element whose gradient is near Adam's eps (1e-8) at a fresh optimizer's first step moves by a share of the
# lr that rounding decides (seen in CTP: -9.5e-9 in one process and -6.5e-9 with two workers moved it 0.49 and 0.39
# of the lr, 9e-6 apart). SGD moves it by lr times the gradient: rounding stays rounding. The optimizer state is
# built from the averaged gradients on every worker alike, whichever optimizer it is.
SETTINGS = {
    # A queue of 8 wraps within a task; a reservoir of 4 of the first task's images is replayed in the second.
    "ctp": {**COMMON, "optimizer": "sgd", "lr": 0.05, "queue_size": 8, "memory_size": 4},
    # Herding keeps 2 of each class's 4 images; the second task distils the first's classes (SG-KD).
    "sg": {**COMMON, "lr": 0.05, "memory_per_class": 2},
    # Herding keeps 2 of each class's 4 images, replayed balanced (twice: 8 + 8 images in task 2, in batches of 7 cut
    # 4 + 3, 4 + 3, 1 + 1); both anchoring terms on, off their defaults (the drift from task 2, weighted so that its
    # gradient over 3 small steps from the start is not lost in the tolerance).
    "cvm": {
        **COMMON,
        "optimizer": "sgd",
        "lr": 0.05,
        "memory_per_class": 2,
        "replay": "balanced",
        "pull_weight": 0.5,
        "drift_weight": 20.0,
        "per_task": {"t-b": {"batch_size": 7}},
    },
}
PLANTS = {  # each method's desynchronised variant, CVM's two (functions below)
    "ctp": "tests.test_data_parallel_tuned:ctp_enqueues_only_its_own_keys",
    "sg": "tests.test_data_parallel_tuned:sg_distils_its_own_slice",
    "cvm": "tests.test_data_parallel_tuned:cvm_loss_over_its_own_slice",
    "cvm drift": "tests.test_data_parallel_tuned:cvm_drift_over_its_own_slice",  # the rest over the global batch
}
# What every worker must take from the first one, not compute itself: the second worker computes it otherwise here.
BROADCAST = {
    "sg": "tests.test_data_parallel_tuned:second_worker_embeds_otherwise",
    "cvm": "tests.test_data_parallel_tuned:second_worker_encodes_concepts_and_embeds_otherwise",
}


# ---- plants (called in every worker before it trains) ------------------------------------------------------------


def _own(rows: torch.Tensor) -> torch.Tensor:
    """This worker's rows of a gathered global batch."""
    import torch.distributed as dist

    return Replicas(dist.get_rank(), dist.get_world_size()).take(rows)


def ctp_enqueues_only_its_own_keys() -> None:
    from components.methods import ctp

    original = ctp.enqueue
    ctp.enqueue = lambda queue, pointer, keys: original(queue, pointer, _own(keys))


def sg_distils_its_own_slice() -> None:
    from components.methods import sg

    original = sg.kd_loss
    sg.kd_loss = lambda teacher, student, temperature: original(_own(teacher), _own(student), temperature)


def cvm_loss_over_its_own_slice() -> None:
    """CVM's training step on one process's terms: each worker's cross-entropy and anchoring over its own slice."""
    import torch.nn.functional as F

    from components.methods.cvm import CVM, concept_drift, concept_logits, concept_pull

    def training_step(self, batch):
        images, labels = batch[:2]
        mapped = self.model.encode_image(images).float() @ self.projection.T
        logits = concept_logits(mapped, self.targets, self.settings.tau)
        losses = {"ce": F.cross_entropy(logits, labels, label_smoothing=self.settings.label_smoothing)}
        losses["pull"] = self.settings.pull_weight * concept_pull(mapped, self.targets[labels])
        if self.start is not None:
            with torch.no_grad():
                start = self.start[0].encode_image(images).float() @ self.start[1].T
            losses["drift"] = self.settings.drift_weight * concept_drift(mapped, start, self.old_concepts)
        return losses

    CVM.training_step = training_step


def cvm_drift_over_its_own_slice() -> None:
    from components.methods import cvm

    original = cvm.concept_drift
    cvm.concept_drift = lambda mapped, start, concepts: original(_own(mapped), _own(start), concepts)


def _second_worker_noise(like: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        return like
    noise = torch.randn(like.shape, generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.normalize(noise, dim=-1).to(like.device, like.dtype)


def second_worker_embeds_otherwise() -> None:
    """The second worker's embeddings for herding are noise (only the exemplar memory reads them)."""
    from components.methods.base import Context

    original = Context.image_embeddings

    def image_embeddings(self, task, split):
        features, labels = original(self, task, split)
        return _second_worker_noise(features), labels

    Context.image_embeddings = image_embeddings


def second_worker_encodes_concepts_and_embeds_otherwise() -> None:
    """CVM: the second worker's concepts and its embeddings for herding are noise."""
    from components.methods.cvm import ConceptEncoder

    original = ConceptEncoder.__call__
    ConceptEncoder.__call__ = lambda self, texts: _second_worker_noise(original(self, texts))
    second_worker_embeds_otherwise()


# ---- runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-parallel-tuned")
    drops = [
        make_task(root / "incoming", "t-a", ["cat", "dog"], train=4, test=1),
        make_task(root / "incoming", "t-b", ["emu", "owl"], train=4, test=1),
    ]
    return {"drops": [str(d) for d in drops], "overrides": tiny_overrides(tiny_checkpoint), "root": root}


def _job(base: dict, method: str, run: str, plant: str | None = None) -> dict:
    job = {"method": method, "drops": base["drops"], "overrides": base["overrides"], "settings": SETTINGS[method]}
    return {**job, "out": str(base["root"] / f"{method}-{run}"), "plant": plant}


def _several(rank: int, world: int, ports: list[int], jobs: list[dict]) -> None:
    for port, job in zip(ports, jobs):
        train(rank, world, port, job)


def _spawn(jobs: list[dict]) -> None:
    ports = [_free_port() for _ in jobs]
    torch.multiprocessing.spawn(_several, args=(2, ports, jobs), nprocs=2, join=True)


def _outcome(job: dict) -> dict:
    from safetensors.torch import load_file

    from components.model.state import LearnerState

    out = Path(job["out"])
    state = LearnerState.load(out / "state")
    return {
        "weights": load_file(out / "weights.safetensors"),
        "tensors": state.method_tensors,
        "meta": state.method_meta,
        "losses": json.loads((out / "losses.json").read_text()),
    }


@pytest.fixture(scope="module")
def alone(base):
    """One process, each method over both tasks."""
    jobs = {m: _job(base, m, "one") for m in SETTINGS}
    for job in jobs.values():
        train(0, 1, 0, job)
    return {m: _outcome(job) for m, job in jobs.items()}


@pytest.fixture(scope="module")
def together(base):
    """Two workers, each method over both tasks; SG and CVM with their second worker computing otherwise what the
    first one broadcasts (its herding embeddings; CVM's also its concepts)."""
    jobs = {m: _job(base, m, "two", BROADCAST.get(m)) for m in SETTINGS}
    _spawn(list(jobs.values()))
    return {m: _outcome(job) for m, job in jobs.items()}


@pytest.fixture(scope="module")
def planted(base):
    jobs = {m: _job(base, m.split()[0], m.replace(" ", "-") + "-planted", plant) for m, plant in PLANTS.items()}
    _spawn(list(jobs.values()))
    return {m: _outcome(job) for m, job in jobs.items()}


def _differences(one: dict, two: dict) -> list[tuple[str, float]]:
    """(name, largest difference) of every weight and state tensor outside the tolerance."""
    found = []
    for kind in ("weights", "tensors"):
        assert set(two[kind]) == set(one[kind])
        for key in one[kind]:
            a, b = _comparable(one[kind][key], key), _comparable(two[kind][key], key)
            if not torch.allclose(b.float(), a.float(), atol=ATOL, rtol=RTOL):
                found.append((key, (a.float() - b.float()).abs().max().item()))
    return found


@pytest.mark.slow  # processes that each load torch and train (make test runs it; make check does not)
@pytest.mark.parametrize("method", list(SETTINGS))
def test_two_workers_learn_two_tasks_as_one_process_does(alone, together, method):
    one, two = alone[method], together[method]
    assert _differences(one, two) == []
    assert two["meta"] == one["meta"]  # the replay memory (SG's herding, CTP's reservoir), CVM's concept keys
    # The logged losses are the global batch's, task by task and term by term.
    rounded = [[{k: round(v, 4) for k, v in row.items()} for row in task] for task in one["losses"]]
    assert [[{k: round(v, 4) for k, v in row.items()} for row in task] for task in two["losses"]] == rounded


@pytest.mark.slow
def test_what_the_states_carry_to_the_second_task_is_there(alone):
    """The comparison above covers the state each method carries: it is in the saved state (not vacuous)."""
    assert {"ctp.queue_image", "ctp.queue_text", "ctp.queue_ptr"} <= set(alone["ctp"]["tensors"])
    assert int(alone["ctp"]["tensors"]["ctp.queue_ptr"]) == (5 + 3 + 5 + 5 + 5 + 2) % 8  # 8 images, then 8 + 4
    assert len(alone["ctp"]["meta"]["reservoir"]) == 4
    assert [m["class_key"] for m in alone["sg"]["meta"]["memory"]] == [
        *["toy/cat"] * 2,
        *["toy/dog"] * 2,
        *["toy/emu"] * 2,
        *["toy/owl"] * 2,
    ]
    assert alone["cvm"]["meta"]["cvm.concept_keys"] == ["toy/cat", "toy/dog", "toy/emu", "toy/owl"]
    assert [m["class_key"] for m in alone["cvm"]["meta"]["memory"]] == [
        m["class_key"] for m in alone["sg"]["meta"]["memory"]
    ]
    first, second = (set(task[0]) for task in alone["cvm"]["losses"])
    assert {"ce", "pull"} <= first and "drift" not in first and {"ce", "pull", "drift"} <= second
    assert {"kd", "rl", "con"} <= set(alone["sg"]["losses"][1][0])  # the second task distils the first


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PLANTS))
def test_a_desynchronised_variant_ends_elsewhere(alone, planted, method):
    """The check can fail: CTP enqueueing only its own keys, SG distilling its own slice, CVM's loss over its own
    slice (all of it, or its drift term alone), each ends away from one process."""
    assert _differences(alone[method.split()[0]], planted[method]) != []
