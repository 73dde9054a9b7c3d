"""The outcome of one call of ``fn`` in another process, encoded one way for every executor.

A worker (a ``ProcessExecutor`` worker process, a Dask worker) runs ``fn(arg)`` through
:func:`call`, which never raises for ``fn``'s sake and returns an *outcome*, a tuple whose first
item is its tag:

    (RESULT, value)                              fn returned ``value``
    (RAISED, exception, traceback text)          fn raised an exception that survives pickling
    (REMOTE_ERROR, type name, message, traceback text)
                                                 fn raised an exception that cannot make the round
                                                 trip (or SystemExit/KeyboardInterrupt)

The caller's side turns an outcome back into the value or the exception with :func:`unwrap`:
the exception is raised as itself with the worker's traceback as a ``RemoteTraceback`` in its
``__cause__``; an exception that could not travel becomes ``RemoteError`` with the same cause.

A process worker sends an outcome as one frame (:func:`encode`: the tag is the frame kind, the
body the rest of the tuple, pickled); the parent reads it back with :func:`decode`. Dask pickles
the outcome tuple itself.

Pickling tries the standard ``pickle`` first and falls back to cloudpickle, which also ships by
value what only exists in the worker: classes and exceptions of a function that travelled by value
(a job file loaded by path, ``__main__``).

This module imports only the standard library at its top, so that a worker process started as a
script can load it without the package's other modules (see ``worker.py``); the error classes the
caller's side raises are imported when first needed.
"""

from __future__ import annotations

import pickle
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and traceback cost a fresh worker about 4 ms of CPU: not imported there
    from collections.abc import Callable
    from typing import Any, NoReturn

__all__ = [
    "RAISED",
    "REMOTE_ERROR",
    "RESULT",
    "call",
    "call_bundle",
    "decode",
    "dumps",
    "encode",
    "failure",
    "unwrap",
]

# Tags of an outcome, also the kinds of the frames that carry one (see worker.py for the others).
RESULT = 11
RAISED = 12
REMOTE_ERROR = 13


def dumps(obj: Any) -> bytes:
    """``obj`` pickled (protocol 5); with cloudpickle when the standard pickle refuses it."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle  # only now: most results never need it

        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]


def call(fn: Callable[[Any], Any], arg: Any) -> tuple[Any, ...]:
    """``fn(arg)`` as an outcome; never raises for ``fn``'s sake."""
    try:
        return (RESULT, fn(arg))
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: they become REMOTE_ERROR
        return failure(exc)


# Functions a Dask worker process has unpickled for bundles, by digest of their pickle (most recent
# last): a function is loaded once per worker process, and stays loaded for the next runs.
_LOADED: dict[bytes, Callable[[Any], Any]] = {}
_LOADED_SIZE = 32


def call_bundle(
    function: tuple[bytes, bytes], blob: bytes, sizes: list[int]
) -> tuple[float, list[tuple[Any, ...]]]:
    """Runs on a Dask worker: the outcome of ``fn(arg)`` for each argument of a bundle, in order,
    after the seconds the bundle took here.

    ``function`` is ``(digest, pickled fn)``; ``blob`` holds the pickled arguments end to end, the
    ``i``-th ``sizes[i]`` bytes long. Never raises for ``fn``'s sake: each call's failure is its own
    outcome, as with :func:`call`.
    """
    started = time.perf_counter()
    digest, data = function
    fn = _LOADED.pop(digest, None)
    if fn is None:
        fn = pickle.loads(data)
        if len(_LOADED) >= _LOADED_SIZE:
            del _LOADED[next(iter(_LOADED))]
    _LOADED[digest] = fn
    view = memoryview(blob)
    outcomes = []
    at = 0
    for size in sizes:
        arg = pickle.loads(view[at : at + size])
        at += size
        outcomes.append(call(fn, arg))
    return time.perf_counter() - started, outcomes


def failure(exc: BaseException) -> tuple[Any, ...]:
    """The outcome for ``fn`` having raised ``exc``, with the traceback formatted here."""
    import traceback  # only when fn failed

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, Exception):
        try:
            pickle.loads(dumps(exc))  # many exceptions pickle but cannot be rebuilt
        except Exception:
            pass
        else:
            exc.__traceback__ = None  # the text above carries it; frames do not pickle
            return (RAISED, exc, tb)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception as str_exc:  # a broken __str__ must not take the worker down
        message = f"<str() failed: {type(str_exc).__name__}>"
    return (REMOTE_ERROR, name, message, tb)


def encode(outcome: tuple[Any, ...]) -> tuple[int, bytes]:
    """An outcome as a frame kind and body; a result that cannot be pickled becomes its failure."""
    tag = outcome[0]
    try:
        body = dumps(outcome[1]) if tag == RESULT else dumps(outcome[1:])
    except Exception as exc:
        if tag != RESULT:  # pragma: no cover - failure() checked that the exception pickles
            raise
        return encode(failure(exc))
    return tag, body


def _name(fn: object) -> str:
    from .._core.params import callable_name

    return callable_name(fn)


def decode(
    kind: int, body: Any, fn: object, *, loads: Callable[[Any], Any] = pickle.loads
) -> tuple[Any, ...]:
    """The outcome a frame carries; errors that say it cannot be read name ``fn``.

    ``loads`` unpickles ``body``: ``pickle.load`` reads a frame from a file (a large answer).
    """
    from .._exceptions import ExecutorError, RemoteError

    try:
        fields = loads(body)
    except Exception as exc:
        name = _name(fn)
        if kind == RESULT:
            raise ExecutorError(
                f"the result of {name} was pickled in the worker but cannot be unpickled here: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        raise RemoteError(
            "<unknown>", f"{name} raised an exception that cannot be unpickled here: {exc}"
        ) from exc
    return (RESULT, fields) if kind == RESULT else (kind, *fields)


def unwrap(outcome: Any, fn: object) -> Any:
    """The value of an outcome, or its exception raised with the worker's traceback as cause."""
    if isinstance(outcome, tuple) and outcome and outcome[0] == RESULT:
        return outcome[1]
    _raise(outcome, fn)


def _raise(outcome: Any, fn: object) -> NoReturn:
    from .._exceptions import ExecutorError, RemoteError, RemoteTraceback

    if not isinstance(outcome, tuple) or not outcome:  # pragma: no cover - another version's worker
        raise ExecutorError(f"unexpected answer from a worker for {_name(fn)}: {outcome!r}")
    tag = outcome[0]
    if tag == RAISED:
        _, error, tb = outcome
        raise error from RemoteTraceback(tb)
    if tag == REMOTE_ERROR:
        _, type_name, message, tb = outcome
        raise RemoteError(type_name, message) from RemoteTraceback(tb)
    raise ExecutorError(f"unexpected outcome tag {tag!r} from a worker for {_name(fn)}")  # pragma: no cover
