"""``batches()``: the async shell around :class:`~microbatch._core.policy.BatchPolicy`.

Two tasks share one small state object and never block each other for long:

- the **reader** task drains the source. Per record it only stores the record in a buffer; it
  consults the clock and the policy when a batch starts, when it fills, and at the end. A full
  batch goes to ``_ready`` and the reader waits there until the consumer has taken it, so it runs
  at most one batch ahead of the consumer.
- the **consumer** (the task iterating the stream) takes ready batches, and is the one that enforces
  ``max_wait``: while it waits for a batch it also waits for the partial batch's deadline, and at the
  deadline it cuts the partial batch out of the reader's buffer itself. It can do that while the
  source is silent, because the reader, not the consumer, is the task waiting on the source.

Both tasks run on one event loop thread, so the consumer only ever sees the reader suspended
(waiting on the source or on the consumer), never halfway through a batch. Order is kept by
construction: the consumer cuts a partial batch only when no full batch is waiting, and every
record in the buffer came after every record in ``_ready``.
"""

from __future__ import annotations

import sys
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from itertools import islice
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    NoReturn,
    Protocol,
    TypeVar,
    overload,
    runtime_checkable,
)

import anyio
import anyio.lowlevel

from ._batchstream import BatchStream
from ._core.policy import check_limits

if TYPE_CHECKING:
    from .sources.protocol import Source

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ChunkedSource", "batches"]

T = TypeVar("T")

#: Largest slice drawn at once from a plain (synchronous) iterable, whatever ``max_size`` is.
_SYNC_SLICE: Final = 65_536

@runtime_checkable
class ChunkedSource(Protocol[T]):
    """A source that delivers many records per await.

    ``chunks()`` returns an async iterator of lists of records, in source order; empty lists are
    allowed and skipped. Each list is handed over to the caller, which may keep it, slice it or
    give it out as a batch: the source must not change a list after yielding it.
    :func:`microbatch.read_lines` and :func:`microbatch.tcp_lines` are chunked sources, and
    :func:`batches` prefers ``chunks()`` over ``async for`` when a source has both.
    """

    def chunks(self) -> AsyncIterator[list[T]]: ...


@overload
def batches(
    source: ChunkedSource[T], *, max_size: int, max_wait: float | None = None
) -> AbstractAsyncContextManager[AsyncIterator[list[T]]]: ...


@overload
def batches(
    source: Source[T], *, max_size: int, max_wait: float | None = None
) -> AbstractAsyncContextManager[AsyncIterator[list[T]]]: ...


@overload
def batches(
    source: AsyncIterable[T] | Iterable[T], *, max_size: int, max_wait: float | None = None
) -> AbstractAsyncContextManager[AsyncIterator[list[T]]]: ...


def batches(
    source: ChunkedSource[T] | Source[T] | AsyncIterable[T] | Iterable[T],
    *,
    max_size: int,
    max_wait: float | None = None,
) -> AbstractAsyncContextManager[AsyncIterator[list[T]]]:
    """Cut ``source`` into lists of at most ``max_size`` records, also bounded in time by ``max_wait``.

    Use it as ``async with mb.batches(source, max_size=1000, max_wait=0.5) as stream:`` and iterate
    ``stream`` with ``async for batch in stream`` from one task. Guarantees:

    - every record comes out exactly once, in source order; a batch is a new ``list`` holding
      between 1 and ``max_size`` records;
    - a partial batch comes out at most ``max_wait`` seconds after its first record arrived, also
      while the source is silent, provided the consumer is waiting for it then (a consumer busy
      with the previous batch gets it, with whatever arrived meanwhile, as soon as it asks).
      ``max_wait=None`` (the default) holds a partial batch until it fills or the source ends;
      (a ``Pipeline`` defaults to 0.5 s instead, because its sources are often live — a followed
      file, a TCP server — where a partial batch must not wait for traffic that may not come;
      ``batches()`` is also used on finite sources, where full batches are what one wants);
      ``max_wait=0`` hands out whatever has arrived whenever the consumer asks;
    - when the source ends, the remainder comes out as a last, shorter batch;
    - an exception raised by the source comes out of ``async for``, unchanged, after the batches
      of every record read before it;
    - leaving the ``async with`` block early (``break``, an exception, cancellation) cancels the
      reading task, closes the source's iterator (``aclose()``, so an async generator's
      ``finally`` runs) and leaves no task behind.

    Sources, in order of preference:

    - a :class:`ChunkedSource` (``source.chunks()``, e.g. ``mb.read_lines(path)``): batches are cut
      by slicing its lists, with no per-record work; a :class:`~microbatch.Source` whose
      ``chunks()`` yields :class:`~microbatch.Chunk` objects is read the same way (their
      ``records``; positions matter only to a pipeline's checkpoints);
    - an async iterable of records: read one record per ``__anext__``;
    - a plain iterable (a list, a generator): drawn in slices of up to ``min(max_size, 65536)``
      records with the event loop free between slices. Drawing must not block: an iterator that
      blocks (reading a socket, ``time.sleep``) blocks the whole event loop while it does.

    A source that is also an async context manager (``mb.tcp_lines(...)``, a memory object
    stream) is entered for the duration of the ``async with`` block, and its iterator is obtained
    after entering it.

    Memory: besides the batch the consumer holds, one full batch waits for the consumer while the
    next one fills; a chunked source adds at most the batches cut from one chunk.

    Raises ``TypeError`` (``max_size`` not an int, ``max_wait`` not a number, a ``str``/``bytes``
    or non-iterable source) or ``ValueError`` (``max_size < 1``, ``max_wait`` negative or NaN) at
    the call, before anything is read.
    """
    check_limits(max_size, max_wait)
    _check_source(source)
    return _Batches(_batches(source, max_size, max_wait))


class _Batches(AbstractAsyncContextManager[AsyncIterator[list[T]]]):
    """What :func:`batches` returns: an async context manager, and a clear error when iterated."""

    __slots__ = ("_cm",)

    def __init__(self, cm: AbstractAsyncContextManager[AsyncIterator[list[T]]]) -> None:
        self._cm = cm

    async def __aenter__(self) -> AsyncIterator[list[T]]:
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)

    def __aiter__(self) -> NoReturn:
        raise TypeError(
            "mb.batches() starts a reading task, so it is an async context manager: write "
            "'async with mb.batches(source, max_size=...) as stream:' and then "
            "'async for batch in stream:' inside the block"
        )


def _check_source(source: object) -> None:
    if isinstance(source, (str, bytes, bytearray)):
        raise TypeError(
            f"source is a {type(source).__name__}, which would be batched character by character; "
            f"pass mb.read_lines(path) to read a file, or a list of records"
        )
    if not (
        callable(getattr(source, "chunks", None))
        or hasattr(source, "__aiter__")
        or hasattr(source, "__iter__")
    ):
        raise TypeError(
            f"source must be an async iterable, an iterable or an object with a chunks() method, "
            f"got {type(source).__name__}"
        )


@asynccontextmanager
async def _batches(source: Any, max_size: int, max_wait: float | None) -> AsyncGenerator[BatchStream[Any]]:
    stream: BatchStream[Any] = BatchStream(max_size, max_wait)
    body_error: Exception | None = None
    try:
        async with AsyncExitStack() as stack:
            if hasattr(type(source), "__aenter__"):
                await stack.enter_async_context(source)
            iterator: AsyncIterator[Any]
            if callable(getattr(source, "chunks", None)):
                iterator, read = source.chunks(), stream.read_chunks
            elif hasattr(source, "__aiter__"):
                iterator, read = aiter(source), stream.read_items
            else:
                size = min(max_size, _SYNC_SLICE)
                iterator, read = _sync_chunks(iter(source), size), stream.read_chunks
            stack.push_async_callback(stream.close_source, iterator)
            async with anyio.create_task_group() as tg:
                tg.start_soon(read, iterator)
                try:
                    yield stream
                except Exception as exc:
                    # Raised after the task group has exited, so that no backend wraps it in an
                    # exception group and the source's __aexit__ sees a normal exit.
                    body_error = exc
                finally:
                    stream._closed = True
                    tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        single = group.exceptions[0]
        raise single from single.__cause__
    if body_error is not None:
        raise body_error


async def _sync_chunks(iterator: Iterator[T], size: int) -> AsyncGenerator[list[T]]:
    """Slices of ``size`` records of a plain iterator, letting other tasks run between slices."""
    try:
        while True:
            chunk: list[T] = []
            error: Exception | None = None
            try:
                # extend() keeps the records drawn before the iterator raised.
                chunk.extend(islice(iterator, size))
            except Exception as exc:
                error = exc
            if chunk:
                yield chunk
            if error is not None:
                raise error
            if len(chunk) < size:
                return
            await anyio.lowlevel.checkpoint()
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
