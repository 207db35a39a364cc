"""DVC's objects of a workspace, seen through DVC's own API: run as
``python -m components.intake.remote_objects IN OUT`` inside a DVC child process
(:func:`components.intake.versioning.dvc` with ``module=``), never imported by cliploop's long-lived processes
(DVC's API keeps global state: logging, locks, caches).

``IN`` is a JSON request, ``OUT`` where the JSON answer goes (DVC logs on stdout and stderr, so the answer has a
file of its own). Two requests:

- ``{"collect": {"revs": [...], "delete": bool}}``: the objects that DVC's working tree and the given git
  revisions use (``Repo.used_objs``, what ``dvc gc`` keeps, for a set of revisions ``dvc gc`` cannot name), and
  in the local cache and the default remote, the objects none of them uses, with their sizes; with ``delete``,
  those are removed by DVC's own collector. Under the workspace's DVC lock throughout: no ``dvc add`` or
  ``dvc push`` runs in between. A revision whose data listing cannot be read anywhere is an error, not "no
  files" (DVC would count its files unused): the answer is ``{"refused": why}``.
- ``{"check": [{"label", "dir", "prefix"}]}``: for each data listing ``dir`` (an md5) the objects under
  ``prefix`` that the default remote lacks: ``{"missing": [{"label", "what", "oid"}]}``. The listing is read
  from the local cache, else from the remote itself; each object's presence is asked of the store, one by one
  (``dvc status -c`` trusts an index of the remote and can answer "in sync" for objects gone since).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _remote_odbs(repo) -> list:
    # The default remote, in DVC 3's layout and the legacy (DVC 2) one, as `dvc gc -c` collects both.
    return [repo.cloud.get_remote_odb(None, "gc -c", hash_name=name) for name in ("md5", "md5-dos2unix")]


def _cache_odbs(repo) -> list:
    seen, odbs = set(), []
    for _, odb in repo.cache.by_scheme():
        if odb is not None and id(odb) not in seen:
            seen.add(id(odb))
            odbs.append(odb)
    return odbs


def _sizes(odb, oids: list[str]) -> int:
    if not oids:
        return 0
    entries = odb.fs.info([odb.oid_to_path(oid) for oid in oids], return_exceptions=True)
    return sum(int(e.get("size") or 0) for e in entries if isinstance(e, dict))


def collect(repo, revs: list[str], delete: bool) -> dict[str, Any]:
    from dvc.exceptions import DvcException
    from dvc.repo import lock_repo
    from dvc_data.hashfile.gc import gc as dvc_collect

    with lock_repo(repo):
        try:
            used_by_odb = repo.used_objs(revs=revs, num=1, force=False)
        except DvcException as exc:
            return {"refused": f"DVC cannot list what a kept revision uses ({exc})"}
        used = set().union(*used_by_odb.values()) if used_by_odb else set()
        stores = []
        for where, odbs in (("cache", _cache_odbs(repo)), ("remote", _remote_odbs(repo))):
            for odb in odbs:
                names = {h.value for h in used if h.name == odb.hash_name}
                present = list(odb.all())
                unused = [oid for oid in present if oid not in names]
                if not present and odb.hash_name != "md5":
                    continue  # an empty legacy layout: nothing to say
                size = _sizes(odb, unused)  # before they go
                removed = dvc_collect(odb, used, dry=False) if delete and unused else 0
                stores.append(
                    {
                        "store": f"{where} {odb.fs.unstrip_protocol(odb.path)}",
                        "objects": len(present),
                        "unused": len(unused),
                        "bytes": size,
                        "removed": removed,
                        "sample": sorted(unused)[:3],
                    }
                )
    return {"stores": stores, "used": len({h.value for h in used})}


def check(repo, listings: list[dict[str, str]]) -> dict[str, Any]:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    remote = _remote_odbs(repo)[0]
    missing = []
    for item in listings:
        oid = item["dir"] + ".dir"
        tree = None
        for odb in (repo.cache.local, remote):
            try:
                tree = Tree.load(odb, HashInfo("md5", oid))
                break
            except Exception:  # noqa: BLE001 - absent or damaged here: try the next place, else report it
                continue
        wanted = {oid: ".dir"}
        if tree is not None:
            prefix = tuple(part for part in item["prefix"].split("/") if part)
            for key, _, hash_info in tree:
                if key[: len(prefix)] == prefix:
                    wanted[hash_info.value] = "/".join(key)
        there = set(remote.list_oids_exists(list(wanted)))
        missing += [{"label": item["label"], "what": what, "oid": o} for o, what in wanted.items() if o not in there]
        if tree is None and oid in there:  # present but unreadable: its files cannot be checked
            missing.append({"label": item["label"], "what": "(unreadable listing)", "oid": oid})
    return {"missing": missing}


def main(argv: list[str]) -> int:
    from dvc.repo import Repo

    request = json.loads(Path(argv[0]).read_text())
    with Repo(os.getcwd()) as repo:
        if "collect" in request:
            answer = collect(repo, request["collect"]["revs"], request["collect"]["delete"])
        else:
            answer = check(repo, request["check"])
    Path(argv[1]).write_text(json.dumps(answer))
    return 3 if "refused" in answer else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
