"""Where a step's inputs come from and where its outputs go, so that a step can run on a worker that shares
nothing with the orchestrator but object storage (and runs the same way in-process on one machine).

- Inputs: stored tasks by their DVC content address (:func:`addresses` on the orchestrator's side,
  :func:`locator` on the step's side, ``components/intake/task_fetch.py`` underneath).
- Outputs: the artifact store (``workspace.store_of``: ``artifacts.root``, a folder or an ``s3://`` prefix; by
  default the workspace's ``.cliploop`` folder), ``components/support/artifact_store.py`` underneath. A completed
  step is named by a URI (``s3://…/pools/<key>``) or a local folder, and :func:`local` turns either into a folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from components.intake.task_fetch import fetched
from components.intake.workspace import store_of
from components.pipeline.chain import PipelineError, ledger_of
from components.settings.config import Config
from components.support.artifact_store import ArtifactStore


def place(store: ArtifactStore, kind: str, key: str) -> str:
    """How a completed step is named to other steps: its folder (a folder root) or its URI (an object store)."""
    return store.uri(kind, key) if store.remote else str(Path(store.root) / kind / key)


def local(store: ArtifactStore, place: str) -> Path:
    """A completed step's folder on this machine, from its URI in the store (fetched, checked) or its path."""
    if "://" not in place:
        return Path(place)
    prefix = f"{store.root}/"
    if not place.startswith(prefix):
        raise PipelineError(f"{place} is not in the artifact store {store.root}")
    kind, _, key = place[len(prefix) :].partition("/")
    return store.fetch(kind, key)


def handed_config(config: Config) -> dict:
    """The configuration a GPU step is started with: the portable one, and, when the artifact store is an object
    store (workers share nothing else with the orchestrator), without the orchestrator's workspace and drop
    zone, which such a step never opens (its tasks come by address, its parent and outputs from the store)."""
    doc = config.portable()
    if store_of(config).remote:
        doc.pop("workspace")
        doc.pop("drop_zone")
    return doc


def addresses(config: Config, task_ids: list[str]) -> dict[str, dict]:
    """The orchestrator's side of a hermetic step: each task's DVC content address (its folder hash, the files
    it stands for, the remote), read from the ledger and the workspace's DVC cache."""
    from components.intake.task_fetch import address_of
    from components.intake.versioning import default_remote, entries_by_task

    ws = config.workspace_path
    remote = config.location(config.dvc.remote) if config.dvc.remote else default_remote(ws)
    with ledger_of(config) as ledger:  # one read of the ledger and one of the DVC listing, however many tasks
        records = {t: ledger.get(t) for t in task_ids}
    listing = entries_by_task(ws)
    out = {}
    for task_id, record in records.items():
        if record is None:
            raise PipelineError(f"task {task_id!r} is not in the ledger (ingest it first)")
        entries = listing.get(task_id, [])
        out[task_id] = address_of(ws, task_id, record.dvc_md5, remote, entries).to_dict()
    return out


def locator(config: Config, addresses: dict[str, dict] | None) -> Callable[[str], str]:
    """task id -> its folder: fetched from the DVC remote by content address when the step was handed addresses
    (a worker), else the workspace's stored copy."""
    if not addresses:
        return lambda task_id: str(config.workspace_path / "data" / "tasks" / task_id)
    from components.intake.workspace import s3_settings

    def locate(task_id: str) -> str:
        if task_id not in addresses:
            raise PipelineError(f"task {task_id} is needed by this step but was not handed to it")
        return fetched(addresses[task_id], s3_settings(config))

    return locate
