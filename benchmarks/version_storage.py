"""Bytes stored per registered version, per method, on the demo chain, as JSON (docs/storage.md, "Tensors stored
once"; docs/benchmarks.md).

    .venv/bin/python benchmarks/version_storage.py                          # every method that trains, 3 tasks
    .venv/bin/python benchmarks/version_storage.py --methods lwf,gnsp --tasks 2

For each method, a fresh workspace (embedded MLflow, the artifact store in its own folder) learns the demo's
tasks (``components/scenarios/demo.py``: digits 0-4, digits 5-9, chalk digits) with the demo's base model, each
through the pipeline's own steps (train + evaluate, register, approve: the next task learns on top of it), with a
short schedule (``--iterations``): what is measured is what is stored, not how well it learns. Per version:

  ``blob_bytes``         tensor blobs this version added to the artifact store (``tensors/``);
  ``changed_bytes``      the bytes of the tensors the method changed: those whose digest differs from the parent's
                         (the first version's parent is the base model);
  ``ratio``              blob_bytes / changed_bytes (target: <= 1.05; null when nothing changed);
  ``json_bytes``         the version's tensor manifests and the rest of its bundle's JSON, in the step's results and
                         in the MLflow model, reported apart;
  ``other_bytes``        the rest of what the version added: the step's evaluation files, and the MLflow model's code,
                         environment and config files;
  ``whole_bundle_bytes`` the size of the bundle's safetensors files, which the layout before blobs stored twice.

``no_tensor_stored_twice``: every blob's name is its SHA-256 (so one file per digest), and no safetensors file
outside ``tensors/`` (in the artifact store or the MLflow artifacts) holds a tensor that is also a blob. The
workspace's own caches (the kept parent state in ``.cliploop/states/``) are a machine's copies, not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.05


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _blobs(store) -> dict[str, int]:
    return {digest: size for digest, size, _ in store.listing()}


def _changed_bytes(docs: dict, parent_docs: dict) -> int:
    """Bytes of the tensors whose digest differs from the parent's (the same file and name); a tensor the manifest
    takes from the base model is the parent's when the parent is the base (no parent manifests)."""
    total = 0
    for rel, doc in docs.items():
        before = parent_docs.get(rel, {}).get("tensors", {})
        for name, entry in doc["tensors"].items():
            same = before[name]["digest"] == entry["digest"] if name in before else bool(entry.get("base"))
            if not same:
                total += entry["bytes"]
    return total


def _version_row(version: int, step: Path, model: Path, added: dict[str, int], docs: dict, parent: dict) -> dict:
    from components.registry.tensor_store import SUFFIX

    step_files, model_files = _files(step), _files(model)
    manifests = sum(
        s for f, s in {**_prefixed(step_files, "s"), **_prefixed(model_files, "m")}.items() if f.endswith(SUFFIX)
    )
    state_json = sum(s for f, s in step_files.items() if f.startswith("state/") and not f.endswith(SUFFIX))
    state_json += sum(s for f, s in model_files.items() if f.startswith("artifacts/state/") and not f.endswith(SUFFIX))
    everything = sum(step_files.values()) + sum(model_files.values())
    blob_bytes, changed = sum(added.values()), _changed_bytes(docs, parent)
    ratio = round(blob_bytes / changed, 4) if changed else None
    return {
        "version": version,
        "blob_bytes": blob_bytes,
        "blobs_added": len(added),
        "changed_bytes": changed,
        "ratio": ratio,
        "meets_target": (ratio <= TARGET) if ratio is not None else blob_bytes == 0,
        "json_bytes": {"tensor_manifests": manifests, "bundle_json": state_json},
        "other_bytes": everything - manifests - state_json,
        "whole_bundle_bytes": sum(doc["size"] for doc in docs.values()),
        "tensors": sum(len(doc["tensors"]) for doc in docs.values()),
    }


def _prefixed(files: dict[str, int], tag: str) -> dict[str, int]:
    return {f"{tag}:{k}": v for k, v in files.items()}


def stored_twice(store_root: Path, mlartifacts: Path, store) -> list[str]:
    """Tensors kept in two places: a blob whose bytes are not its name, or a safetensors file outside ``tensors/``
    whose tensors are blobs too."""
    from components.registry import tensor_store

    problems = []
    for digest, _ in _blobs(store).items():
        if hashlib.sha256(Path(store.name(digest)).read_bytes()).hexdigest() != digest:
            problems.append(f"blob {digest}: its bytes have another digest")
    blobs = set(_blobs(store))
    for root in (store_root, mlartifacts):
        for path in sorted(root.rglob("*.safetensors")):
            if (store_root / "tensors") in path.parents:
                continue
            data = path.read_bytes()
            _, header, start = tensor_store.read_header(data, str(path))
            for name, lo, hi in tensor_store.layout(header, len(data) - start, str(path)):
                blob = tensor_store.encode_blob(
                    header[name]["dtype"], header[name]["shape"], data[start + lo : start + hi]
                )
                if hashlib.sha256(blob).hexdigest() in blobs:
                    problems.append(f"{path}: tensor {name} is also a blob")
    return problems


def run_method(method: str, root: Path, drops: list[Path], model: list[str], args) -> dict:
    from components.intake.workspace import ensure_workspace
    from components.pipeline import chain, registration, review, steps
    from components.registry import model_pins, tensor_store
    from components.registry.registry import from_config
    from components.registry.version_tensors import blob_store
    from components.settings.config_loading import load_config

    ws, store_root = root / method / "ws", root / method / "store"
    sets = [
        f"workspace={ws}",
        f"drop_zone={root / 'drops'}",
        f"artifacts.root={store_root}",
        *model,
        f"method.name={method}",
        f"method.settings.iterations={args.iterations}",
        f"method.settings.batch_size={args.batch}",
        "gate.max_forgetting=100",
        "gate.min_new_task_accuracy=0",
        "orchestration.retry_delay_s=0",
    ]
    from components.methods import get_method

    settings = get_method(method).Settings()
    sets += [f"method.settings.{name}=0" for name in getattr(settings, "step_intervals", {}) if name == "warmup_steps"]
    sets += [f"method.settings.{name}=1" for name in getattr(settings, "step_intervals", {}) if name != "warmup_steps"]
    cfg = load_config(overrides=sets, env={}, cwd=root)
    ensure_workspace(cfg)
    for location in sorted(steps.discover(cfg)):
        steps.ingest(location, cfg)
    store, rows, parent_docs, started = blob_store(cfg), [], {}, time.perf_counter()
    registry = from_config(cfg)
    for drop in drops:
        task_id = drop.name
        chain.reconcile(cfg)
        parent = chain.head(cfg)["version"]
        chain.start_learning(cfg, task_id)
        before = _blobs(store)
        pools = {task_id: steps.build_pool(cfg, task_id)["pool_dir"]} if steps.builds_pools(cfg) else {}
        update = steps.run_update(cfg, task_id, parent, pools)
        version = registration.register_update(cfg, update)["version"]
        review.apply_gate(cfg, version, update)
        review.decide(cfg, version, "approve", "benchmark", override_gate=True)
        added = {d: s for d, s in _blobs(store).items() if d not in before}
        mv = registry.model_version(version)
        model_dir = Path(model_pins.model_location(registry, mv.model_id, mv.source).removeprefix("file://"))
        step_dir = Path(update["out_dir"])
        docs = tensor_store.manifests(step_dir / "state")
        rows.append({"task_id": task_id} | _version_row(version, step_dir, model_dir, added, docs, parent_docs))
        parent_docs = docs
    twice = stored_twice(store_root, ws / ".cliploop" / "mlartifacts", store)
    return {
        "versions": rows,
        "blob_bytes": sum(r["blob_bytes"] for r in rows),
        "changed_bytes": sum(r["changed_bytes"] for r in rows),
        "whole_bundle_bytes_twice": 2 * sum(r["whole_bundle_bytes"] for r in rows),
        "meets_target": all(r["meets_target"] for r in rows),
        "no_tensor_stored_twice": not twice,
        "stored_twice": twice[:10],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated (default: every registered method that trains)")
    parser.add_argument("--tasks", type=int, default=3, help="the first N demo tasks (1 to 3)")
    parser.add_argument("--iterations", type=int, default=3, help="optimizer steps per task")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from components.methods import available_methods, get_method
    from components.scenarios import demo
    from components.support.storage import cache_dir

    names = args.methods.split(",") if args.methods else [m for m in available_methods() if get_method(m).trains]
    report = {"methods": {}, "tasks": args.tasks, "iterations": args.iterations, "target_ratio": TARGET}
    with tempfile.TemporaryDirectory(prefix="cliploop-version-storage-") as tmp:
        root = Path(tmp)
        drops = demo.build_drop_zone(root / "drops", include_bad=False)
        for extra in drops[args.tasks :]:  # the drop zone holds the tasks learned, in arrival order
            shutil.rmtree(extra)
        drops = drops[: args.tasks]
        model = demo.model_overrides(cache_dir() / "demo", progress=None)
        for method in names:
            try:
                report["methods"][method] = run_method(method, root, drops, model, args)
            except Exception as exc:  # noqa: BLE001 - one method's failure is reported, the others still run
                report["methods"][method] = {
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                }
            if args.out:  # what is measured so far, in case a long run is stopped
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    report["all_meet_target"] = all(
        m.get("meets_target") and m.get("no_tensor_stored_twice") for m in report["methods"].values()
    )
    report |= {"python": platform.python_version(), "machine": platform.machine()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all("error" not in m for m in report["methods"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
