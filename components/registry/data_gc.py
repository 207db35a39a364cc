"""Which DVC objects cliploop needs, for ``cliploop gc`` (delete the rest) and ``lineage --verify`` (the remote
still holds them). The rule, in docs/storage.md ("What cliploop gc keeps"):

an object is kept when DVC's working tree uses it, or the data of one of these commits does:
- HEAD;
- the commit each registered version's lineage records (its task's ``workspace_commit``): every version of the
  registered model, so every link of every chain, the champion's and any a rollback could return to;
- the commit that accepted each task the ledger knows, whatever its state: a rejected task may be re-queued and
  a failed one is tried again. A quarantined task was never committed and has no objects.

Everything else in the local cache and the DVC remote is unused: a data listing of a commit nothing records,
files pushed by a commit since rewritten, a task folder removed by hand that no version or ledger entry names.
``dvc gc -w`` keeps the working tree only (it deleted the champion's listing); ``dvc gc -A`` keeps every commit
of every branch, so it never collects what a rewritten history left. DVC's own API does the listing and the
deleting (:mod:`components.intake.remote_objects`); this module decides what to keep, and refuses (deletes nothing)
whenever it cannot know: a registry or ledger it cannot read, a recorded commit git does not have.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.intake import versioning
from components.settings.config import Config


class CollectRefused(RuntimeError):
    """``cliploop gc`` cannot know everything it must keep, so it deletes nothing. ``unavailable``: a store that
    did not answer (safe to re-run later), not a state of the workspace someone must look at."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class Collection:
    kept: dict[str, str]  # commit -> why it is kept (the first reason found)
    stores: list[dict[str, Any]] = field(default_factory=list)  # per store: objects, unused, bytes, removed
    deleted: bool = False


def _registered(config: Config) -> list[tuple[int, str | None, str | None]]:
    """(version, task id, workspace commit) of every registered version; [] when no registry was ever made."""
    if config.mlflow.tracking_uri is None and not (config.workspace_path / ".cliploop" / "mlflow.db").is_file():
        return []  # no night ever registered a version here (and opening MLflow would create its database)
    from components.registry.registry import from_config

    registry = from_config(config)
    out = []
    for mv in registry.versions():
        tags = registry.version_tags(int(mv.version))
        out.append((int(mv.version), tags.get("task_id"), tags.get("workspace_commit")))
    return out


def _ledger_commits(config: Config) -> dict[str, str | None]:
    from components.intake.workspace import open_ledger, workspace_paths

    if not workspace_paths(config)["ledger"].is_file():
        return {}
    with open_ledger(config) as ledger:
        return {r.task_id: r.workspace_commit for r in ledger.all() if r.state != "quarantined"}


def kept_commits(config: Config) -> dict[str, str]:
    """The commits whose data is kept, each with why; CollectRefused when that cannot be known."""
    ws = config.workspace_path
    try:
        versions = _registered(config)
    except Exception as exc:  # noqa: BLE001 - whatever stops the read, nothing may be deleted without it
        raise CollectRefused(f"the registry cannot be read ({_first_line(exc)})", unavailable=True) from exc
    try:
        tasks = _ledger_commits(config)
    except Exception as exc:  # noqa: BLE001
        raise CollectRefused(f"the task ledger cannot be read ({_first_line(exc)})", unavailable=True) from exc
    kept: dict[str, str] = {}
    head = versioning.head(ws)
    if head:
        kept[head] = "HEAD"
    for version, task_id, commit in versions:
        commit = commit or tasks.get(task_id or "")
        if not commit:
            raise CollectRefused(
                f"version {version} (task {task_id or '?'}) records no workspace commit and the ledger knows none: "
                "which data it was learned from cannot be told"
            )
        kept.setdefault(commit, f"version {version} (task {task_id})")
    for task_id, commit in tasks.items():
        if commit:
            kept.setdefault(commit, f"task {task_id} (ledger)")
    for commit, why in kept.items():
        if versioning.git(["cat-file", "-e", f"{commit}^{{commit}}"], ws, check=False).returncode != 0:
            raise CollectRefused(f"{why} records commit {commit[:12]}, which this workspace's git does not have")
    return kept


def collect(config: Config, delete: bool) -> Collection:
    """What the local cache and the DVC remote hold that nothing kept uses; with ``delete``, remove it. Then the
    same for the artifact store's tensor blobs (:func:`collect_tensors`)."""
    kept = kept_commits(config)
    answer = _ask_dvc(config.workspace_path, {"collect": {"revs": sorted(kept), "delete": delete}}, config)
    if "refused" in answer:
        raise CollectRefused(answer["refused"])
    tensors = collect_tensors(config, delete)
    return Collection(kept=kept, stores=answer["stores"] + ([tensors] if tensors["objects"] else []), deleted=delete)


def collect_tensors(config: Config, delete: bool, grace_s: float | None = None) -> dict[str, Any]:
    """The tensor blobs of the artifact store that no registered version's model and no step result in the store
    names (docs/storage.md, "Tensors stored once"), older than ``grace_s`` (a day: a step writes its blobs
    before it publishes the manifests naming them); with ``delete``, removed."""
    from components.registry.blob_store import GRACE_S
    from components.registry.blob_store import collect as collect_blobs
    from components.registry.version_tensors import blob_store

    store = blob_store(config)
    if not store.listing():
        return collect_blobs(store, set(), False)
    try:
        keep = referenced_blobs(config, store)
    except Exception as exc:  # noqa: BLE001 - without every reference, no blob may be deleted
        raise CollectRefused(f"the tensor manifests cannot all be read ({_first_line(exc)})", unavailable=True) from exc
    return collect_blobs(store, keep, delete, GRACE_S if grace_s is None else grace_s)


def referenced_blobs(config: Config, store) -> set[str]:
    """Every blob digest a tensor manifest names: in each registered version's model (read as pinned), and in each
    step result under the store's ``runs/`` (published, or an attempt's, not yet registered)."""
    from components.registry.model_pins import version_tensor_manifests
    from components.registry.tensor_store import SUFFIX, referenced
    from components.support import storage

    docs = []
    if config.mlflow.tracking_uri is not None or (config.workspace_path / ".cliploop" / "mlflow.db").is_file():
        from components.registry.registry import from_config

        registry = from_config(config)
        for mv in registry.versions():
            docs += version_tensor_manifests(registry, int(mv.version))
    if not store.remote:
        runs = Path(store.root) / "runs"
        docs += [json.loads(p.read_text()) for p in sorted(runs.rglob(f"*{SUFFIX}"))] if runs.is_dir() else []
    else:
        client, prefix = store.client(), storage.S3Uri.parse(f"{store.root}/runs").as_prefix()
        for key, _ in list(storage.list_keys(prefix, client)):
            if key.endswith(SUFFIX):
                docs.append(json.loads(storage.get_bytes(storage.S3Uri(prefix.bucket, key), client)))
    return referenced(docs)


def remote_problems(ws: Path, links: list[tuple[str, str | None, str | None]]) -> list[str]:
    """For ``lineage --verify``: one line per link (label, task id, workspace commit) whose data the DVC remote no
    longer holds in full (its commit's data listing, or a file of its task), naming the missing objects."""
    ws = Path(ws)
    listings, problems = [], []
    for label, task_id, commit in links:
        if not task_id:
            continue  # no task recorded: the lineage says so already
        md5 = _data_md5_at(ws, commit) if commit else None
        if md5 is None:
            at = f"at its workspace commit {commit[:12]}" if commit else "(no workspace commit recorded)"
            problems.append(f"{label}: no data listing {at}: the DVC remote was not checked")
            continue
        listings.append({"label": label, "dir": md5, "prefix": f"tasks/{task_id}/"})
    if not listings:
        return problems
    by_label: dict[str, list[dict[str, str]]] = {}
    for item in _ask_dvc(ws, {"check": listings})["missing"]:
        by_label.setdefault(item["label"], []).append(item)
    for label, missing in by_label.items():
        named = ", ".join(
            f"{'data listing ' + m['oid'] if m['what'] == '.dir' else 'data/' + m['what'] + ' (' + m['oid'] + ')'}"
            for m in missing[:3]
        )
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        problems.append(f"{label}: the DVC remote lacks {len(missing)} object(s) of its data: {named}{more}")
    return problems


def _data_md5_at(ws: Path, commit: str) -> str | None:
    proc = versioning.git(["show", f"{commit}:{versioning.DATA_DIR}.dvc"], ws, check=False)
    if proc.returncode != 0:
        return None
    return yaml.safe_load(proc.stdout)["outs"][0]["md5"].removesuffix(".dir")


def _ask_dvc(ws: Path, request: dict[str, Any], config: Config | None = None) -> dict[str, Any]:
    """One request to :mod:`components.intake.remote_objects` in a DVC child process, bounded like a push."""
    from components.intake.workspace import s3_settings

    s3 = s3_settings(config) if config is not None else None
    timeout_s = config.dvc.transfer_timeout_s if config is not None else None
    with tempfile.TemporaryDirectory(prefix="cliploop-dvc-") as tmp:
        asked, answer = Path(tmp) / "in.json", Path(tmp) / "out.json"
        asked.write_text(json.dumps(request))
        shown = "cliploop gc" if "collect" in request else "the remote check of lineage --verify"
        try:
            proc = versioning.dvc(
                [str(asked), str(answer)],
                ws,
                check=False,
                env=versioning.remote_env(ws, s3),
                timeout_s=timeout_s,
                module="components.intake.remote_objects",
            )
        except subprocess.TimeoutExpired:
            raise versioning.RemoteUnavailable(
                f"{shown}: DVC did not finish within {timeout_s:g} s (dvc.transfer_timeout_s); safe to re-run"
            ) from None
        if answer.is_file():
            return json.loads(answer.read_text())
        output = (proc.stderr or proc.stdout).strip()
        error = versioning.RemoteUnavailable if versioning.unavailable(output) else versioning.VersioningError
        raise error(f"{shown}: DVC failed in {ws} (exit {proc.returncode}):\n{versioning.shorten(output)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
