"""Checking what a ``Batcher``'s fn returned for a batch: one result per item, in order.

Pure: no I/O, no event loop. ``BatchResultMismatch`` is the error for a result list of the wrong
length.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from .._exceptions import BatchResultMismatch

__all__ = ["BatchResultMismatch", "check_results"]


def check_results(results: Any, size: int, *, batch: int, fn: str, where: str) -> list[Any]:
    """Return ``results`` as a list of ``size`` values, or raise naming ``where`` and ``fn``.

    ``TypeError`` for an awaitable (an async fn run as a sync one) or for a value that is not a
    sized iterable of results (``None``, a string, a mapping); :class:`BatchResultMismatch` for a
    wrong length.
    """
    if inspect.isawaitable(results):
        if inspect.iscoroutine(results):
            results.close()
        raise TypeError(
            f"{where}: fn {fn} returned an awaitable from a worker thread; an async fn "
            f"must be an 'async def' function (or an object with an 'async def __call__')"
        )
    if isinstance(results, (str, bytes, bytearray, Mapping)) or not isinstance(results, Iterable):
        raise TypeError(
            f"{where}: fn {fn} returned {type(results).__name__}; it must return a list "
            f"with one result per item ({size} items)"
        )
    values = results if isinstance(results, list) else list(results)
    if len(values) != size:
        raise BatchResultMismatch(where, fn, batch, size, len(values))
    return values
