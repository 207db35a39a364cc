"""Data-parallel training (components/model/replicas.py): two workers, each a process on a gloo process group with
its slice of every global batch, end where one process ends on the same global batch; a planted fault (workers
that never average their gradients) does not. Plus the slicing and the refusals, by hand.

The workers are processes started here (``torch.multiprocessing``) rather than by Ray Train: the maths under test
is the same, and each worker starts in seconds."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from components.model.replicas import Replicas
from tests.conftest import tiny_overrides
from tests.data_parallel_kit import collectives, train
from tests.drops import make_task

# fp32: the gathered logits and the averaged gradients sum in another order than one process's.
ATOL, RTOL = 1e-5, 1e-4


def test_a_batch_is_cut_into_contiguous_slices_in_rank_order():
    assert [Replicas(r, 2).bounds(5) for r in range(2)] == [(0, 3), (3, 5)]
    assert [Replicas(r, 3).take(list(range(7))) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert Replicas().take([4, 1, 3]) == [4, 1, 3]
    with pytest.raises(ValueError, match="rank 2 of 2"):
        Replicas(2, 2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def job(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-parallel")
    drop = make_task(root / "incoming", "t-a", ["cat", "dog"], train=4, test=1)  # 8 training images
    return {
        "method": "finetune",
        "drop": str(drop),
        "overrides": tiny_overrides(tiny_checkpoint),
        # Global batches of 5 and 3 (the epoch's rest) cut 3 + 2 and 2 + 1: uneven, so a loss averaged on each
        # worker's slice would not be the batch's. 3 steps; no augmentation: the same pixels in both runs.
        "settings": {"iterations": 3, "batch_size": 5, "warmup_steps": 0, "augment": False, "lr": 1e-3},
        "out": str(root / "one"),
    }


def _run(job: dict, workers: int, name: str, **extra) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from safetensors.torch import load_file

    job = {**job, **extra, "out": str(job["out"]).replace("/one", f"/{name}")}
    if workers == 1:
        train(0, 1, 0, job)
    else:
        torch.multiprocessing.spawn(train, args=(workers, _free_port(), job), nprocs=workers, join=True)
    weights = load_file(f"{job['out']}/weights.safetensors")
    losses = json.loads(open(f"{job['out']}/losses.json").read())
    return weights, losses


@pytest.fixture(scope="module")
def alone(job):
    return _run(job, 1, "one")


@pytest.mark.slow  # processes that each load torch and train (make test runs it; make check does not)
@pytest.mark.parametrize("method", ["finetune", "wise-ft"])
def test_two_workers_learn_what_one_process_learns_on_the_same_global_batch(job, alone, method):
    one, one_losses = alone if method == "finetune" else _run(job, 1, f"one-{method}", method=method)
    two, two_losses = _run(job, 2, f"two-{method}", method=method)
    assert set(two) == set(one)  # (that training changed them: the planted fault below ends elsewhere)
    for key in one:
        a, b = _comparable(one[key], key), _comparable(two[key], key)
        assert torch.allclose(b, a, atol=ATOL, rtol=RTOL), (key, (a - b).abs().max().item())
    # The logged losses are the global batch's, the same numbers as one process's.
    assert [round(r["ce"], 4) for r in two_losses] == [round(r["ce"], 4) for r in one_losses]


def _comparable(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """The tensor without the keys' third of an attention's input bias. A bias added to every key shifts each
    query's logits by one constant, which the softmax ignores: its gradient is zero in exact arithmetic and rounding
    noise in fp32, which AdamW (dividing by the noise's own size) turns into steps of about the lr, in another
    direction in each run. Everything else is compared."""
    if not key.endswith("in_proj_bias"):
        return tensor
    third = tensor.numel() // 3
    return torch.cat([tensor[:third], tensor[2 * third :]])


@pytest.mark.slow
def test_workers_that_do_not_average_their_gradients_end_elsewhere(job, alone):
    """The check above can fail: the same run with the gradient averaging left out ends away from one process."""
    one, _ = alone
    desynced, _ = _run(job, 2, "desynced", desync=True)
    assert any(not torch.allclose(desynced[k], one[k], atol=ATOL, rtol=RTOL) for k in one)


@pytest.mark.slow
def test_total_and_broadcast_give_every_worker_the_same_tensor(tmp_path):
    """Worker r holds [1, 2] * (r + 1): the total is [1+2, 2+4] = [3, 6] on both, the broadcast the first's [1, 2]."""
    torch.multiprocessing.spawn(collectives, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    found = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [f["total"] for f in found] == [[3.0, 6.0], [3.0, 6.0]]
    assert [f["broadcast"] for f in found] == [[1.0, 2.0], [1.0, 2.0]]
    assert [f["mine"] for f in found] == [[1.0, 2.0], [2.0, 4.0]]
    assert Replicas().total(torch.ones(2)).tolist() == [1.0, 1.0]  # one worker: the tensor itself


def test_a_method_that_does_not_declare_it_or_a_batch_too_small_to_split_is_refused():
    from types import SimpleNamespace

    from components.methods import get_method
    from components.training.trainer import TrainError, _check_split

    class Undeclared(get_method("finetune")):  # a subclass that adds a loss does not inherit the declaration
        name = "undeclared"

    task = SimpleNamespace(task_id="t-a")
    _check_split(Undeclared(), task, 4, 8, 1)  # one worker: any method, any batch
    with pytest.raises(TrainError, match="undeclared does not train data-parallel yet \\(2 workers\\)"):
        _check_split(Undeclared(), task, 4, 8, 2)
    _check_split(get_method("finetune")(), task, 5, 8, 2)  # batches of 5 and 3: 3 + 2, 2 + 1
    with pytest.raises(TrainError, match="a batch of 1 images cannot be split over 2 workers"):
        _check_split(get_method("finetune")(), task, 4, 9, 2)  # the epoch's last batch holds 1
    with pytest.raises(TrainError, match="a batch of 2 images cannot be split over 3 workers"):
        _check_split(get_method("finetune")(), task, 2, 2, 3)
