"""``cliploop pool``: one stored task's pool built by hand, with the configured method and engine, into the
pipeline's keyed folder or a folder of the user's choosing; where it went and the SHA-256 of its tensors.
``python -m components.pipeline.stored_pool TASK --out DIR`` builds the LVP pool of a stored task or a drop in a
process of its own, with no workspace."""

from __future__ import annotations


def build_stored_pool(config, task_id: str, out=None) -> dict:
    """``cliploop pool``: a stored task's pool with the configured method and engine, into the pipeline's keyed
    folder (``components.pipeline.steps.build_pool``, reused when complete) or into ``out``; where it went and the
    SHA-256 of its tensors."""
    import json
    import time
    from pathlib import Path

    from components.methods.base import task_prompts
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.pipeline import steps
    from components.training.learn import make_method
    from components.training.run_context import context_for

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
    from components.pipeline import step_io

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


def main(argv: list[str] | None = None) -> int:
    """``python -m components.pipeline.stored_pool TASK --out DIR``: build one task's LVP pool in its own process."""
    import argparse
    import json

    from components.methods.base import task_prompts
    from components.methods.lvp import build_pool
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.model.pools import PoolConfig
    from components.settings.config_loading import load_config
    from components.training.run_context import context_for

    parser = argparse.ArgumentParser(prog="python -m components.pipeline.stored_pool", description=main.__doc__)
    parser.add_argument("task", help="a stored task folder or a task drop")
    parser.add_argument("--out", required=True, help="folder for <task_id>.safetensors and <task_id>.json")
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    task = load_task(args.task)
    ctx = context_for(config, load_backbone(config.model, frozen=True), task_prompts=task_prompts([task]))
    pool, stats = build_pool(task, ctx, PoolConfig.model_validate(config.method.settings), ctx.pool_engine)
    files = pool.save(args.out)
    print(json.dumps({"task_id": pool.task_id, "files": files, "img_per_s": stats.img_per_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
