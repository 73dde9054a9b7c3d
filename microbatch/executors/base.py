"""The executor protocol, and what executors share: checking and pickling functions, the function cache.

An executor is where a pipeline runs ``fn(batch)``: worker processes, threads, the event loop itself.

The protocol is small on purpose, so that other executors (a Dask cluster, a remote service) can sit
behind it::

    class Executor(Protocol):
        capacity: int                                   # calls that may run at once
        prefetch: int                                   # optional: calls per capacity taken ahead
        async def __aenter__(self) -> Self              # start (workers, threads, connections)
        async def __aexit__(self, *exc_info) -> None    # stop; nothing may be left running
        async def run(self, fn, arg, *, timeout=None)   # fn(arg) somewhere; its result or its exception

Contract of ``run``:

- at most ``capacity`` calls run at once; further calls wait their turn, first come first served;
- an executor with a ``prefetch`` attribute takes ``capacity * (1 + prefetch)`` calls at once and
  holds the extra ones ready where they will run; a pipeline keeps that many batches in flight;
- ``fn`` raising returns as that exception (for processes: re-raised in the parent, with the
  worker's traceback as a ``RemoteTraceback`` in ``__cause__``);
- a failure of the machinery rather than of ``fn`` is an ``ExecutorError``: ``WorkerCrashed``,
  ``BatchTimeout``, ``RemoteError``;
- one call's failure leaves other calls in flight untouched, and the executor usable;
- cancelling the caller stops the call as far as the executor can (a process is killed, a thread is
  abandoned).

A pipeline passes the same ``fn`` object for every batch of a run and a different ``arg`` each time;
``ProcessExecutor`` relies on that to send the function to each worker only once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import cloudpickle

from .._core.params import callable_name
from .._exceptions import UnpicklableFunction

__all__ = [
    "Executor",
    "FunctionCache",
    "NothingToStart",
    "PickledFunction",
    "check_picklable",
    "check_timeout",
]

A = TypeVar("A")
R = TypeVar("R")
E = TypeVar("E", bound="Executor")
N = TypeVar("N", bound="NothingToStart")

# How many distinct functions an executor keeps pickled (and a worker keeps loaded).
FN_CACHE_SIZE = 32


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(arg)`` calls, at most ``capacity`` at once; see the module docstring for the contract."""

    capacity: int

    async def __aenter__(self: E) -> E: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,
    ) -> R: ...


def pickle_function(fn: Callable[..., Any]) -> bytes:
    """``fn`` pickled with cloudpickle, or ``UnpicklableFunction`` naming it and the reason."""
    try:
        return cloudpickle.dumps(fn, protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise UnpicklableFunction(
            f"{callable_name(fn)} cannot be sent to worker processes: {type(exc).__name__}: {exc}. "
            f"Define it at module level, or keep locks, open files, sockets and clients out of "
            f"what it references (create them inside the function), or use ThreadExecutor."
        ) from exc


def check_picklable(fn: Callable[..., Any]) -> None:
    """Raise ``UnpicklableFunction`` unless ``fn`` can be sent to worker processes.

    Uses cloudpickle, as ``ProcessExecutor`` does: functions from importable modules travel by
    reference, functions from ``__main__``, lambdas and closures by value. The message names ``fn``
    and the pickling error. Pipelines call this before any batch runs.
    """
    pickle_function(fn)


def check_timeout(timeout: float | None) -> None:
    """Refuse a per-call ``timeout`` that is not a positive number of seconds or None."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


class PickledFunction:
    """A function with its cloudpickle bytes, made once, and a token naming it to a worker.

    Pickling a ``PickledFunction`` (as Dask does with a task's arguments) ships those bytes, so the
    function travels by value whatever its module: a function from a job file loaded by path
    (``microbatch run jobs.py:pipeline``) cannot be imported by a worker.
    """

    __slots__ = ("fn", "token", "data")

    def __init__(self, fn: Callable[..., Any], token: int, data: bytes) -> None:
        self.fn = fn
        self.token = token
        self.data = data

    def __call__(self, arg: Any) -> Any:
        """Call the function (where it was not pickled, e.g. on a Dask cluster without processes)."""
        return self.fn(arg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (cloudpickle.loads, (self.data,))


class FunctionCache:
    """The functions an executor has pickled, the ``size`` most recently used, by identity.

    A pipeline passes the same ``fn`` object for every batch, so pickling it (and checking that it
    can be pickled) happens once per run, not once per batch. Entries hold ``fn`` itself, so its
    ``id`` cannot be reused by another object while it is cached.
    """

    def __init__(self, size: int = FN_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[int, PickledFunction] = OrderedDict()
        self._next_token = 1

    def get(self, fn: Callable[..., Any]) -> PickledFunction:
        """``fn`` pickled; ``UnpicklableFunction`` when it cannot be."""
        entry = self._entries.get(id(fn))
        if entry is not None and entry.fn is fn:
            self._entries.move_to_end(id(fn))
            return entry
        entry = PickledFunction(fn, self._next_token, pickle_function(fn))
        self._next_token += 1
        self._entries[id(fn)] = entry
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry


class NothingToStart:
    """Base of executors with nothing to start or stop: entering them (``async with``) is optional."""

    async def __aenter__(self: N) -> N:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
