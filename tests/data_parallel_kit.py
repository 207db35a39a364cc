"""One training run as one of several data-parallel workers (or alone), for tests/test_data_parallel.py: each worker
is a process of its own on a gloo process group, as the CPU stands in for several GPUs."""

from __future__ import annotations

import json
from pathlib import Path

from components.model.replicas import Replicas


class Desynced(Replicas):
    """The planted fault: workers that never average their gradients (each steps on its own slice's)."""

    def mean_grads(self, params) -> None:
        pass


def train(rank: int, world: int, port: int, job: dict) -> None:
    """Learn ``job["drop"]`` with ``job["method"]`` for a few steps as worker ``rank`` of ``world``; the first worker
    writes the learned weights (safetensors) and the logged losses (JSON) to ``job["out"]``."""
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
        replicas = (Desynced if job.get("desync") else Replicas)(rank, world)
        config = load_config(overrides=job["overrides"], env={}, cwd=Path(job["out"]).parent)
        backbone = load_backbone(config.model)
        ctx = context_for(config, backbone, replicas=replicas)
        method = get_method(job["method"])(job["settings"])
        method.begin_task(LearnerState(method=job["method"], backbone=backbone.reference), load_task(job["drop"]), ctx)
        report = fit(method, method.task, ctx)
        state = method.end_task()
        if rank == 0:
            out = Path(job["out"])
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.weights.items()}, out / "weights.safetensors")
            (out / "losses.json").write_text(json.dumps(report.losses))
    finally:
        if world > 1:
            dist.destroy_process_group()
