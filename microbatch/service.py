"""``Batcher``: dynamic batching for async services.

Many concurrent tasks (request handlers, typically) each submit one item and await that item's
result, while ``fn`` is called underneath on lists of items bounded by size and by time::

    async def embed(texts: list[str]) -> list[list[float]]:
        ...  # one call to a model, a database or an HTTP API for the whole list

    async with mb.Batcher(embed, max_size=32, max_wait=0.005) as batcher:
        vector = await batcher.submit("hello")   # in each request handler

How it works: ``submit`` appends the item to a queue and parks its caller on one event; a single
flusher task cuts the queue into batches with :class:`microbatch._policy.BatchPolicy` (a batch is
due when it holds ``max_size`` items, or ``max_wait`` seconds after its first item arrived) and
starts one task per batch, at most ``max_concurrent_batches`` at a time. The flusher is woken only
when a full batch forms, a new partial batch starts its clock, a batch finishes, or the batcher
closes: the items in between cost a queue append and a counter update.

While every batch slot is busy, the waiting partial batch keeps growing up to ``max_size`` instead
of being cut at its deadline, so a slow ``fn`` receives larger batches; it is dispatched as soon as
a slot frees. ``max_wait`` is therefore the bound on batching delay, not on queueing delay.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

import anyio
import anyio.to_thread

from ._batching import wait_until
from ._core.policy import BatchPolicy, check_limits
from ._exceptions import BatcherClosed, BatcherFull

__all__ = ["Batcher", "BatcherStats", "BatchExecutor", "PendingResult"]

T = TypeVar("T")
R = TypeVar("R")

#: What ``Batcher`` accepts as fn: ``list[T]`` in, one result (or exception instance) per item out.
AsyncBatchFn: TypeAlias = Callable[[list[T]], Awaitable[Iterable[R | Exception]]]
SyncBatchFn: TypeAlias = Callable[[list[T]], Iterable[R | Exception]]

# Slot states. A slot is one submitted item and the place its result is delivered to.
_BLOCKED = 0  # its caller waits for room (max_pending items are queued)
_QUEUED = 1  # in the queue, not yet given to fn
_RUNNING = 2  # part of a batch that fn is processing
_DONE = 3  # result or error delivered
_DROPPED = 4  # its caller went away after dispatch; the result will be discarded

# Batcher lifecycle.
_NEW = 0
_OPEN = 1
_CLOSING = 2
_CLOSED = 3


class BatchExecutor(Protocol):
    """Anything that can run a synchronous ``fn(arg)`` somewhere and await its result.

    microbatch's executors (worker processes, threads, inline, Dask) all fit; a ``Batcher`` given
    one calls ``await executor.run(fn, items)`` once per batch, so the executor's own defaults
    (timeout, retries of a crashed worker) apply. Whatever ``run`` raises reaches every caller of
    that batch.
    """

    def run(self, fn: Callable[[Any], Any], arg: Any, /) -> Awaitable[Any]:
        """Run ``fn(arg)`` and return its result."""
        ...


class _Slot(Generic[T, R]):
    """One submitted item, its state, and where its caller waits for the outcome."""

    __slots__ = ("item", "event", "state", "value", "error", "tb", "t_submit", "t_admit")

    def __init__(self, item: T, event: anyio.Event, now: float) -> None:
        self.item = item
        self.event = event
        self.state = _QUEUED
        self.value: R | None = None
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None
        self.t_submit = now
        self.t_admit = now


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a ``Batcher``'s counters (``batcher.stats``); times are in seconds."""

    #: Batches given to fn (a batch whose callers were all cancelled is never given and not counted).
    batches: int = 0
    #: Items given to fn.
    items: int = 0
    #: Batches cut because they reached ``max_size``.
    flushed_by_size: int = 0
    #: Partial batches cut because ``max_wait`` passed since their first item.
    flushed_by_time: int = 0
    #: Partial batches cut because the batcher was closing.
    flushed_by_close: int = 0
    #: How many batches had each size: ``{size: count}``.
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    #: Sum over items of the time from ``submit`` to the dispatch of their batch.
    wait_total: float = 0.0
    #: The longest such time.
    wait_max: float = 0.0
    #: Batches that failed as a whole: fn raised, or returned the wrong number of results.
    batch_errors: int = 0
    #: Items whose slot in fn's result held an exception instance.
    item_errors: int = 0
    #: Items withdrawn before dispatch because their caller was cancelled; they never reached fn.
    cancelled: int = 0
    #: Results discarded because their caller was cancelled after dispatch.
    dropped: int = 0
    #: Items queued for a batch right now (at most ``max_pending``).
    pending: int = 0
    #: Callers waiting in ``submit`` for room in the queue right now.
    blocked: int = 0
    #: Batches being processed by fn right now (at most ``max_concurrent_batches``).
    running: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Mean number of items per batch (0.0 before the first batch)."""
        return self.items / self.batches if self.batches else 0.0

    @property
    def max_batch_size(self) -> int:
        """Largest batch given to fn so far (0 before the first batch)."""
        return max(self.batch_sizes, default=0)

    @property
    def mean_wait(self) -> float:
        """Mean time from ``submit`` to dispatch, over the items given to fn."""
        return self.wait_total / self.items if self.items else 0.0


class PendingResult(Generic[R]):
    """The handle ``Batcher.submit_nowait`` returns: ``await`` it for the item's result.

    The item is queued whether or not the handle is ever awaited; a result nobody awaits is
    discarded. Awaiting it behaves exactly like ``await batcher.submit(item)`` from that point:
    cancelling the awaiting task before the item is dispatched withdraws the item.
    """

    __slots__ = ("_batcher", "_slot")

    def __init__(self, batcher: Batcher[Any, R], slot: _Slot[Any, R]) -> None:
        self._batcher = batcher
        self._slot = slot

    def __await__(self) -> Generator[Any, None, R]:
        return self._batcher._wait(self._slot).__await__()

    def done(self) -> bool:
        """Whether the item's result (or error) has been delivered."""
        return self._slot.state == _DONE

    def cancel(self) -> bool:
        """Withdraw the item if fn has not received it yet; return whether it was withdrawn.

        A withdrawn item never reaches fn, and awaiting this handle afterwards raises
        ``BatcherClosed`` naming the withdrawal. Once dispatched, an item cannot be withdrawn and
        ``False`` is returned.
        """
        slot = self._slot
        if slot.state not in (_QUEUED, _BLOCKED):
            return False
        self._batcher._abandon(slot)
        slot.error = BatcherClosed("this item was withdrawn with PendingResult.cancel() before dispatch")
        slot.state = _DONE
        slot.event.set()
        return True


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose class defines ``async def __call__``.
    return inspect.iscoroutinefunction(type(fn).__call__)


def _fn_name(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__name__


class Batcher(Generic[T, R]):
    """Collect items submitted by concurrent tasks into batches for ``fn``; each caller gets its own result.

    ``fn`` takes a list of items and returns a list (any sized iterable) of the same length, in the
    same order: result ``i`` belongs to item ``i``. It may be ``async def`` (awaited in the event
    loop, so it must not block) or a plain function (run in a worker thread with
    ``anyio.to_thread.run_sync``, or with ``await executor.run(fn, items)`` when ``executor`` is
    given, e.g. a pool of worker processes).

    Use it as an async context manager; the batcher runs a background flusher task for as long as
    the block lasts::

        async with Batcher(embed, max_size=32, max_wait=0.005) as batcher:
            vector = await batcher.submit(text)

    Parameters (keyword-only after ``fn``):

    - ``max_size``: the most items in one call of fn (>= 1).
    - ``max_wait``: seconds a partial batch waits for more items after its first one arrived
      (>= 0; ``0`` dispatches whatever has accumulated at the next turn of the event loop;
      ``None`` waits until the batch is full or the batcher closes).
    - ``max_concurrent_batches``: how many calls of fn may run at once (default 1). While all are
      busy the next batch keeps filling up to ``max_size``.
    - ``max_pending``: how many items may wait in the queue for a batch (default
      ``10 * max_size``; must be >= ``max_size``). Beyond it ``submit`` waits for room
      (backpressure, first come first served) and ``submit_nowait`` raises ``BatcherFull``.
      Memory held by the batcher is at most ``max_pending + max_concurrent_batches * max_size``
      items with their results, plus one item per caller blocked in ``submit``.
    - ``executor``: runs a synchronous ``fn``; see :class:`BatchExecutor`. Not allowed with an
      ``async def`` fn.

    Failures stay with their owners:

    - fn raising (or the executor failing) sends that exception to every caller of the batch;
      all callers receive the same exception object.
    - fn returning the wrong number of results raises ``ValueError`` to every caller of the batch,
      naming the batch number and both lengths; a result that is not a sized iterable raises
      ``TypeError`` the same way.
    - an ``Exception`` *instance* returned in slot ``i`` of the results is raised to the caller of
      item ``i`` only; the other callers get their results. (So fn cannot return exceptions as
      plain values; wrap them, e.g. in a tuple, if it must.)
    - a caller cancelled before its item is dispatched withdraws the item: fn never sees it. A
      caller cancelled after dispatch does not stop the batch; its result is discarded.
    - none of these stop the batcher; the next batch runs normally.

    Closing (the end of the ``async with`` block, or :meth:`close`) stops intake: later ``submit``
    calls raise ``BatcherClosed``. Items already submitted, including callers blocked by
    backpressure, are still batched and get their results; the block exits once they are done.
    If the block exits with an exception, or is cancelled, items not yet dispatched get
    ``BatcherClosed`` instead, running async batches are cancelled (their callers also get
    ``BatcherClosed``), and a batch running in a thread is waited for.

    Invalid arguments raise ``ValueError`` (or ``TypeError`` for a wrong type) naming the parameter.
    """

    def __init__(
        self,
        fn: AsyncBatchFn[T, R] | SyncBatchFn[T, R],
        *,
        max_size: int,
        max_wait: float | None,
        max_concurrent_batches: int = 1,
        max_pending: int | None = None,
        executor: BatchExecutor | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (a function taking a list of items), got {fn!r}")
        check_limits(max_size, max_wait)
        _check_int("max_concurrent_batches", max_concurrent_batches, 1)
        if max_pending is None:
            max_pending = 10 * max_size
        _check_int("max_pending", max_pending, max_size, f"max_size={max_size}")
        self._is_async = _is_async_callable(fn)
        if executor is not None:
            if not callable(getattr(executor, "run", None)):
                raise TypeError(
                    f"executor must have an async run(fn, arg) method (a microbatch executor), "
                    f"got {executor!r}"
                )
            if self._is_async:
                raise ValueError(
                    f"executor= runs synchronous functions, but fn {_fn_name(fn)} is async; "
                    f"pass a plain def function, or drop executor= to await fn in the event loop"
                )
        self._fn: Callable[[list[T]], Any] = fn
        self._name = _fn_name(fn)
        self._executor = executor
        self.max_size = max_size
        self.max_wait = max_wait
        self.max_concurrent_batches = max_concurrent_batches
        self.max_pending = max_pending

        self._policy = BatchPolicy(max_size, max_wait)
        self._queue: deque[_Slot[T, R]] = deque()
        self._blocked: deque[_Slot[T, R]] = deque()
        self._full = 0  # full batches at the front of the queue (the policy's ``add`` results)
        self._running = 0
        self._state = _NEW
        self._wake: anyio.Event | None = None  # set while the flusher sleeps
        self._tg: anyio.abc.TaskGroup | None = None
        self._seq = 0

        self._items = 0
        self._by_size = 0
        self._by_time = 0
        self._by_close = 0
        self._sizes: dict[int, int] = {}
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._batch_errors = 0
        self._item_errors = 0
        self._cancelled = 0
        self._dropped = 0

    def __repr__(self) -> str:
        return (
            f"Batcher(fn={self._name}, max_size={self.max_size}, max_wait={self.max_wait}, "
            f"max_concurrent_batches={self.max_concurrent_batches}, max_pending={self.max_pending})"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Batcher[T, R]:
        if self._state != _NEW:
            raise RuntimeError(f"{self!r} was already started; a Batcher runs once, create a new one")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = _OPEN
        tg.start_soon(self._flush_loop, name=f"microbatch.Batcher({self._name}) flusher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._tg
        assert tg is not None
        if self._state == _OPEN:
            self._state = _CLOSING
        if exc is not None:
            self._abort(f"its 'async with' block exited with {type(exc).__name__}")
            tg.cancel_scope.cancel()
            self._notify()
        else:
            self._notify()
        # The body's own exception is re-raised by the caller of __aexit__; handing it to the task
        # group would wrap it in an ExceptionGroup. Cancellation must reach the task group's scope.
        passed = exc if isinstance(exc, anyio.get_cancelled_exc_class()) else None
        try:
            if passed is None:
                await tg.__aexit__(None, None, None)
            else:
                await tg.__aexit__(type(passed), passed, passed.__traceback__)
        finally:
            self._state = _CLOSED
            self._abort("it was shut down")
        return False

    def close(self) -> None:
        """Stop accepting items; those already submitted are still batched and get their results.

        Idempotent. The ``async with`` block calls it on exit and then waits for the pending
        items; calling it earlier lets new ``submit`` calls fail fast with ``BatcherClosed``.
        """
        if self._state in (_NEW, _OPEN):
            self._state = _CLOSING if self._state == _OPEN else _CLOSED
            self._notify()

    @property
    def closed(self) -> bool:
        """Whether new items are refused (``close`` was called or the block ended)."""
        return self._state >= _CLOSING

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters; see :class:`BatcherStats`."""
        return BatcherStats(
            batches=sum(self._sizes.values()),
            items=self._items,
            flushed_by_size=self._by_size,
            flushed_by_time=self._by_time,
            flushed_by_close=self._by_close,
            batch_sizes=dict(sorted(self._sizes.items())),
            wait_total=self._wait_total,
            wait_max=self._wait_max,
            batch_errors=self._batch_errors,
            item_errors=self._item_errors,
            cancelled=self._cancelled,
            dropped=self._dropped,
            pending=len(self._queue),
            blocked=len(self._blocked),
            running=self._running,
        )

    # -- intake ----------------------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and return its result once fn has processed it.

        Waits for room while ``max_pending`` items are queued. Raises whatever fn raised for the
        whole batch, the exception instance fn returned for this item, ``ValueError`` /
        ``TypeError`` when fn broke its contract (see the class docstring), and ``BatcherClosed``
        after the batcher was closed or when it shut down before the item ran. Cancelling the
        caller before dispatch withdraws the item.
        """
        if self._state != _OPEN:
            raise self._refusal()
        slot: _Slot[T, R] = _Slot(item, anyio.Event(), anyio.current_time())
        if len(self._queue) < self.max_pending:
            self._admit(slot)
        else:
            slot.state = _BLOCKED
            self._blocked.append(slot)
        return await self._wait(slot)

    def submit_nowait(self, item: T) -> PendingResult[R]:
        """Queue ``item`` without waiting for room; ``await`` the returned handle for its result.

        Raises ``BatcherFull`` at once when ``max_pending`` items are queued (nothing is queued
        then), and ``BatcherClosed`` after close. Must be called from a task in the batcher's
        event loop.
        """
        if self._state != _OPEN:
            raise self._refusal()
        if len(self._queue) >= self.max_pending:
            raise BatcherFull(
                f"{self!r} has max_pending={self.max_pending} items waiting for a batch; "
                f"await submit() to wait for room, retry later, or raise max_pending"
            )
        slot: _Slot[T, R] = _Slot(item, anyio.Event(), anyio.current_time())
        self._admit(slot)
        return PendingResult(self, slot)

    def _refusal(self) -> Exception:
        if self._state == _NEW:
            return RuntimeError(
                f"{self!r} is not running; submit from inside 'async with Batcher(...) as batcher:'"
            )
        return BatcherClosed(
            f"{self!r} is closed: submit() was called after close() or after its 'async with' "
            f"block ended; keep the block open for as long as items are submitted"
        )

    def _admit(self, slot: _Slot[T, R]) -> None:
        """Append ``slot`` to the queue at ``slot.t_admit`` and wake the flusher if it must act."""
        self._queue.append(slot)
        policy = self._policy
        full = policy.add(1, slot.t_admit)
        if full:
            self._full += full
        elif policy.pending != 1 or policy.deadline is None:
            return  # joined a partial batch whose deadline the flusher already sleeps on
        if self._running < self.max_concurrent_batches:
            self._notify()

    async def _wait(self, slot: _Slot[T, R]) -> R:
        try:
            await slot.event.wait()
        except BaseException:
            self._abandon(slot)
            raise
        error = slot.error
        if error is not None:
            # All callers of a failed batch share one exception object: restore its original
            # traceback so each raise shows fn's frames plus this caller's, not every caller's.
            raise error.with_traceback(slot.tb)
        return cast(R, slot.value)

    def _abandon(self, slot: _Slot[T, R]) -> None:
        """The caller of ``slot`` went away (cancelled): withdraw the item or drop its result."""
        state = slot.state
        if state == _QUEUED:
            self._queue.remove(slot)
            self._cancelled += 1
            self._recount()
            self._admit_blocked(anyio.current_time())
            self._notify()
        elif state == _BLOCKED:
            self._blocked.remove(slot)
            self._cancelled += 1
        elif state in (_RUNNING, _DONE):
            slot.state = _DROPPED
            self._dropped += 1

    def _recount(self) -> None:
        """Re-derive the policy's counts after an item left the middle of the queue.

        ``BatchPolicy`` has no way to remove a record, so the counts are rebuilt from the queue:
        it is regrouped from its front, and the partial batch's deadline is ``max_wait`` after
        the admission of its (new) first item.
        """
        queue = self._queue
        self._policy.flush()
        n = len(queue)
        rest = n % self.max_size
        start = queue[n - rest].t_admit if rest else 0.0
        self._full = self._policy.add(n, start)

    def _admit_blocked(self, now: float) -> None:
        blocked = self._blocked
        while blocked and len(self._queue) < self.max_pending:
            slot = blocked.popleft()
            slot.state = _QUEUED
            slot.t_admit = now
            self._queue.append(slot)
            self._full += self._policy.add(1, now)

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    # -- dispatch --------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        try:
            while True:
                now = anyio.current_time()
                if self._running < self.max_concurrent_batches and self._dispatch_next(now):
                    continue
                if self._state != _OPEN and not self._queue and not self._blocked:
                    return
                self._wake = wake = anyio.Event()
                # Woken by _notify (new batch, new partial, batch done, close) or by the partial
                # batch's deadline, which does not matter while every batch slot is taken.
                busy = self._running >= self.max_concurrent_batches
                await wait_until(None if busy else self._policy.deadline, wake.wait)
                self._wake = None
        finally:
            self._wake = None
            self._abort("it shut down before this item's batch ran")

    def _dispatch_next(self, now: float) -> bool:
        """Cut the next batch that is due and start it; return whether one was started."""
        policy = self._policy
        if self._full:
            self._full -= 1
            n = self.max_size
            self._by_size += 1
        elif self._state != _OPEN and policy.pending:
            n = policy.flush()
            self._by_close += 1
        elif policy.due(now):
            n = policy.take_partial()
            self._by_time += 1
        else:
            return False
        queue = self._queue
        slots = [queue.popleft() for _ in range(n)]
        self._admit_blocked(now)
        for slot in slots:
            slot.state = _RUNNING
        self._seq += 1
        self._items += n
        self._sizes[n] = self._sizes.get(n, 0) + 1
        self._wait_total += n * now - math.fsum(slot.t_submit for slot in slots)
        self._wait_max = max(self._wait_max, now - slots[0].t_submit)
        self._running += 1
        assert self._tg is not None
        self._tg.start_soon(self._run_batch, self._seq, slots, name=f"microbatch.Batcher batch {self._seq}")
        return True

    async def _run_batch(self, seq: int, slots: list[_Slot[T, R]]) -> None:
        items = [slot.item for slot in slots]
        try:
            try:
                results = await self._call(items)
                values = self._check_results(results, len(slots), seq)
            except Exception as exc:
                self._batch_errors += 1
                tb = exc.__traceback__
                for slot in slots:
                    slot.error = exc
                    slot.tb = tb
                    _deliver(slot)
                return
            for slot, value in zip(slots, values, strict=True):
                if isinstance(value, Exception):
                    self._item_errors += 1
                    slot.error = value
                    slot.tb = value.__traceback__
                else:
                    slot.value = value
                _deliver(slot)
        finally:
            for slot in slots:
                if slot.state == _RUNNING:  # cancelled while fn ran: the batcher is shutting down
                    slot.error = BatcherClosed(
                        f"{self!r} shut down while batch {seq} was running; its result is lost"
                    )
                    _deliver(slot)
            self._running -= 1
            self._notify()

    async def _call(self, items: list[T]) -> Any:
        if self._is_async:
            return await self._fn(items)
        if self._executor is not None:
            return await self._executor.run(self._fn, items)
        return await anyio.to_thread.run_sync(self._fn, items)

    def _check_results(self, results: Any, expected: int, seq: int) -> list[Any]:
        where = f"batch {seq} of {self!r}"
        if inspect.isawaitable(results):
            if inspect.iscoroutine(results):
                results.close()
            raise TypeError(
                f"{where}: fn {self._name} returned an awaitable from a worker thread; an async fn "
                f"must be an 'async def' function (or an object with an 'async def __call__')"
            )
        if isinstance(results, (str, bytes, bytearray, Mapping)) or not isinstance(results, Iterable):
            raise TypeError(
                f"{where}: fn {self._name} returned {type(results).__name__}; it must return a list "
                f"with one result per item ({expected} items)"
            )
        values = results if isinstance(results, list) else list(results)
        if len(values) != expected:
            raise ValueError(
                f"{where}: fn {self._name} returned {len(values)} results for {expected} items; "
                f"it must return exactly one result per item, in order (return an exception "
                f"instance in an item's place to fail that item alone)"
            )
        return values

    def _abort(self, why: str) -> None:
        """Fail every item not yet dispatched with ``BatcherClosed``."""
        if not self._queue and not self._blocked:
            return
        error = BatcherClosed(f"{self!r}: {why}; this item was never given to fn")
        for queue in (self._queue, self._blocked):
            while queue:
                slot = queue.popleft()
                slot.error = error
                _deliver(slot)
        self._policy.flush()
        self._full = 0


def _deliver(slot: _Slot[Any, Any]) -> None:
    if slot.state != _DROPPED:
        slot.state = _DONE
    slot.event.set()


def _check_int(name: str, value: object, minimum: int, minimum_text: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum_text or minimum}, got {value}")
