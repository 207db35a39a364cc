"""One training run as one of several data-parallel workers (or alone), for the data-parallel tests: each worker is a
process of its own on a gloo process group, as the CPU stands in for several GPUs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from components.model.replicas import Replicas


class Desynced(Replicas):
    """The planted fault: workers that never average their gradients (each steps on its own slice's)."""

    def mean_grads(self, params) -> None:
        pass


def _plant(name: str | None) -> None:
    """``job["plant"]``: "module:function", called in every worker before it trains, to plant a fault there (a test
    module's function that patches a method, so that the check can be shown to fail)."""
    if name:
        module, _, attr = name.partition(":")
        getattr(importlib.import_module(module), attr)()


def train(rank: int, world: int, port: int, job: dict) -> None:
    """Learn ``job["drops"]`` (or the one ``job["drop"]``) in order with ``job["method"]`` for a few steps each, as
    worker ``rank`` of ``world``; the first worker writes the last learner state (``state/``, safetensors + JSON),
    its weights alone (``weights.safetensors``) and each task's logged losses (``losses.json``) to ``job["out"]``."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from components.methods import get_method
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.model.state import LearnerState
    from components.settings.config_loading import load_config
    from components.training.run_context import context_for
    from components.training.trainer import fit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _plant(job.get("plant"))
        replicas = (Desynced if job.get("desync") else Replicas)(rank, world)
        config = load_config(overrides=job["overrides"], env={}, cwd=Path(job["out"]).parent)
        tasks = [load_task(d) for d in job.get("drops") or [job["drop"]]]
        known = {t.task_id: t for t in tasks}
        state = LearnerState(method=job["method"], backbone=load_backbone(config.model, frozen=True).reference)
        losses = []
        for task in tasks:
            torch.manual_seed(0)  # each task starts from the same random state in every run
            # As a continual step does (components/training/learn.py): the parent's weights in a model of their own.
            backbone = load_backbone(config.model, weights=state.weights or None)
            ctx = context_for(config, backbone, replicas=replicas, locate_task=known.__getitem__)
            method = get_method(job["method"])(job["settings"])
            method.begin_task(state, task, ctx)
            losses.append(fit(method, method.task, ctx).losses)
            state = method.end_task()
        if rank == 0:
            out = Path(job["out"])
            out.mkdir(parents=True, exist_ok=True)
            state.save(out / "state")
            weights = state.weights or {}  # none for a method that keeps the backbone frozen (DIKI)
            save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
            (out / "losses.json").write_text(json.dumps(losses[-1] if "drop" in job else losses))
    finally:
        if world > 1:
            dist.destroy_process_group()


def collectives(rank: int, world: int, port: int, out: str) -> None:
    """Each worker's answers to ``total`` and ``broadcast`` of a tensor of its own, written as JSON per rank."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        replicas, mine = Replicas(rank, world), torch.tensor([1.0, 2.0]) * (rank + 1)
        found = {"total": replicas.total(mine).tolist(), "broadcast": replicas.broadcast(mine).tolist()}
        found["mine"] = mine.tolist()  # neither may change the worker's own tensor
        Path(out, f"{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()
