"""Retries for the night's steps: a step is a Prefect task that is retried, with backoff, only when it
failed for a reason a retry can fix (storage and registry hiccups), never for bad data or a bug."""

from __future__ import annotations

from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components.settings.config import Config
from flows.night_clock import body, called


def _retry_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # the failure being considered for a retry
        return is_transient(exc)
    return False


def step(fn, config: Config, name: str | None = None):
    """``fn`` as a Prefect task with the configured retries; no Prefect result persistence or caching."""
    o = config.orchestration
    name = name or fn.__name__.replace("_", "-")
    # The body is timed as our code, the call around it as Prefect's (flows/night_clock.py).
    prefect_task = task(
        body(fn, name),
        name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=o.retries,
        retry_delay_seconds=exponential_backoff(o.retry_delay_s) if o.retry_delay_s else 0,
        retry_jitter_factor=0.5 if o.retry_delay_s else None,
        retry_condition_fn=_retry_transient,
    )
    return called(prefect_task)


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: storage and registry hiccups, not bad data or bugs."""
    import sqlite3

    from components.registry.registry import is_unavailable

    names = {type(e).__name__ for e in _causes(exc)}
    if names & {
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "TimeoutError",
        "BrokenPipeError",
        "ConnectionResetError",
        "StorageError",
        "StorageUnavailable",
        "MaxRetryError",
        "RetryError",
        "ProtocolError",
        "RemoteDisconnected",
    }:
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
