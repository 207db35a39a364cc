"""The workspace's versioning: git for metadata, DVC for the task data under ``data/``.

``data/`` is one DVC output (the workspace's ``data.dvc``); a task's own DVC hash is the hash DVC
gives its folder ``data/tasks/<task_id>`` (the md5 of the sorted JSON listing of its files' md5s), read
from the cached ``.dir`` object, so it can be checked against ``dvc add`` of that folder alone.

git and DVC run as child processes (:mod:`components.intake.git_dvc`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.intake.git_dvc import VersioningError, dvc, dvc_batch, git, shorten
from components.support import storage

DATA_DIR = "data"
STATE_DIR = ".cliploop"
WORKSPACE_GITIGNORE = ["/.cliploop/"]


class RemoteUnavailable(VersioningError, storage.StorageUnavailable):
    """A DVC transfer did not get through to the remote: its requests timed out, were refused or throttled
    after their attempts, or the transfer outlived ``dvc.transfer_timeout_s``. Nothing half is published (DVC
    uploads a directory's listing last), so the command is safe to re-run."""


def remote_env(ws: Path, s3: storage.S3Settings | None = None) -> dict[str, str]:
    """The environment of a DVC child that talks to the workspace's remote: bounded, when the remote is S3."""
    if not storage.is_s3(remote_url(ws)):
        return {}
    return {"CLIPLOOP_DVC_S3_BOUNDED": "1", **storage.retry_env(s3)}


def remote_url(ws: Path) -> str | None:
    """The URL of the workspace's default DVC remote as DVC reads it, ``config.local`` first (None: none)."""
    name = _dvc_config(ws).get("core", {}).get("remote")
    committed, local = _remote_urls(ws, name) if name else (None, None)
    return local or committed


@dataclass(frozen=True)
class RemoteSpec:
    url: str  # folder or s3:// URI
    name: str = "storage"
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout: float | None = None  # seconds, per attempt (S3 only; None: s3fs's own default)
    read_timeout: float | None = None
    configured: bool = True  # False: ``url`` is the default; a remote the workspace has already is kept


def default_remote(ws: Path) -> str:
    return str(Path(ws) / STATE_DIR / "dvc-remote")


def init_workspace(ws: Path, remote: RemoteSpec) -> list[str]:
    """Make ``ws`` a cliploop workspace (idempotent). Returns what was done, for the user."""
    ws = Path(ws)
    ws.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    if not (ws / ".git").exists():
        git(["init", "-q"], ws)
        done.append("git repository initialised")
    if not (ws / ".dvc").exists():
        dvc_batch([["init", "-q"], ["config", "core.autostage", "false"]], ws)
        done.append("DVC initialised")
    gitignore = ws / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [entry for entry in WORKSPACE_GITIGNORE if entry not in lines]
    if missing:
        storage.atomic_write_text(gitignore, "\n".join(lines + missing) + "\n")
    (ws / DATA_DIR / "tasks").mkdir(parents=True, exist_ok=True)
    done += configure_remote(ws, remote)
    if not (ws / "data.dvc").exists():
        track_data(ws)
        done.append("data/ tracked by DVC (data.dvc)")
    commit(
        ws, "cliploop: initialise workspace", [".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data.dvc"]
    )
    return done


def configure_remote(ws: Path, remote: RemoteSpec) -> list[str]:
    """Point the workspace's default DVC remote at ``remote`` (idempotent).

    A folder remote is named twice. The committed ``.dvc/config`` holds its absolute path, so a clone of the
    workspace on this machine (an auditor's ``git clone`` + ``dvc pull``) reaches it: a path relative to
    ``.dvc/`` would name a folder inside the clone, and the default remote lies in the git-ignored
    ``.cliploop/``, which no clone has. A remote inside the workspace is also named relative to ``.dvc/`` in
    the uncommitted ``.dvc/config.local``, which DVC reads over the committed file: the workspace moved to
    another folder still pushes into the remote it carries along, and the next set-up there rewrites the
    committed path to the new place (the same remote, spelled for clones; never another one)."""
    ws = Path(ws).resolve()
    url = remote.url
    committed, local = _remote_urls(ws, remote.name)
    current = local or committed
    if current and not remote.configured:
        # No remote configured here: the one `init --remote` or the workspace's config chose stays.
        url = current if storage.is_s3(current) else str((ws / ".dvc" / current).resolve())
    own = None  # the workspace's own spelling of a remote inside it, relative to .dvc/
    if not storage.is_s3(url):
        target = Path(url).resolve()
        target.mkdir(parents=True, exist_ok=True)
        url = str(target)
        own = os.path.relpath(target, ws / ".dvc") if target.is_relative_to(ws) else None
    done: list[str] = []
    commands: list[list[str]] = []
    if committed != url:
        commands.append(["remote", "add", "--force", "--default", remote.name, url])
        done.append(f"DVC remote '{remote.name}' -> {url}")
    if local != own:  # `dvc remote modify` takes a path relative to the cwd and stores it relative to .dvc/
        change = ["url", os.path.relpath(url, ws)] if own else ["--unset", "url"]
        commands.append(["remote", "modify", "--local", remote.name, *change])
    if storage.is_s3(url):
        # Endpoint and region are per-machine settings: keep them out of the committed .dvc/config.
        settings = _remote_section(_dvc_config(ws, local=True), remote.name)
        for key, value in (
            ("endpointurl", remote.endpoint_url),
            ("region", remote.region),
            ("connect_timeout", _number(remote.connect_timeout)),
            ("read_timeout", _number(remote.read_timeout)),
        ):
            if value and settings.get(key) != value:
                commands.append(["remote", "modify", "--local", remote.name, key, value])
    dvc_batch(commands, ws)
    return done


def _remote_urls(ws: Path, name: str) -> tuple[str | None, str | None]:
    """The URL of remote ``name`` in the committed ``.dvc/config`` and in ``.dvc/config.local`` (None: unset)."""
    return tuple(_remote_section(_dvc_config(ws, local=local), name).get("url") for local in (False, True))


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _remote_section(config: dict[str, dict[str, str]], name: str) -> dict[str, str]:
    # DVC writes the section as ['remote "NAME"']: configparser keeps the single quotes in its name.
    return config.get(f"'remote \"{name}\"'") or config.get(f'remote "{name}"') or {}


def _dvc_config(ws: Path, local: bool = False) -> dict[str, dict[str, str]]:
    import configparser

    path = Path(ws) / ".dvc" / ("config.local" if local else "config")
    parser = configparser.ConfigParser()
    if path.exists():
        parser.read(path)
    return {section: dict(parser[section]) for section in parser.sections()}


def track_data(ws: Path) -> str:
    """``dvc add data`` and return the new md5 of data/ (with its .dir suffix stripped)."""
    dvc(["add", "-q", DATA_DIR], ws)
    return data_md5(ws)


def data_md5(ws: Path) -> str:
    meta = yaml.safe_load((Path(ws) / "data.dvc").read_text())
    return meta["outs"][0]["md5"].removesuffix(".dir")


def _dir_entries(ws: Path, md5: str) -> list[dict[str, str]]:
    path = Path(ws) / ".dvc" / "cache" / "files" / "md5" / md5[:2] / (md5[2:] + ".dir")
    if not path.exists():
        raise VersioningError(f"DVC cache has no directory listing {md5}.dir (run `dvc pull` in {ws})")
    return json.loads(path.read_text())


def dir_md5(entries: list[dict[str, str]]) -> str:
    """DVC's directory hash of a listing of ``{"md5", "relpath"}`` entries."""
    ordered = sorted(entries, key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(ordered, sort_keys=True).encode()).hexdigest()


def task_entries(ws: Path, task_id: str, md5: str | None = None) -> list[dict[str, str]]:
    return entries_by_task(ws, md5).get(task_id, [])


def entries_by_task(ws: Path, md5: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Every stored task's ``{md5, relpath}`` entries (relpath inside the task's folder), from one read of
    the data listing."""
    out: dict[str, list[dict[str, str]]] = {}
    for e in _dir_entries(ws, md5 or data_md5(ws)):
        head, task_id, rest = (e["relpath"].split("/", 2) + ["", ""])[:3]
        if head == "tasks" and rest:
            out.setdefault(task_id, []).append({"md5": e["md5"], "relpath": rest})
    return out


def task_md5(ws: Path, task_id: str, md5: str | None = None) -> str:
    entries = task_entries(ws, task_id, md5)
    if not entries:
        raise VersioningError(f"task {task_id} is not in the DVC-tracked data of {ws}")
    return dir_md5(entries)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(storage.CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Verification:
    task_id: str
    expected: str
    actual: str | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_task(ws: Path, task_id: str, expected_md5: str) -> Verification:
    """Re-hash the task's files on disk and compare with the DVC hash recorded for it.

    The files' md5s are recomputed from their bytes (DVC's own status may trust cached stat info),
    and the folder hash is recomputed from them.
    """
    folder = Path(ws) / DATA_DIR / "tasks" / task_id
    problems: list[str] = []
    if not folder.is_dir():
        return Verification(task_id, expected_md5, None, [f"{folder} is missing (try `dvc pull`)"])
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append({"md5": file_md5(path), "relpath": path.relative_to(folder).as_posix()})
    actual = dir_md5(entries)
    if actual != expected_md5:
        recorded = {}
        try:
            recorded = {e["relpath"]: e["md5"] for e in task_entries(ws, task_id)}
        except VersioningError:
            pass
        on_disk = {e["relpath"]: e["md5"] for e in entries}
        for rel in sorted(set(recorded) | set(on_disk)):
            if recorded.get(rel) != on_disk.get(rel):
                state = "missing" if rel not in on_disk else "unexpected" if rel not in recorded else "changed"
                problems.append(f"data/tasks/{task_id}/{rel}: {state}")
        problems.insert(0, f"task {task_id}: files hash to {actual}, recorded DVC hash is {expected_md5}")
    return Verification(task_id, expected_md5, actual, problems)


def commit(ws: Path, message: str, paths: list[str]) -> str:
    """Commit exactly ``paths`` (nothing else the user has staged) and return HEAD. No-op when unchanged."""
    present = [p for p in paths if (Path(ws) / p).exists()]
    git(["add", "--", *present], ws)
    staged = git(["diff", "--cached", "--name-only", "--", *present], ws).stdout.strip()
    if staged:
        git(["commit", "-q", "-m", message, "--", *present], ws)
    return head(ws)


def head(ws: Path) -> str | None:
    proc = git(["rev-parse", "HEAD"], ws, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


# What DVC prints when the store, not the request, was the problem (botocore's and aiohttp's phrasing).
_UNAVAILABLE = re.compile(
    r"timeout|timed out|could not connect|connection (was )?(closed|reset|refused)|SlowDown|reduce your request rate"
    r"|ServiceUnavailable|InternalError|max retries",
    re.IGNORECASE,
)


def unavailable(output: str) -> bool:
    """Whether DVC's output says the store, not the request, failed (a timeout, a refused connection, throttling)."""
    return bool(_UNAVAILABLE.search(output))


def push(ws: Path, s3: storage.S3Settings | None = None, timeout_s: float | None = None) -> None:
    """``dvc push``, bounded: every request by the remote's timeouts and ``s3``'s attempts, the whole push by
    ``timeout_s``. A push the store did not let through raises RemoteUnavailable (safe to re-run)."""
    try:
        proc = dvc(["push"], ws, check=False, env=remote_env(ws, s3), timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        raise RemoteUnavailable(
            f"`dvc push` did not finish within {timeout_s:g} s (dvc.transfer_timeout_s) and was stopped; "
            "what it uploaded stays, the next push goes on from there (safe to re-run)"
        ) from None
    if proc.returncode != 0:  # not -q: with it a failed push says nothing about why
        output = (proc.stderr or proc.stdout).strip()
        error = RemoteUnavailable if unavailable(output) else VersioningError
        raise error(f"`dvc push` failed in {ws} (exit {proc.returncode}):\n{shorten(output)}")
