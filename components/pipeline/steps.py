"""The night's steps that do the work, as plain functions the Prefect flows in ``flows/`` wrap: discover and
ingest drops, build a task's pool, learn a task on top of a parent version (train + evaluate), register the
result in MLflow (``registration``).

Every step takes the resolved config and JSON-able arguments and returns a JSON-able dict, so it can run
in-process or as a flow run on another worker (arguments and results cross as data and storage paths,
never as Python objects). Steps are idempotent, so a rerun after a crash redoes nothing that finished:

- ``build_pool`` and ``run_update`` write into content-addressed folders (the key is a digest of their
  inputs) and mark completion last with ``result.json``; a rerun that finds it returns it (a cache keyed by
  input digests, persisted as JSON, never pickle). Each run of them is an attempt that owns the key
  (``components/support/fencing.py``): one that another attempt superseded writes nothing more under it;
- registering the result is ``components/pipeline/registration.py``.

The chain's state (ledger moves) lives in ``components/pipeline/chain.py``, the gate and review in
``components/pipeline/review.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from components.intake.ledger import TaskRecord
from components.pipeline import step_io
from components.pipeline.chain import PipelineError, registry_of, runtime_dir, task_record
from components.settings.config import Config
from components.support import fencing, storage
from components.support.faults import fault_point


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---- discover and ingest ------------------------------------------------------------------------------------


def discover(config: Config) -> list[str]:
    """Task drops in the drop zone, in name (arrival) order; an absent local drop zone has none."""
    from components.intake.ingestion import drop_locations

    zone = config.location(config.drop_zone)
    if not storage.is_s3(zone) and not Path(zone).is_dir():
        return []
    return drop_locations(zone, config)


def ingest(location: str, config: Config) -> dict[str, Any]:
    from components.intake.ingestion import IngestRefused
    from components.intake.ingestion import ingest as ingest_drop
    from components.pipeline.label_scoring import champion_scorer

    started = time.perf_counter()
    try:
        outcome = ingest_drop(location, config, scorer=champion_scorer(config))
    except IngestRefused as exc:
        return {
            "location": location,
            "task_id": None,
            "status": "refused",
            "state": None,
            "message": str(exc),
            "seconds": round(time.perf_counter() - started, 3),
        }
    return {
        "location": location,
        "task_id": outcome.task_id,
        "status": outcome.status,
        "state": outcome.state,
        "report": outcome.report_path,
        "message": outcome.message,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- the chain ----------------------------------------------------------------------------------------------


def parent_state(config: Config, version: int | None):
    """The learner state of ``version`` (downloaded once into the workspace; every use checked against the
    digests pinned in the registry, then the bundle's own checksums on load)."""
    from components.model.state import LearnerState

    if version is None:
        return None
    store = step_io.store_of(config)
    if store.remote:  # a worker keeps it in its own cache (keyed by registry and model), never in the workspace
        base = store.cache / "states" / _digest([registry_of(config).tracking_uri, config.mlflow.registered_model])
    else:
        base = runtime_dir(config) / "states"
    folder = base / f"v{version}"
    registry = registry_of(config)
    if not (folder / "state" / "manifest.json").is_file():
        tmp = folder.with_name(f".v{version}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        registry.download_state(version, tmp)  # checked against the digests the registry pinned
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    else:  # kept from an earlier night: still what the registry pinned
        from components.registry.model_pins import verify_state

        verify_state(registry, version, folder / "state")
    return LearnerState.load(folder / "state")


# ---- build_pool ---------------------------------------------------------------------------------------------


def pool_key(config: Config, record: TaskRecord) -> str:
    from components.model.data import decoder_key  # pixels depend on the decoder: a pool decoded otherwise is another
    from components.model.pool_engine import REDUCE  # sums added per shard in shard order (engine-independent)

    identity = config.identity()  # no workspace path: a moved workspace keeps its pools
    return _digest(
        {
            "task": record.task_id,
            "dvc_md5": record.dvc_md5,
            "content": record.content_digest,
            "model": identity["model"],
            "method": identity["method"],
            "templates": config.evaluation.templates,
            "decoder": decoder_key(config.model),
            "reduce": REDUCE,
        }
    )


def builds_pools(config: Config) -> bool:
    """Pools are built as their own step when the configured method says it builds per-task pools."""
    from components.methods import get_method

    return get_method(config.method.name).builds_pools


def build_pool(
    config: Config, task_id: str, key: str | None = None, address: dict | None = None, attempt: str | None = None
) -> dict[str, Any]:
    """One task's pool, built by the configured method from the base encoder, in a folder keyed by its
    inputs' digest. A worker is handed the ``key``, the task's DVC ``address`` (see :func:`addresses`): it reads
    neither the ledger nor the workspace's copy of the data (``components/pipeline/step_io.py``), and the ``attempt``
    that its dispatcher made the key's owner (none: this call takes the key over itself)."""
    from components.methods.base import task_prompts
    from components.model.backbones import load_backbone
    from components.model.data import load_task
    from components.model.embedding_cache import for_config
    from components.model.pools import TaskPool
    from components.training.learn import make_method
    from components.training.run_context import context_for, engine_for

    store = step_io.store_of(config)
    key = key or pool_key(config, task_record(config, task_id))
    done = store.result("pools", key)
    held = None if done is not None else _attempt_of(store, "pools", key, attempt)
    if held is None:
        done = done or store.result("pools", key)
        if not store.remote:
            TaskPool.load(Path(store.root) / "pools" / key, task_id)  # verifies the checksum of the cached pool
        return done | {"pool_dir": step_io.place(store, "pools", key), "cached": True}  # here, wherever it was made
    method = make_method(config)
    if not method.builds_pools:
        raise PipelineError(f"method {method.name} builds no per-task pools")
    started = time.perf_counter()
    backbone = load_backbone(config.model, frozen=True)  # pools come from the frozen base encoder
    task = load_task(step_io.locator(config, {task_id: address} if address else None)(task_id))
    fault_point("during_pool_build")
    engine = engine_for(config, {task_id: address} if address else None)  # Ray actors fetch by address too
    ctx = context_for(
        config, backbone, task_prompts=task_prompts([task]), embedding_cache=for_config(config), pool_engine=engine
    )
    pool, stats = method.build_pool(task, ctx)  # the train split's embeddings go to the cache for later pools
    folder = store.staging("pools", key, held)
    shutil.rmtree(folder, ignore_errors=True)
    pool.save(folder)
    result = {
        "task_id": task_id,
        "key": key,
        "img_per_s": stats.img_per_s,
        "seconds": round(time.perf_counter() - started, 3),
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
    }
    store.publish(folder, "pools", key, result, held)  # result.json last: the pool is complete
    return result | {"attempt": held.id, "pool_dir": step_io.place(store, "pools", key), "cached": False}


# ---- train + evaluate ---------------------------------------------------------------------------------------


def task_pool_key(config: Config, task_id: str) -> str:
    """The key of a stored task's pool under this config (read from the ledger: the orchestrator's side)."""
    return pool_key(config, task_record(config, task_id))


def update_key(config: Config, task_id: str, parent_version: int | None) -> str:
    from components.model.data import decoder_key
    from components.registry.registry import run_key

    record = task_record(config, task_id)
    # The decoder as resolved (auto's rule names cliploop's default Pillow decoder): evaluation's pixels depend on it.
    return run_key(parent_version, task_id, record.dvc_md5, f"{config.sha256()}+{decoder_key(config.model)}")


def run_update(
    config: Config,
    task_id: str,
    parent_version: int | None,
    pools: dict[str, str] | None = None,
    key: str | None = None,
    addresses: dict[str, dict] | None = None,
    attempt: str | None = None,
) -> dict[str, Any]:
    """Train + evaluate one task on top of ``parent_version`` into ``runs/<key>/`` (reused when complete).
    A worker is handed the ``key``, the DVC ``addresses`` of this task and every learned one, and the
    ``attempt`` that its dispatcher made the key's owner (none: this call takes the key over itself). Every
    checkpoint and result file is written only while the attempt owns the key (else ``fencing.Superseded``)."""
    from components.registry import version_tensors
    from components.training import learn

    store = step_io.store_of(config)
    key = key or update_key(config, task_id, parent_version)
    done = store.result("runs", key)
    held = None if done is not None else _attempt_of(store, "runs", key, attempt)
    if held is None:  # complete, perhaps by the attempt that this one just found done
        done = done or store.result("runs", key)
        if not store.remote:
            version_tensors.check_step(config, Path(store.root) / "runs" / key / "state")  # every checksum, blobs too
        return done | {"out_dir": step_io.place(store, "runs", key), "cached": True}  # here, wherever it was made
    fault_point("after_claim")
    work = store.staging("runs", key, held)
    shutil.rmtree(work, ignore_errors=True)
    # Training checkpoints live under the run's key, so a rerun after a crash resumes from them; with an
    # object store they are mirrored there too, and a rerun on another worker starts from the latest.
    checkpoints = (store.cache if store.remote else runtime_dir(config)) / "checkpoints" / key
    try:
        parent = parent_state(config, parent_version)
        store.pull_checkpoints(key, checkpoints, held)
        locate = step_io.locator(config, addresses)
        pools = {t: str(step_io.local(store, place)) for t, place in (pools or {}).items()}
        result = learn.learn_step(
            locate(task_id),
            config,
            parent,
            out_dir=work,
            pools=pools,
            checkpoint_dir=checkpoints,
            checkpoint_saved=(lambda folder: store.push_checkpoint(key, folder, held)) if store.remote else None,
            fence=held.check,
            locate=locate,
            addresses=addresses,
        )
        version_tensors.externalize_step(config, work / "state")  # tensors stored once, as blobs (docs/storage.md)
    except BaseException:  # the attempt's own folder: no other attempt finishes it
        shutil.rmtree(work, ignore_errors=True)
        raise
    final = result.matrix.matrix[-1]
    doc = {
        "task_id": task_id,
        "run_key": key,
        "parent_version": parent_version,
        "metrics": result.metrics,
        "final_row": dict(zip(result.matrix.tasks, final)),
        "timings": result.timings.to_dict() | {"peak_mem_mb": _peak_memory_mb()},
        "method": config.method.name,
        "config_sha256": config.sha256(),
        "host": os.uname().nodename,
        "parent_pid": os.getppid(),  # under a process worker: the worker that ran the step
    }
    store.publish(work, "runs", key, doc, held)  # complete by this attempt alone, result.json last
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    store.drop_checkpoints(key)
    return doc | {"attempt": held.id, "out_dir": step_io.place(store, "runs", key), "cached": False}


def _attempt_of(store, kind: str, key: str, attempt: str | None) -> fencing.Attempt | None:
    """This call's hold on ``kind/key``: the attempt it was handed (checked to own the key), or a new one that
    supersedes whatever attempt came before (in-process, no one else dispatches it); None: the step is done."""
    return store.hold(kind, key, attempt) if attempt else store.claim(kind, key)


def _peak_memory_mb() -> float:
    """Peak GPU memory of this process when it used CUDA, else its peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
