"""The lifecycle of a ``Batcher``: its two entry points, closing, and shutting down.

``async with batcher:`` opens a task group of its own; ``await batcher.start(task_group)`` runs in
the caller's. Either way one task runs :meth:`Dispatcher.serve` until the batcher is closed and
drained (``close``/``aclose``, the end of the block) or cancelled (an error in the block, a
cancelled task group), and items not yet given to fn then get ``BatcherClosed``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc

from .dispatch import Dispatcher

__all__ = ["CLOSED", "CLOSING", "Lifecycle", "NEW", "OPEN"]

NEW = 0  # not started: submit raises RuntimeError
OPEN = 1  # accepting items
CLOSING = 2  # refusing new items; those submitted are still batched
CLOSED = 3  # stopped

_L = TypeVar("_L", bound="Lifecycle")


class Lifecycle:
    """Starts, closes and stops the ``Dispatcher`` of a service; subclassed by ``Batcher``."""

    def __init__(self, dispatcher: Dispatcher[Any, Any]) -> None:
        self._state = NEW
        self._runner = dispatcher
        self._own_tg: anyio.abc.TaskGroup | None = None  # the one 'async with' opens
        self._stopped: anyio.Event | None = None  # set once the service stopped

    async def __aenter__(self: _L) -> _L:
        self._check_new()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._own_tg = tg
        try:
            await tg.start(self._serve, name=f"microbatch.{self!r}")
        except BaseException:  # cancelled while starting: leave no task group open behind
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await tg.__aexit__(None, None, None)
            raise
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
            self._runner.intake.abort(
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

    async def start(self: _L, task_group: anyio.abc.TaskGroup) -> _L:
        """Run the batcher in the caller's ``task_group`` until :meth:`aclose`; return the batcher.

        The variant of ``async with`` for a batcher that outlives one block: items are accepted
        as soon as this returns. The task group cannot exit before the batcher stopped, so call
        ``await batcher.aclose()`` (items already submitted get their results) or cancel the
        group: then items not yet dispatched and running async batches fail with ``BatcherClosed``,
        and a batch running in a thread is waited for, as when an ``async with`` block is cancelled.
        """
        self._check_new()
        await task_group.start(self._serve, name=f"microbatch.{self!r}")
        return self

    async def aclose(self) -> None:
        """Close, then wait until every item submitted before has its outcome and the batcher stopped.

        Idempotent; does not wait for a batcher that never started.
        """
        self.close()
        if self._stopped is not None:
            await self._stopped.wait()

    def _check_new(self) -> None:
        if self._state != NEW:
            raise RuntimeError(f"{self!r} was already started; a Batcher runs once, create a new one")

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the flusher until the batcher is closed and drained, or cancelled."""
        self._stopped = anyio.Event()
        self._state = OPEN
        try:
            await self._runner.serve(task_status)
        finally:
            self._state = CLOSED
            self._runner.intake.abort(f"{self!r}: it was shut down; this item was never given to fn")
            self._stopped.set()

    def close(self) -> None:
        """Stop accepting items; those already submitted are still batched and get their results.

        Idempotent. The ``async with`` block calls it on exit and then waits for the pending
        items; calling it earlier lets new ``submit`` calls fail fast with ``BatcherClosed``.
        """
        if self._state in (NEW, OPEN):
            self._state = CLOSING if self._state == OPEN else CLOSED
            self._runner.closing = True
            self._runner.notify()

    @property
    def closed(self) -> bool:
        """Whether new items are refused (``close`` was called or the block ended)."""
        return self._state >= CLOSING
