"""``cliploop pool``: one stored task's pool built by hand, with the configured method and engine, into the
pipeline's keyed folder or a folder of the user's choosing; where it went and the SHA-256 of its tensors."""

from __future__ import annotations


def build_stored_pool(config, task_id: str, out=None) -> dict:
    """``cliploop pool``: a stored task's pool with the configured method and engine, into the pipeline's keyed
    folder (``components.steps.build_pool``, reused when complete) or into ``out``; where it went and the
    SHA-256 of its tensors."""
    import json
    import time
    from pathlib import Path

    from components import steps
    from components.data import load_task
    from components.learn import make_method
    from components.methods.base import task_prompts
    from components.models import load_backbone
    from components.run_context import context_for

    started = time.perf_counter()
    if out is None:
        result = steps.build_pool(config, task_id)
    else:
        method = make_method(config)
        if not method.builds_pools:
            raise steps.PipelineError(f"method {method.name} builds no per-task pools")
        task = load_task(str(config.workspace_path / "data" / "tasks" / task_id))
        pool, stats = method.build_pool(
            task, context_for(config, load_backbone(config.model, frozen=True), task_prompts=task_prompts([task]))
        )
        pool.save(Path(out))
        result = {"pool_dir": str(Path(out).resolve()), "img_per_s": stats.img_per_s, "cached": False}
    from components import step_io

    local = step_io.local(step_io.store_of(config), result["pool_dir"])  # fetched when the store is remote
    doc = json.loads((local / f"{task_id}.json").read_text())
    return {
        "task_id": task_id,
        "engine": config.compute.engine,
        "pool_dir": result["pool_dir"],
        "tensors_sha256": doc["tensors_sha256"],
        "img_per_s": result.get("img_per_s"),
        "cached": bool(result.get("cached")),
        "seconds": round(time.perf_counter() - started, 3),
    }
