"""Setting a method up for a timed training step, shared by benchmarks/method_step.py (the methods' ratios) and
benchmarks/step_scaling.py (their data-parallel scaling): the same model, tasks and batch for both."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def config_for(args, workspace: Path):
    from components.settings.config_loading import load_config

    overrides = [
        f"workspace={workspace}",
        f"model.name={args.model}",
        f"model.device={args.device}",
        f"model.precision={args.precision}",
        f"evaluation.batch_size={args.batch}",
    ]
    overrides.append(f"model.pretrained={args.pretrained}" if args.pretrained else "model.pretrained=null")
    if args.checkpoint:
        overrides.append(f"model.checkpoint={args.checkpoint}")
    return load_config(overrides=overrides, env={}, cwd=workspace)


def prepare(
    name: str,
    settings: dict,
    tasks,
    config,
    args,
    teacher_forwards: int = 0,
    double_batch: bool = False,
    replicas=None,
):
    """A method set up on task 2 (after task 1's end-of-task state), and a function doing one timed step;
    ``replicas``: this worker among data-parallel ones (it steps on its slice of the batch)."""
    from components.methods import get_method
    from components.model.backbones import load_backbone
    from components.model.data import make_loader
    from components.model.state import LearnerState
    from components.training.run_context import context_for
    from components.training.trainer import make_optimizer, optimization_step

    torch.manual_seed(0)
    backbone = load_backbone(config.model)
    extra = {"replicas": replicas} if replicas is not None else {}
    ctx = context_for(config, backbone, locate_task={t.task_id: t for t in tasks}.get, **extra)
    fields = get_method(name).Settings.model_fields
    if "reference_batch_size" in fields:  # the official codes draw reference batches as large as task batches
        settings = {"reference_batch_size": args.batch, **settings}
    method = get_method(name)({"batch_size": args.batch, "augment": False, **settings})
    state = LearnerState(method=name, backbone=backbone.reference)
    first, second = tasks
    method.begin_task(state, first, ctx)  # task 1 "learned" without training: its end-of-task state only
    state = method.end_task()
    method.begin_task(state, second, ctx)
    loader = make_loader(method.train_dataset(), args.batch, 0, shuffle=True, seed=0, drop_last=False)
    images, labels, indices = next(iter(loader))
    if double_batch:  # the same images twice: the work of a second batch through the trained model
        images, labels, indices = (
            torch.cat([images, images]),
            torch.cat([labels, labels]),
            torch.cat([indices, indices]),
        )
    if replicas is not None:  # this worker's slice of the global batch
        images, labels, indices = replicas.take(images), replicas.take(labels), replicas.take(indices)
    named = [(n, p) for n, p in method.trainable_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in named], method.settings)
    teachers = [copy.deepcopy(backbone.model).eval().requires_grad_(False) for _ in range(teacher_forwards)]
    device = backbone.device
    counter = iter(range(10**9))

    def step() -> float:
        sync(device)
        t0 = time.perf_counter()
        optimization_step(method, optimizer, named, images, labels, ctx, next(counter), indices)
        for teacher in teachers:
            with torch.no_grad(), backbone.autocast():
                teacher.encode_image(images.to(device, dtype=backbone.weights_dtype))
                teacher.encode_text(method.label_tokens)
        sync(device)
        return time.perf_counter() - t0

    return step, {"batch": len(images), "trainable_params": sum(p.numel() for _, p in named)}
