"""Continual-learning methods: one module per method, registered under a string name.

The name is what ``cliploop.yaml`` (``method.name``), the CLI (``--method``), flow parameters and MLflow
tags use. Every module in this package is imported on first use, so adding a method is adding a module
that calls :func:`register_method`; tests enrol every registered method automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

from components.methods.base import Context, Method, MethodError

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register_method(name: str):
    """Class decorator: ``@register_method("gnsp")``."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise MethodError(
                f"method name {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def get_method(name: str) -> type[Method]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> dict[str, str]:
    """Registered names with their one-line summaries."""
    _load_all()
    return {name: cls.summary for name, cls in sorted(_REGISTRY.items())}


__all__ = ["Context", "Method", "MethodError", "available_methods", "get_method", "register_method"]
