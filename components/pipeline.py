"""The nightly pipeline's steps as plain functions: the Prefect flows in ``flows/`` only wrap these.

Every step takes the resolved config and JSON-able arguments and returns a JSON-able dict, so a step
can run in-process or as a flow run on another worker (arguments and results cross as data and
storage paths, never as Python objects). Steps are idempotent, so a rerun after a crash redoes nothing
that finished:

- ``build_pool`` and ``run_update`` write into content-addressed folders (the key is a digest of their
  inputs) and mark completion last with ``result.json``; a rerun that finds it returns it (a cache
  keyed by input digests, persisted as JSON, never pickle);
- ``register_update`` finds the run and the version logged for the same key before logging another;
- ``decide`` applies a review decision that was already applied as a no-op.

Consistency rules (contracts.md, "A task's life in the ledger"):

- the ledger moves ``validated|failed -> learning -> learned -> promoted|rejected``; a failure anywhere
  moves ``learning -> failed`` with the reason, and the champion alias is only ever moved by
  ``decide``/``rollback`` under the registry lock;
- ``reconcile`` runs first every night and makes the ledger agree with the registry: an alias moved by
  hand in the MLflow UI is honoured (the champion's chain is the truth), a rollback rejects the tasks it
  removed, a ``learning`` entry left by a dead process (we hold the chain lock, so nobody else is
  learning) becomes ``failed``;
- one nightly run per chain at a time: ``chain_lock`` is an OS file lock, released by the kernel when its
  process dies, so a crashed or killed run never blocks the next night (no zombie locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from components import storage
from components.config import Config
from components.ledger import Ledger, TaskRecord

REVIEWER_GATE = "cliploop-gate"
REVIEWER_AUTO = "cliploop-auto-promote"


class PipelineError(RuntimeError):
    pass


class ChainBusy(PipelineError):
    """Another run holds this chain (one nightly run per registered model at a time)."""


# ---- plumbing -----------------------------------------------------------------------------------------------


def _ledger(config: Config) -> Ledger:
    from components.ingestion import open_ledger

    return open_ledger(config)


def _registry(config: Config):
    from components.registry import from_config

    return from_config(config)


def _runtime(config: Config) -> Path:
    path = config.workspace_path / ".cliploop"
    path.mkdir(parents=True, exist_ok=True)
    return path


def code_version() -> str:
    """The cliploop version, plus the git commit of the code when it runs from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("cliploop")
    except PackageNotFoundError:
        release = "unknown"
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{release}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return release


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


@contextlib.contextmanager
def chain_lock(config: Config) -> Iterator[None]:
    """Hold the chain of ``mlflow.registered_model`` for one run; raises ChainBusy when another run holds it."""
    locks = _runtime(config) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"chain-{config.mlflow.registered_model}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ChainBusy(f"the chain {config.mlflow.registered_model!r} is being updated by {holder}; "
                            f"this run leaves it alone (lock: {path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: storage and registry hiccups, not bad data or bugs."""
    import sqlite3

    from components.registry import is_unavailable

    names = {type(e).__name__ for e in _causes(exc)}
    if names & {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "TimeoutError", "BrokenPipeError", "ConnectionResetError", "StorageError",
                "MaxRetryError", "RetryError", "ProtocolError", "RemoteDisconnected"}:
        return True
    for e in _causes(exc):
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return True
        if is_unavailable(e):
            return True
    return False


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# ---- discover and ingest ------------------------------------------------------------------------------------


def discover(config: Config) -> list[str]:
    """Task drops in the drop zone, in name (arrival) order; an absent local drop zone has none."""
    from components.ingestion import drop_locations

    zone = config.location(config.drop_zone)
    if not storage.is_s3(zone) and not Path(zone).is_dir():
        return []
    return drop_locations(zone, config)


def ingest(location: str, config: Config) -> dict[str, Any]:
    from components.ingestion import IngestRefused, ingest as ingest_drop

    started = time.perf_counter()
    try:
        outcome = ingest_drop(location, config)
    except IngestRefused as exc:
        return {"location": location, "task_id": None, "status": "refused", "state": None, "message": str(exc),
                "seconds": round(time.perf_counter() - started, 3)}
    return {"location": location, "task_id": outcome.task_id, "status": outcome.status, "state": outcome.state,
            "report": outcome.report_path, "message": outcome.message,
            "seconds": round(time.perf_counter() - started, 3)}


# ---- the chain ----------------------------------------------------------------------------------------------


def chain_tasks(registry, version: int | None) -> list[str]:
    """Task ids learned along a version's chain (its parent tags), oldest first."""
    out, seen = [], set()
    while version is not None and version not in seen:
        seen.add(version)
        tags = registry.version_tags(version)
        out.append(tags.get("task_id"))
        parent = tags.get("parent_version", "")
        version = int(parent) if str(parent).isdigit() else None
    return [t for t in reversed(out) if t]


def reconcile(config: Config) -> list[str]:
    """Make the ledger agree with the registry before a night starts; returns what changed, one line each."""
    registry = _registry(config)
    champion = registry.alias("champion")
    in_chain = set(chain_tasks(registry, champion))
    changes = []
    with _ledger(config) as ledger:
        for record in ledger.all():
            if record.state == "learning":
                ledger.transition(record.task_id, "failed", expect=["learning"], reason="interrupted: the run "
                                  "learning it stopped without finishing (process or machine died)",
                                  detail={"by": "reconcile"})
                changes.append(f"{record.task_id}: learning -> failed (interrupted run)")
            elif record.state == "learned" and record.task_id in in_chain:
                ledger.transition(record.task_id, "promoted", expect=["learned"],
                                  detail={"by": "reconcile", "why": f"champion v{champion} contains it"})
                changes.append(f"{record.task_id}: learned -> promoted (champion v{champion} was set in the registry)")
            elif record.state == "learned" and record.model_version:
                tags = _tags_or_none(registry, record.model_version)
                review = (tags or {}).get("review")
                parent = (tags or {}).get("parent_version", "")
                if review in ("rejected", "rolled-back"):
                    ledger.transition(record.task_id, "rejected", expect=["learned"], reason=tags.get("review_note"),
                                      detail={"by": "reconcile"})
                    changes.append(f"{record.task_id}: learned -> rejected (review of v{record.model_version})")
                elif tags is None or parent != (str(champion) if champion is not None else ""):
                    # Learned on top of a model that is no longer the champion: learn it again on the new one,
                    # unless a reviewer decided on it (or the champion moved) since we read it.
                    if tags is not None and review in ("pending", "timed-out") and not registry.supersede(
                            int(record.model_version), {"review": review, "champion": champion}):
                        continue
                    ledger.transition(record.task_id, "validated", expect=["learned"],
                                      reason=f"re-queued: v{record.model_version} was learned on v{parent or 'base'}, "
                                             f"the champion is now v{champion}", detail={"by": "reconcile"})
                    changes.append(f"{record.task_id}: learned -> validated (champion moved; learn it again)")
            elif record.state == "promoted" and record.task_id not in in_chain:
                ledger.transition(record.task_id, "rejected", expect=["promoted"],
                                  reason=f"rolled back: champion v{champion} does not contain it",
                                  detail={"by": "reconcile"})
                changes.append(f"{record.task_id}: promoted -> rejected (not in champion v{champion}'s chain)")
    return changes


def _tags_or_none(registry, version) -> dict[str, str] | None:
    """The version's tags; None only when it does not exist (deleted by hand). An outage raises: a night
    must never read "the registry did not answer" as "the version is gone"."""
    from components.registry import NotFound

    try:
        return registry.version_tags(int(version))
    except NotFound:
        return None


def awaiting_review(config: Config) -> list[dict[str, Any]]:
    """Learned tasks whose version still waits for a reviewer and still extends the champion."""
    registry = _registry(config)
    champion = registry.alias("champion")
    out = []
    with _ledger(config) as ledger:
        for record in ledger.all():
            if record.state != "learned" or not record.model_version:
                continue
            tags = _tags_or_none(registry, record.model_version) or {}
            if tags.get("parent_version", "") == (str(champion) if champion is not None else ""):
                out.append({"task_id": record.task_id, "version": int(record.model_version),
                            "gate": tags.get("gate"), "review": tags.get("review")})
    return out


def pending_tasks(config: Config) -> list[str]:
    """Tasks to learn tonight, in arrival order: validated ones, and failed ones (tried again)."""
    with _ledger(config) as ledger:
        return [r.task_id for r in sorted(ledger.all(), key=lambda r: r.seq) if r.state in ("validated", "failed")]


def head(config: Config) -> dict[str, Any]:
    """The version the next update starts from (the champion, whoever set it) and its tasks."""
    registry = _registry(config)
    champion = registry.alias("champion")
    return {"version": champion, "tasks": chain_tasks(registry, champion)}


def parent_state(config: Config, version: int | None):
    """The learner state of ``version`` (downloaded once into the workspace, checksums verified on load)."""
    from components.state import LearnerState

    if version is None:
        return None
    folder = _runtime(config) / "states" / f"v{version}"
    if not (folder / "state" / "manifest.json").is_file():
        tmp = folder.with_name(f".v{version}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _registry(config).download_state(version, tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    return LearnerState.load(folder / "state")


# ---- build_pool ---------------------------------------------------------------------------------------------


def _record(config: Config, task_id: str) -> TaskRecord:
    with _ledger(config) as ledger:
        record = ledger.get(task_id)
    if record is None:
        raise PipelineError(f"task {task_id!r} is not in the ledger (ingest it first)")
    return record


def pool_key(config: Config, record: TaskRecord) -> str:
    return _digest({"task": record.task_id, "dvc_md5": record.dvc_md5, "content": record.content_digest,
                    "model": config.model.model_dump(mode="json"), "method": config.method.model_dump(mode="json"),
                    "templates": config.evaluation.templates})


def builds_pools(config: Config) -> bool:
    """Pools are built as their own step when the configured method says it builds per-task pools."""
    from components.methods import get_method

    return get_method(config.method.name).builds_pools


def build_pool(config: Config, task_id: str) -> dict[str, Any]:
    """One task's pool, built by the configured method from the base encoder, in a folder keyed by its
    inputs' digest."""
    from components.data import load_task
    from components.learn import make_method
    from components.methods.base import context_for, task_prompts
    from components.models import load_backbone
    from components.pools import TaskPool

    folder = pool_dir(config, task_id)
    key = folder.name
    done = folder / "result.json"
    if done.is_file():
        TaskPool.load(folder, task_id)  # verifies the checksum: a damaged cache entry is rebuilt
        return json.loads(done.read_text()) | {"cached": True}
    method = make_method(config)
    if not method.builds_pools:
        raise PipelineError(f"method {method.name} builds no per-task pools")
    started = time.perf_counter()
    backbone = load_backbone(config.model)
    task = load_task(str(config.workspace_path / "data" / "tasks" / task_id))
    pool, stats = method.build_pool(task, context_for(config, backbone, task_prompts=task_prompts([task])))
    pool.save(folder)
    result = {"task_id": task_id, "key": key, "pool_dir": str(folder), "img_per_s": stats.img_per_s,
              "seconds": round(time.perf_counter() - started, 3), "host": os.uname().nodename, "pid": os.getpid(),
              "parent_pid": os.getppid()}
    storage.atomic_write_text(done, json.dumps(result, indent=2))
    return result | {"cached": False}


# ---- train + evaluate ---------------------------------------------------------------------------------------


def pool_dir(config: Config, task_id: str) -> Path:
    """Where a task's pool is built (its ``result.json`` marks it complete), keyed by the inputs' digest."""
    return _runtime(config) / "pools" / pool_key(config, _record(config, task_id))


def update_dir(config: Config, task_id: str, parent_version: int | None) -> Path:
    """Where one update's results land (its ``result.json`` marks it complete), keyed by the inputs' digest."""
    return _runtime(config) / "runs" / update_key(config, task_id, parent_version)


def update_key(config: Config, task_id: str, parent_version: int | None) -> str:
    from components.registry import run_key

    record = _record(config, task_id)
    return run_key(parent_version, task_id, record.dvc_md5, config.sha256())


def _move(config: Config, task_id: str, allowed: tuple[str, ...], target: str, refusal: str,
          fields=lambda record: {}) -> dict[str, Any]:
    """Move a task from one of ``allowed`` states to ``target`` atomically, or say why it cannot.

    ``fields``: the record -> the ledger fields to set with the transition (returned too)."""
    with _ledger(config) as ledger:
        record = ledger.get(task_id)
        if record is None:
            raise PipelineError(f"task {task_id!r} is not in the ledger")
        if record.state not in allowed:
            raise PipelineError(f"task {task_id} is {record.state}; {refusal}")
        values = fields(record)
        ledger.transition(task_id, target, expect=[record.state], **values)
    return values


def start_learning(config: Config, task_id: str) -> dict[str, Any]:
    values = _move(config, task_id, ("validated", "failed"), "learning", "it is not waiting to be learned",
                   lambda r: {"attempts": r.attempts + 1 if r.state == "failed" else r.attempts, "reason": None})
    return {"task_id": task_id, "attempts": values["attempts"]}


def mark_failed(config: Config, task_id: str, reason: str) -> None:
    with _ledger(config) as ledger:
        record = ledger.get(task_id)
        if record is not None and record.state == "learning":
            ledger.transition(task_id, "failed", expect=["learning"], reason=reason[:2000])


def interrupted(config: Config, signum: int) -> list[str]:
    """The night was stopped by a signal and did not unwind: its ``learning`` tasks become ``failed``."""
    import signal

    name = signal.Signals(signum).name
    changed = []
    with _ledger(config) as ledger:
        for record in ledger.all():
            if record.state == "learning":
                ledger.transition(record.task_id, "failed", expect=["learning"],
                                  reason=f"interrupted by {name}: the night was stopped before this task finished")
                changed.append(record.task_id)
    return changed


def run_update(config: Config, task_id: str, parent_version: int | None,
               pools: dict[str, str] | None = None) -> dict[str, Any]:
    """Train + evaluate one task on top of ``parent_version`` into ``runs/<key>/`` (reused when complete)."""
    from components import learn
    from components.state import LearnerState

    out = update_dir(config, task_id, parent_version)
    key = out.name
    done = out / "result.json"
    if done.is_file():
        LearnerState.load(out / "state")  # verifies every checksum of the cached state
        return json.loads(done.read_text()) | {"cached": True}
    tmp = out.with_name(f".{key}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    parent = parent_state(config, parent_version)
    # Training checkpoints live beside the run, under its key, so a rerun after a crash resumes from them.
    checkpoints = _runtime(config) / "checkpoints" / key
    result = learn.learn_step(str(config.workspace_path / "data" / "tasks" / task_id), config, parent, out_dir=tmp,
                              pools=pools, checkpoint_dir=checkpoints)
    final = result.matrix.matrix[-1]
    doc = {"task_id": task_id, "run_key": key, "parent_version": parent_version, "out_dir": str(out),
           "metrics": result.metrics, "final_row": dict(zip(result.matrix.tasks, final)),
           "timings": result.timings.to_dict() | {"peak_mem_mb": _peak_memory_mb()}, "method": config.method.name,
           "config_sha256": config.sha256()}
    storage.atomic_write_text(tmp / "result.json", json.dumps(doc, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
    return doc | {"cached": False}


def _peak_memory_mb() -> float:
    """Peak GPU memory of this process when it used CUDA, else its peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---- register + gate ----------------------------------------------------------------------------------------


def register_update(config: Config, update: dict[str, Any], flow_run_id: str | None = None) -> dict[str, Any]:
    """An MLflow run and a model version (alias challenger) for a finished update; idempotent by its key."""
    started = time.perf_counter()
    registry = _registry(config)
    task_id, key = update["task_id"], update["run_key"]
    record = _record(config, task_id)
    existing = registry.find_version(key)
    if existing is not None:  # registered by an earlier attempt; register() resumes what it left undone
        run_id = existing.run_id
        version = registry.register(run_id, key, {})
        if not registry.has_artifact(run_id, "lineage.json"):
            _log_lineage(config, registry, version, run_id)
    else:
        run = registry.find_run(key)
        tags = {"task_id": task_id, "method": config.method.name, "run_key": key,
                "parent_version": "" if update["parent_version"] is None else str(update["parent_version"]),
                "dvc_md5": record.dvc_md5 or "", "workspace_commit": record.workspace_commit or "",
                "config_sha256": config.sha256(), "code_version": code_version(), "flow_run_id": flow_run_id or "",
                "scenario": record.scenario or "", "content_digest": record.content_digest}
        if run is None:
            registry.fail_abandoned_runs(key)  # we register this key now: a RUNNING run of it is a dead one
            out = Path(update["out_dir"])
            extra = {}
            if record.report and Path(record.report).exists():
                extra["validation"] = Path(record.report)
            params = _flatten(config.model_dump(mode="json"))
            params.update({f"timing.{k}": v for k, v in update.get("timings", {}).items()})
            metrics = dict(update["metrics"])
            timings = update.get("timings", {})
            if timings.get("pool_img_per_s"):
                metrics["perf.pool_img_per_s"] = timings["pool_img_per_s"]
            if timings.get("peak_mem_mb"):
                metrics["perf.peak_mem_mb"] = timings["peak_mem_mb"]
            if timings.get("train_step_ms"):
                metrics["perf.train_step_ms"] = timings["train_step_ms"]
            run_id = registry.log_update(out, task_id, metrics, update["final_row"], params, tags, extra)
            registry.log_task_dataset(run_id, task_id, record.dvc_md5 or record.content_digest,
                                      {"dvc_md5": record.dvc_md5, "path": f"data/tasks/{task_id}",
                                       "workspace": str(config.workspace_path), "commit": record.workspace_commit})
        else:
            run_id = run.info.run_id
        version = registry.register(run_id, key, {k: v for k, v in tags.items() if k != "run_key"} | {"review": "pending"})
        _log_lineage(config, registry, version, run_id)
    with _ledger(config) as ledger:
        current = ledger.get(task_id)
        if current.state == "learning":
            ledger.transition(task_id, "learned", expect=["learning"], model_version=str(version))
        elif current.model_version != str(version):
            ledger.update(task_id, model_version=str(version))
    return {"task_id": task_id, "version": version, "run_id": run_id, "run_key": key,
            "seconds": round(time.perf_counter() - started, 3)}


def _log_lineage(config: Config, registry, version: int, run_id: str) -> None:
    """The version's lineage record as the run's ``lineage.json`` (what an auditor reads in the MLflow UI)."""
    from components.lineage import build_lineage

    record = build_lineage(registry, version, config.workspace_path, verify=False)
    registry.log_json(run_id, record, "lineage.json")


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def champion_row(registry, exclude: int | None = None) -> dict[str, float] | None:
    """The champion's accuracy per task (its run's ``acc.<task>`` metrics)."""
    champion = registry.alias("champion")
    if champion is None or champion == exclude:
        return None
    metrics = registry.run_metrics(champion)
    return {k[len("acc."):]: v for k, v in metrics.items() if k.startswith("acc.")}


def apply_gate(config: Config, version: int, update: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict as version tags; a failing version is rejected (its task can be re-queued)."""
    from components.gate import evaluate_gate

    registry = _registry(config)
    verdict = evaluate_gate(config.gate, update["metrics"], update["final_row"], update["task_id"],
                            champion_row(registry, exclude=version))
    registry.set_tags(version, {"gate": verdict.verdict, "gate_reasons": json.dumps(verdict.reasons)})
    doc = verdict.to_dict() | {"version": version, "markdown": verdict.markdown(f"Promotion gate, version {version}")}
    if not verdict.passed:
        decide(config, version, "reject", REVIEWER_GATE, "; ".join(verdict.reasons))
    return doc


# ---- review -------------------------------------------------------------------------------------------------


def decide(config: Config, version: int, decision: str, reviewer: str, note: str = "",
           override_gate: bool = False) -> dict[str, Any]:
    """Apply a review decision (``approve`` or ``reject``) to a version and its task; a repeat is a no-op.

    The decision is made on what is read here and applied as a compare-and-set under the registry lock: if
    another reviewer, the gate or a rollback changed the version's review or the champion in between, it
    raises ``PipelineError`` saying so and changes nothing (two reviewers racing never both "win")."""
    from components.faults import fault_point
    from components.registry import DecisionConflict, RegistryError

    if decision not in ("approve", "reject"):
        raise PipelineError(f"unknown decision {decision!r} (approve or reject)")
    if not reviewer:
        raise PipelineError("a decision needs a reviewer name")
    registry = _registry(config)
    tags = _tags_or_none(registry, version)
    if tags is None:
        raise PipelineError(f"model {registry.model_name!r} has no version {version}")
    task_id, review = tags.get("task_id"), tags.get("review")
    champion = registry.alias("champion")
    expect = {"review": review, "champion": champion}
    if decision == "approve":
        if champion == version:
            return {"version": version, "decision": "approve", "changed": False, "previous": None}
        if tags.get("gate") == "fail" and not override_gate:
            raise PipelineError(f"version {version} failed the gate ({tags.get('gate_reasons')}); "
                                f"approve it anyway with --override-gate")
        gate_only = review == "rejected" and tags.get("reviewer") == REVIEWER_GATE and override_gate
        if review in ("rejected", "rolled-back", "superseded") and not gate_only:
            raise PipelineError(f"version {version} was {review} by {tags.get('reviewer') or 'someone'}"
                                f"{': ' + tags['review_note'] if tags.get('review_note') else ''}; it cannot be "
                                f"approved. `cliploop requeue {task_id}` learns the task again on the champion.")
        parent = tags.get("parent_version", "")
        if parent != (str(champion) if champion is not None else ""):
            raise PipelineError(f"version {version} was learned on top of v{parent or ' (base model)'} but the "
                                f"champion is now {'v' + str(champion) if champion else 'unset'}: promoting it would "
                                f"drop what the champion learned since. The next night learns task {task_id} again "
                                f"on the champion (or run `cliploop requeue {task_id}`).")
        fault_point("after_decision_read")
        try:
            previous = registry.promote(version, reviewer, note, expect=expect)
        except DecisionConflict as exc:
            raise PipelineError(f"approval of version {version} lost a race: {exc}") from None
        registry.set_tags(version, {"review_at": _now()})
        _ledger_after_review(config, task_id, version, "promoted", note)
        return {"version": version, "decision": "approve", "changed": True, "previous": previous}
    if review == "rejected":
        return {"version": version, "decision": "reject", "changed": False}
    fault_point("after_decision_read")
    try:
        registry.reject(version, reviewer, note, expect=expect)
    except DecisionConflict as exc:
        raise PipelineError(f"rejection of version {version} lost a race: {exc}") from None
    except RegistryError as exc:
        raise PipelineError(str(exc)) from None
    registry.set_tags(version, {"review_at": _now()})
    _ledger_after_review(config, task_id, version, "rejected", note)
    return {"version": version, "decision": "reject", "changed": True}


def _now() -> str:
    from components.ledger import now

    return now()


def _ledger_after_review(config: Config, task_id: str | None, version: int, to_state: str, note: str) -> None:
    if not task_id:
        return
    with _ledger(config) as ledger:
        record = ledger.get(task_id)
        # A gate-rejected version approved with --override-gate moves its task from rejected.
        sources = ["learned", "rejected"] if to_state == "promoted" else ["learned"]
        if record is not None and record.state in sources and record.model_version == str(version):
            ledger.transition(task_id, to_state, expect=sources, reason=note or None,
                              detail={"version": version})


def review_requested(config: Config, version: int) -> None:
    """The version waits for a reviewer (tagged ``pending``: a wait resumed on a later night finds it)."""
    _registry(config).set_review_if(version, "pending", (None, "pending", "timed-out"))


def review_outcome(config: Config, version: int) -> str:
    """promoted | rejected | awaiting-review, from the version's review tag."""
    review = _registry(config).version_tags(version).get("review")
    return {"approved": "promoted", "rejected": "rejected"}.get(review, "awaiting-review")


def review_timed_out(config: Config, version: int) -> bool:
    """No decision came in time: the version stays challenger, tagged ``timed-out``. False if decided meanwhile."""
    return _registry(config).set_review_if(version, "timed-out", (None, "pending"))


def rollback(config: Config, reviewer: str, note: str = "", expect_champion: int | None = None) -> dict[str, Any]:
    """previous-champion becomes champion again; the tasks only the demoted version knew become rejected."""
    from components.registry import RegistryError

    registry = _registry(config)
    try:
        restored, demoted = registry.rollback(reviewer, note, expect_champion=expect_champion)
    except RegistryError as exc:
        raise PipelineError(str(exc)) from None
    registry.set_tags(demoted, {"review_at": _now()})
    changes = reconcile(config)
    return {"restored": restored, "demoted": demoted, "ledger": changes}


def requeue(config: Config, task_id: str) -> dict[str, Any]:
    """A rejected task (or a learned one whose version went stale) is learned again next night."""
    _move(config, task_id, ("rejected", "learned"), "validated", "only rejected or learned tasks can be re-queued",
          lambda r: {"reason": "re-queued by an operator"})
    return {"task_id": task_id, "state": "validated"}
