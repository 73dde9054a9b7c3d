"""``batches()``: the async shell around :class:`~microbatch._policy.BatchPolicy`.

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

import asyncio
import functools
import sys
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from itertools import islice
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    NoReturn,
    Protocol,
    TypeVar,
    overload,
    runtime_checkable,
)

import anyio
import anyio.lowlevel

from ._core.deadline import wait_deadline
from ._core.policy import BatchPolicy, check_limits

if TYPE_CHECKING:
    from .sources.protocol import Source

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ChunkedSource", "batches", "wait_until"]

T = TypeVar("T")

#: Largest slice drawn at once from a plain (synchronous) iterable, whatever ``max_size`` is.
_SYNC_SLICE: Final = 65_536

#: Marks the free slots of the reader's pre-sized buffer; never a record.
_EMPTY: Final[Any] = object()


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


async def wait_until(deadline: float | None, wait: Callable[[], Awaitable[object]]) -> bool:
    """Await ``wait()`` until the absolute ``deadline`` (``anyio.current_time()``; None: no limit).

    Returns True when ``wait()`` returned, False when the deadline came first (``wait()`` is then
    cancelled, so it must be safe to cancel: an event's ``wait()``, a memory stream's
    ``receive()``). Exceptions of ``wait()`` propagate. The one way microbatch waits for a
    partial batch's deadline.
    """
    with anyio.CancelScope(deadline=wait_deadline(deadline)):
        await wait()
        return True
    return False


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
async def _batches(source: Any, max_size: int, max_wait: float | None) -> AsyncGenerator[_BatchStream[Any]]:
    stream: _BatchStream[Any] = _BatchStream(max_size, max_wait)
    body_error: Exception | None = None
    try:
        async with AsyncExitStack() as stack:
            if hasattr(type(source), "__aenter__"):
                await stack.enter_async_context(source)
            iterator: AsyncIterator[Any]
            if callable(getattr(source, "chunks", None)):
                iterator, read = source.chunks(), stream._read_chunks
            elif hasattr(source, "__aiter__"):
                iterator, read = aiter(source), stream._read_items
            else:
                size = min(max_size, _SYNC_SLICE)
                iterator, read = _sync_chunks(iter(source), size), stream._read_chunks
            stack.push_async_callback(stream._close_source, iterator)
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


def _bare_checkpoint() -> Callable[[], Awaitable[None]]:
    """The running backend's own ``checkpoint``: what ``anyio.lowlevel.checkpoint()`` awaits,
    without looking the backend up on every call (it runs twice per batch)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return functools.partial(asyncio.sleep, 0)
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            checkpoint: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint
            return checkpoint
    return anyio.lowlevel.checkpoint


def _filled(buf: list[Any]) -> int:
    """The number of records at the front of a reader buffer (its free slots hold ``_EMPTY``)."""
    hi = len(buf)
    if not hi or buf[-1] is not _EMPTY:
        return hi
    lo, hi = 0, hi - 1  # buf[hi] is free; find the first free slot
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[mid] is _EMPTY:
            hi = mid
        else:
            lo = mid + 1
    return lo


class _BatchStream(Generic[T]):
    """The async iterator of batches given by ``async with batches(...)``; one consumer task."""

    def __init__(self, max_size: int, max_wait: float | None) -> None:
        self._max_size = max_size
        self._policy = BatchPolicy(max_size, max_wait)
        #: Full batches cut by the reader, not yet taken by the consumer.
        self._ready: deque[list[T]] = deque()
        #: The records of the partial batch. The per-record reader pads it with _EMPTY and keeps a
        #: reference: the consumer empties it in place (never replaces it) when it takes the
        #: partial batch, which tells the reader that its next record starts a new batch.
        self._buf: list[Any] = []
        self._finished = False  # the reader stopped: the source ended or raised
        self._read_all = False  # the source ended or raised (so it needs no closing)
        self._error: Exception | None = None
        self._closed = False
        self._consumer_wakeup: anyio.Event | None = None
        self._reader_wakeup: anyio.Event | None = None
        # anyio.Event() looks the backend up on every call; the backend's own class does not.
        self._event: type[anyio.Event] = type(anyio.Event())
        self._checkpoint = _bare_checkpoint()

    def __aiter__(self) -> _BatchStream[T]:
        return self

    async def __anext__(self) -> list[T]:
        policy = self._policy
        yielded = False
        while True:
            if self._closed:
                raise RuntimeError(
                    "this batch stream is closed: iterate it inside "
                    "'async with mb.batches(...) as stream:'"
                )
            ready = self._ready
            if ready:
                batch = ready.popleft()
                if not ready and self._reader_wakeup is not None:
                    self._reader_wakeup.set()
                return batch
            if self._finished:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            if self._consumer_wakeup is not None:
                raise RuntimeError("another task is already iterating this batch stream; use one consumer")
            deadline = policy.deadline
            if deadline is None:
                if not yielded:
                    # A reader that never has to wait for its source fills the next batch within
                    # this turn of the event loop: a plain yield is cheaper than an event.
                    yielded = True
                    await self._checkpoint()
                    continue
                await self._wait()
                continue
            now = anyio.current_time()
            if policy.due(now):
                return self._take_partial(now)
            await wait_until(deadline, self._wait)

    def _take_partial(self, now: float) -> list[T]:
        """Cut the reader's partial batch, whose deadline has passed."""
        policy, buf = self._policy, self._buf
        n = _filled(buf)
        # The reader tells the policy about records only when a batch starts; catch it up.
        full = policy.add(n - policy.pending, now)
        assert full == 0, "a full batch was left in the reader's buffer"
        n = policy.take_partial()
        batch = buf[:n]
        buf.clear()
        return batch

    async def _wait(self) -> None:
        event = self._consumer_wakeup = self._event()
        try:
            await event.wait()
        finally:
            self._consumer_wakeup = None

    def _wake_consumer(self) -> None:
        if self._consumer_wakeup is not None:
            self._consumer_wakeup.set()

    async def _hand_over(self, out: Iterable[list[T]]) -> None:
        """Queue full batches for the consumer and wait until it has taken all of them."""
        self._ready.extend(out)
        self._wake_consumer()
        # A consumer waiting for this batch runs first and takes it, so the reader usually finds
        # `_ready` empty after one turn of the event loop and needs no event of its own.
        await self._checkpoint()
        while self._ready:
            event = self._reader_wakeup = self._event()
            try:
                await event.wait()
            finally:
                self._reader_wakeup = None

    def _finish(self, rest: list[T], error: Exception | None) -> None:
        """The source ended (or raised): queue the remainder and let the consumer finish."""
        policy = self._policy
        policy.add(len(rest) - policy.pending, 0.0)
        if policy.flush():
            self._ready.append(rest)
        self._error = error
        self._finished = self._read_all = True
        self._wake_consumer()

    async def _read_items(self, iterator: AsyncIterator[T]) -> None:
        """Reader for a per-record async iterator: one store per record, nothing else.

        The buffer is pre-sized to ``max_size - 1`` slots, so the record that completes a batch is
        the one that does not fit, and the loop needs no comparison. With ``max_wait`` set, the
        buffer is empty between batches, so the first record of a batch does not fit either and
        the reader learns when the batch started (the consumer empties the buffer in place when it
        takes a partial batch, with the same effect).
        """
        m, policy = self._max_size, self._policy
        timed = policy.max_wait is not None
        if not timed:
            self._buf = [_EMPTY] * (m - 1)
        buf: list[Any] = self._buf
        i = 0
        error: Exception | None = None
        try:
            while True:
                # The hot loop; a try block costs nothing until it catches (Python 3.11+).
                async for x in iterator:
                    try:
                        buf[i] = x
                    except IndexError:
                        break
                    i += 1
                else:
                    break
                if buf or m == 1:
                    # x completes the batch: buf holds max_size - 1 records.
                    buf.append(x)
                    # No record is left over, so `now` is not used: skip the clock.
                    full = policy.add(m - policy.pending, 0.0)
                    assert full == 1, "the reader's buffer was not full"
                    batch = buf
                    self._buf = buf = [] if timed else [_EMPTY] * (m - 1)
                    i = 0
                    await self._hand_over((batch,))
                else:
                    # x starts a batch (only with max_wait set): set its deadline.
                    self._buf = buf = [_EMPTY] * (m - 1)
                    buf[0] = x
                    i = 1
                    policy.add(1, anyio.current_time())
                    self._wake_consumer()
        except Exception as exc:
            error = exc
        # The consumer may have emptied buf at a deadline since i was last reset.
        self._finish(buf[:i], error)

    async def _read_chunks(self, iterator: AsyncIterator[list[T]]) -> None:
        """Reader for lists of records: cuts batches by slicing, one clock read per list."""
        # Imported here: the sources import this module (for wait_until), not the other way round.
        from .sources.protocol import Chunk

        m, policy = self._max_size, self._policy
        error: Exception | None = None
        try:
            async for chunk in iterator:
                if type(chunk) is not list:
                    if isinstance(chunk, Chunk):
                        chunk = chunk.records
                    if type(chunk) is not list:
                        chunk = list(chunk)
                if not chunk:
                    continue
                started = policy.pending == 0
                full = policy.add(len(chunk), anyio.current_time())
                if not full:
                    self._buf.extend(chunk)
                    if started:
                        self._wake_consumer()  # a new deadline to wait for
                    continue
                # Each record is copied once: the partial batch is completed from the chunk's
                # head, the other batches are sliced from the chunk itself.
                pending = self._buf
                out: list[list[T]] = []
                start = 0
                if pending:
                    start = m - len(pending)
                    pending.extend(islice(chunk, start))
                    out.append(pending)
                    full -= 1
                elif full == 1 and len(chunk) == m:
                    out.append(chunk)  # exactly one batch: hand the list over as it is
                    full, start = 0, m
                cut = start + full * m
                out.extend(chunk[k : k + m] for k in range(start, cut, m))
                self._buf = chunk[cut:]
                await self._hand_over(out)
        except Exception as exc:
            error = exc
        self._finish(self._buf, error)

    async def _close_source(self, iterator: AsyncIterator[Any]) -> None:
        """Close the source's iterator if reading stopped before the source ended."""
        if self._read_all:
            return
        self._read_all = True
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
