"""Resolving the configuration: defaults → cliploop.yaml → environment → command-line overrides.

What the settings are lives in :mod:`components.settings.config`; this module is where their values come from and how a
bad value is reported, so a new source or a new error phrasing changes only this file.

The config is resolved once per command and written beside that command's outputs
(``config.resolved.yaml``), so every report, pool and model can be traced to the exact settings used.

Environment overrides use ``CLIPLOOP__<SECTION>__<KEY>=value`` (values parsed as YAML scalars, so
``CLIPLOOP__VALIDATION__MAX_PIXELS=1000`` is an int); command-line overrides are ``--set section.key=value``.
Unknown keys and bad values are errors that name the key and where it came from. YAML syntax errors are
phrased here for task.yaml too (:func:`yaml_problem`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components.settings import credentials
from components.settings.config import Config, ConfigError

CONFIG_FILENAME = "cliploop.yaml"
ENV_PREFIX = "CLIPLOOP__"


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{source}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def find_config_file(
    explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Path | None:
    env = os.environ if env is None else env
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.resolve()
    if env.get("CLIPLOOP_CONFIG"):
        path = Path(env["CLIPLOOP_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"CLIPLOOP_CONFIG points at a missing file: {path}")
        return path.resolve()
    candidate = (cwd or Path.cwd()) / CONFIG_FILENAME
    return candidate.resolve() if candidate.is_file() else None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the configuration. ``base`` replaces the built-in defaults' starting point (e.g. the demo's)."""
    env = os.environ if env is None else env
    tree: dict = dict(base or {})
    sources: list[tuple[str, str]] = []
    origins: list[tuple[str, str]] = []  # (dotted key, the variable or --set that gave it), in the order applied

    file_path = find_config_file(path, env, cwd)
    if file_path is not None:
        try:
            text = file_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_path}: cannot be read as a text file ({exc})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_problem(file_path, text, exc)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: the top level must be a mapping of keys to values")
        tree = _deep_merge(tree, loaded)
        sources.append(("file", str(file_path)))

    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _scalar(env[name]), f"environment variable {name}")
            sources.append(("env", name))
            origins.append((dotted, f"environment variable {name} ({dotted})"))

    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set_dotted(tree, key.strip(), _scalar(value), f"--set {key.strip()}")
        sources.append(("flag", key.strip()))
        origins.append((key.strip(), f"--set {key.strip()}"))

    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, file_path, origins)) from None
    config._base_dir = file_path.parent if file_path else (cwd or Path.cwd()).resolve()
    credentials.secure(config)  # a password in a URI: moved to the environment, or kept here only
    return config


def yaml_problem(path: Path | str, text: str, exc: yaml.YAMLError) -> str:
    """The parser's complaint as file, line, column and what is wrong, with the offending line quoted
    (PyYAML's own message names "<unicode string>" instead of the file and spans several lines).
    Also used for task.yaml."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    lines = text.splitlines()
    quoted = f"\n  line {mark.line + 1}: {lines[mark.line]}" if mark.line < len(lines) else ""
    return (
        f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
        + (f" ({context})" if context else "")
        + quoted
    )


def config_from_doc(doc: Mapping[str, Any]) -> Config:
    """A config sent as data by :meth:`Config.portable` (its paths are absolute already)."""
    try:
        config = Config.model_validate(credentials.restore(dict(doc)))  # what portable() redacted, if kept here
    except ValidationError as exc:
        raise ConfigError(_explain(exc, None)) from None
    config._base_dir = Path(config.workspace).resolve() if Path(config.workspace).is_absolute() else Path.cwd()
    credentials.secure(config)
    return config


def _origin(key: str, origins: list[tuple[str, str]]) -> tuple[str, bool] | None:
    """The last variable or --set that wrote ``key``, a section above it (``--set method={...}``) or a key
    below it (``--set trainng.epochs=3`` makes the unknown section ``trainng``), and whether it wrote ``key``
    itself; None: the file or a default did."""
    for dotted, where in reversed(origins):
        dotted = ".".join(p for p in dotted.split(".") if p)
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return where, dotted == key
    return None


def _explain(exc: ValidationError, file_path: Path | None, origins: list[tuple[str, str]] | None = None) -> str:
    # Each bad key is blamed on where its value came from: a typo in --set or in a variable is not the file's.
    fallback = str(file_path) if file_path else "configuration"
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = (
            "unknown key (check the spelling; `cliploop init` writes every key with its meaning)"
            if err["type"] == "extra_forbidden"
            else err["msg"]
        )
        origin = _origin(key, origins or [])
        if origin is None:
            lines.append(f"{fallback}: {key}: {msg}")
        elif origin[1]:  # the source names the key already
            lines.append(f"{origin[0]}: {msg}")
        else:
            lines.append(f"{origin[0]}: {key}: {msg}")
    return "\n".join(lines)
