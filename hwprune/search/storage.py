"""The study's storage, riding out a short outage of its database.

A search talks to its study many times a second (asking, telling, attributes, the heartbeat). With an RDB URL
(PostgreSQL for several hosts), a database restart or a network blip of a few seconds would otherwise end the
search at the first call that meets it. :class:`RetryingRDBStorage` is Optuna's ``RDBStorage`` whose calls
(the public ones, and the private ones Optuna's own ``_CachedStorage`` wrapper calls directly: ``_get_trials``,
``_create_new_trial``…) are retried on a connection error (SQLAlchemy's ``OperationalError``/``InterfaceError``)
with growing waits, about 15 s in all, and whose pool checks a connection before using it (``pool_pre_ping``),
so a restarted server is reconnected to. A call that still fails raises as before: the trial it belonged to is failed when the search is
resumed (the lease of :mod:`hwprune.search.controller`).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Any, Callable

import optuna

__all__ = ["RetryingRDBStorage", "is_transient", "RETRY_WAITS"]

RETRY_WAITS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between tries: ~16 s of outage ridden out
# Optuna's _CachedStorage (what optuna.create_study wraps every RDB storage in) calls these on its backend
# directly; an outage met there ended a search in CI although the public calls were retried
_PRIVATE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                  "_get_stale_trial_ids")
_depth = threading.local()  # only the outermost retried call retries (a public call calls private ones)


def is_transient(exc: BaseException) -> bool:
    """A lost or refused database connection (worth retrying), not a wrong query or a finished trial; Optuna
    wraps the driver's error in its ``StorageInternalError``, so the chain of causes is looked at."""
    try:
        from sqlalchemy import exc as sa
    except ImportError:  # pragma: no cover - optuna depends on SQLAlchemy
        return False
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, sa.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retried(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_depth, "inside", False):  # the outer call retries the whole of it
            return fn(self, *args, **kwargs)
        _depth.inside = True
        try:
            for wait in RETRY_WAITS + (None,):
                try:
                    return fn(self, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - only a lost connection is retried; the rest re-raised
                    if wait is None or not is_transient(exc):
                        raise
                    if not self._said_outage:
                        self._said_outage = True
                        print(f"hwprune: warning: the study's database did not answer ({type(exc).__name__}); "
                              f"retrying for up to {sum(RETRY_WAITS):.0f} s (said once)", file=sys.stderr,
                              flush=True)
                    time.sleep(wait)
        finally:
            _depth.inside = False
        raise AssertionError("unreachable")  # pragma: no cover

    return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` with every public call retried on a lost connection (see the module docstring)."""

    _said_outage = False

    def __init__(self, url: str, **kwargs: Any) -> None:
        engine = {"pool_pre_ping": True, **dict(kwargs.pop("engine_kwargs", None) or {})}
        super().__init__(url, engine_kwargs=engine, **kwargs)


for _name in [n for n in dir(optuna.storages.RDBStorage) if not n.startswith("_")] + list(_PRIVATE_CALLS):
    _fn = getattr(optuna.storages.RDBStorage, _name, None)
    if callable(_fn) and not isinstance(_fn, type):
        setattr(RetryingRDBStorage, _name, _retried(_fn))
