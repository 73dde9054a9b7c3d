"""``Batcher``: the async shell around :class:`microbatch._core.intake.Intake`.

``submit`` creates a slot for the item, hands it to the intake and parks its caller on the slot's
event; a single flusher task asks the intake for the next due batch and starts one task per batch.
The flusher is woken only when the intake says so (a full batch formed, a new partial batch started
its clock), when a batch finishes, or when the batcher closes: the items in between cost a queue
append and a counter update.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Generic, TypeAlias, TypeVar, cast

import anyio
import anyio.abc

from .._core.intake import Intake, Slot
from .._core.params import callable_name
from .._exceptions import BatcherClosed, BatcherFull
from .call import BatchCall, BatchExecutor, is_async_callable
from .dispatch import Dispatcher
from .pending import PendingResult
from .stats import BatcherStats, snapshot

__all__ = ["AsyncBatchFn", "Batcher", "SyncBatchFn"]

T = TypeVar("T")
R = TypeVar("R")

#: What ``Batcher`` accepts as fn: ``list[T]`` in, one result (or exception instance) per item out.
AsyncBatchFn: TypeAlias = Callable[[list[T]], Awaitable[Iterable[R | Exception]]]
SyncBatchFn: TypeAlias = Callable[[list[T]], Iterable[R | Exception]]

# Batcher lifecycle.
_NEW = 0
_OPEN = 1
_CLOSING = 2
_CLOSED = 3


class Batcher(Generic[T, R]):
    """Collect items submitted by concurrent tasks into batches for ``fn``; each caller gets its own result.

    ``fn`` takes a list of items and returns a list (any sized iterable) of the same length, in the
    same order: result ``i`` belongs to item ``i``. It may be ``async def`` (awaited in the event
    loop, so it must not block) or a plain function (run in a worker thread, or with
    ``await executor.run(fn, items)`` when ``executor`` is given, e.g. a ``ProcessExecutor``).

    Use it as an async context manager, which runs the background flusher for as long as the block
    lasts::

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

    Failures stay with their owners: fn raising (or the executor failing) sends that exception to
    every caller of the batch (all receive the same object); a wrong number of results raises
    ``BatchResultMismatch`` (a ``ValueError``) to every caller of the batch, naming the batch, fn and
    both lengths, and a result that is not a sized iterable a ``TypeError``; an ``Exception``
    *instance* in slot ``i`` of the results is raised to the caller of item ``i`` only. A caller
    cancelled before its item is dispatched withdraws the item; cancelled after, its result is
    discarded. None of these stop the batcher.

    Closing (the end of the ``async with`` block, or :meth:`close`) stops intake: later ``submit``
    calls raise ``BatcherClosed``. Items already submitted, including callers blocked by
    backpressure, are still batched and get their results; the block exits once they are done.
    If the block exits with an exception, or is cancelled, items not yet dispatched get
    ``BatcherClosed`` instead, running async batches are cancelled (their callers also get
    ``BatcherClosed``), and a batch running in a thread is waited for.

    Invalid arguments raise ``ValueError`` (or ``TypeError`` for a wrong type) naming the parameter.
    docs/batcher.md has the details.
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
        self._intake: Intake[T, R] = Intake(max_size, max_wait, max_concurrent_batches, max_pending)
        is_async = is_async_callable(fn)
        self._name = callable_name(fn)
        if executor is not None:
            if not callable(getattr(executor, "run", None)):
                raise TypeError(
                    f"executor must have an async run(fn, arg) method (a microbatch executor), "
                    f"got {executor!r}"
                )
            if is_async:
                raise ValueError(
                    f"executor= runs synchronous functions, but fn {self._name} is async; "
                    f"pass a plain def function, or drop executor= to await fn in the event loop"
                )
        call = BatchCall(fn, self._name, is_async, executor, None)
        self.max_size = max_size
        self.max_wait = max_wait
        self.max_concurrent_batches = max_concurrent_batches
        self.max_pending = self._intake.max_pending
        self._state = _NEW
        self._dispatcher: Dispatcher[T, R] = Dispatcher(self._intake, call, repr(self))
        self._own_tg: anyio.abc.TaskGroup | None = None  # the one 'async with' opens
        self._stopped: anyio.Event | None = None  # set once the batcher stopped

    def __repr__(self) -> str:
        return (
            f"Batcher(fn={self._name}, max_size={self.max_size}, max_wait={self.max_wait}, "
            f"max_concurrent_batches={self.max_concurrent_batches}, max_pending={self.max_pending})"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Batcher[T, R]:
        self._check_new()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._own_tg = tg
        await tg.start(self._serve, name=f"microbatch.Batcher({self._name})")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._own_tg
        assert tg is not None
        self.close()
        if exc is not None:
            self._intake.abort(
                f"{self!r}: its 'async with' block exited with {type(exc).__name__}; "
                f"this item was never given to fn"
            )
            tg.cancel_scope.cancel()
        # The body's own exception is re-raised by the caller of __aexit__; handing it to the task
        # group would wrap it in an ExceptionGroup. Cancellation must reach the task group's scope.
        passed = exc if isinstance(exc, anyio.get_cancelled_exc_class()) else None
        if passed is None:
            await tg.__aexit__(None, None, None)
        else:
            await tg.__aexit__(type(passed), passed, passed.__traceback__)
        return False

    def _check_new(self) -> None:
        if self._state != _NEW:
            raise RuntimeError(f"{self!r} was already started; a Batcher runs once, create a new one")

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the flusher until the batcher is closed and drained, or cancelled."""
        self._stopped = anyio.Event()
        self._state = _OPEN
        try:
            await self._dispatcher.serve(task_status)
        finally:
            self._state = _CLOSED
            self._intake.abort(f"{self!r}: it was shut down; this item was never given to fn")
            self._stopped.set()

    def close(self) -> None:
        """Stop accepting items; those already submitted are still batched and get their results.

        Idempotent. The ``async with`` block calls it on exit and then waits for the pending
        items; calling it earlier lets new ``submit`` calls fail fast with ``BatcherClosed``.
        """
        if self._state in (_NEW, _OPEN):
            self._state = _CLOSING if self._state == _OPEN else _CLOSED
            self._dispatcher.closing = True
            self._dispatcher.notify()

    @property
    def closed(self) -> bool:
        """Whether new items are refused (``close`` was called or the block ended)."""
        return self._state >= _CLOSING

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters; see :class:`BatcherStats`."""
        return snapshot(self._intake)

    # -- intake ----------------------------------------------------------------------------------

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and return its result once fn has processed it.

        Waits for room while ``max_pending`` items are queued. Raises whatever fn raised for the
        whole batch, the exception instance fn returned for this item, ``BatchResultMismatch`` /
        ``TypeError`` when fn broke its contract (see the class docstring), and ``BatcherClosed``
        after the batcher was closed or when it shut down before the item ran. Cancelling the
        caller before dispatch withdraws the item.
        """
        if self._state != _OPEN:
            raise self._refusal()
        slot: Slot[T, R] = Slot(item, anyio.Event(), anyio.current_time())
        if self._intake.offer(slot):
            self._dispatcher.notify()
        return await self._wait(slot)

    def submit_nowait(self, item: T) -> PendingResult[R]:
        """Queue ``item`` without waiting for room; ``await`` the returned handle for its result.

        Raises ``BatcherFull`` at once when ``max_pending`` items are queued (nothing is queued
        then), and ``BatcherClosed`` after close. Must be called from a task in the batcher's
        event loop.
        """
        if self._state != _OPEN:
            raise self._refusal()
        if not self._intake.has_room:
            raise BatcherFull(
                f"{self!r} has max_pending={self.max_pending} items waiting for a batch; "
                f"await submit() to wait for room, retry later, or raise max_pending"
            )
        slot: Slot[T, R] = Slot(item, anyio.Event(), anyio.current_time())
        if self._intake.admit(slot):
            self._dispatcher.notify()
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

    async def _wait(self, slot: Slot[T, R]) -> R:
        try:
            await cast(anyio.Event, slot.event).wait()
        except BaseException:
            self._abandon(slot)
            raise
        error = slot.error
        if error is not None:
            # All callers of a failed batch share one exception object: restore its original
            # traceback so each raise shows fn's frames plus this caller's, not every caller's.
            raise error.with_traceback(slot.tb)
        return cast(R, slot.value)

    def _abandon(self, slot: Slot[T, R]) -> None:
        """The caller of ``slot`` went away (cancelled): withdraw the item or drop its result."""
        if self._intake.withdraw(slot, anyio.current_time()):
            self._dispatcher.notify()
