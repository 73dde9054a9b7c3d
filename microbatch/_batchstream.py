"""The batch stream behind ``async with batches(...)``: one reading task fills, one consumer takes.

The reader appends records (or whole chunks) to a buffer; the consumer cuts batches from it as
:class:`~microbatch._core.policy.BatchPolicy` decides, waking at a partial batch's deadline. The
two meet through one event each way, and the hot path touches chunks, not records.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from itertools import islice
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.lowlevel

from ._core.policy import BatchPolicy
from ._waits import wait_until

__all__ = ["BatchStream"]

T = TypeVar("T")

#: Marks the free slots of the reader's pre-sized buffer; never a record.
_EMPTY: Final[Any] = object()


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


class BatchStream(Generic[T]):
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

    def __aiter__(self) -> BatchStream[T]:
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

    async def read_items(self, iterator: AsyncIterator[T]) -> None:
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

    async def read_chunks(self, iterator: AsyncIterator[list[T]]) -> None:
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

    async def close_source(self, iterator: AsyncIterator[Any]) -> None:
        """Close the source's iterator if reading stopped before the source ended."""
        if self._read_all:
            return
        self._read_all = True
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
