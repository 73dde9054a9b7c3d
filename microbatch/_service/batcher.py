"""``Batcher``: the async shell around :class:`microbatch._core.intake.Intake`.

``submit`` creates a slot for the item, hands it to the intake and parks its caller on the slot's
event; a single flusher task asks the intake for the next due batch and starts one task per batch.
The flusher is woken only when the intake says so (a full batch formed, a new partial batch started
its clock), when a batch finishes, or when the batcher closes: the items in between cost a queue
append and a counter update.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeAlias, TypeVar, cast

import anyio
import anyio.abc

from .._core.intake import Intake, Slot
from .._core.params import callable_name, check_seconds
from .._exceptions import BatcherClosed, BatcherFull
from .call import BatchCall, BatchExecutor, is_async_callable
from .dispatch import Dispatcher
from .lifecycle import NEW, OPEN, Lifecycle
from .pending import PendingResult
from .stats import BatcherStats, snapshot

__all__ = ["AsyncBatchFn", "Batcher", "SyncBatchFn"]

T = TypeVar("T")
R = TypeVar("R")

#: What ``Batcher`` accepts as fn: ``list[T]`` in, one result (or exception instance) per item out.
AsyncBatchFn: TypeAlias = Callable[[list[T]], Awaitable[Iterable[R | Exception]]]
SyncBatchFn: TypeAlias = Callable[[list[T]], Iterable[R | Exception]]


class Batcher(Lifecycle, Generic[T, R]):
    """Collect items submitted by concurrent tasks into batches for ``fn``; each caller gets its own result.

    ``fn`` takes a list of items and returns a list (any sized iterable) of the same length, in the
    same order: result ``i`` belongs to item ``i``. It may be ``async def`` (awaited in the event
    loop, so it must not block) or a plain function (run in a worker thread, or with
    ``await executor.run(fn, items)`` when ``executor`` is given, e.g. a ``ProcessExecutor``).

    Use it as an async context manager, which runs the background flusher for as long as the block
    lasts, or run it in a task group of yours with :meth:`start` until :meth:`aclose`::

        async with Batcher(embed, max_size=32, max_wait=0.005) as batcher:
            vector = await batcher.submit(text)

        batcher = await Batcher(embed, max_size=32, max_wait=0.005).start(task_group)
        ...
        await batcher.aclose()  # items submitted before get their results

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
    - ``timeout``: seconds one call of fn may run (default ``None``: no limit). A batch that runs
      longer fails all its items with ``BatchTimeout``: an async fn is cancelled, a
      ``ProcessExecutor`` kills the worker (the executor enforces the limit, counting from when the
      call starts in a worker), and a thread, which cannot be killed, is abandoned.

    Failures stay with their owners: fn raising (or the executor failing) sends that exception to
    every caller of the batch (all receive the same object); a wrong number of results raises
    ``BatchResultMismatch`` (a ``ValueError``) to every caller of the batch, naming the batch, fn and
    both lengths, and a result that is not a sized iterable a ``TypeError``; an ``Exception``
    *instance* in slot ``i`` of the results is raised to the caller of item ``i`` only. A caller
    cancelled before its item is dispatched withdraws the item; cancelled after, its result is
    discarded. None of these stop the batcher.

    Closing (the end of the ``async with`` block, :meth:`close` or :meth:`aclose`) stops intake:
    later ``submit`` calls raise ``BatcherClosed``. Items already submitted, including callers
    blocked by backpressure, are still batched and get their results; the block exits (``aclose``
    returns) once they are done.
    If the block exits with an exception, or is cancelled (or the task group given to ``start``
    is cancelled), items not yet dispatched get
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
        timeout: float | None = None,
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
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        call = BatchCall(fn, self._name, is_async, executor, timeout)
        self.max_size = max_size
        self.max_wait = max_wait
        self.max_concurrent_batches = max_concurrent_batches
        self.max_pending = self._intake.max_pending
        self.timeout = timeout
        self._dispatcher: Dispatcher[T, R] = Dispatcher(self._intake, call, repr(self))
        super().__init__(self._dispatcher)

    def __repr__(self) -> str:
        return (
            f"Batcher(fn={self._name}, max_size={self.max_size}, max_wait={self.max_wait}, "
            f"max_concurrent_batches={self.max_concurrent_batches}, max_pending={self.max_pending}"
            + ("" if self.timeout is None else f", timeout={self.timeout}")
            + ")"
        )

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
        if self._state != OPEN:
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
        if self._state != OPEN:
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
        if self._state == NEW:
            return RuntimeError(
                f"{self!r} is not running; submit from inside 'async with Batcher(...) as batcher:' "
                f"or after 'await batcher.start(task_group)'"
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
