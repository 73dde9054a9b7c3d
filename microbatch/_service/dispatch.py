"""The ``Batcher``'s flusher: one task that cuts due batches and one task per running batch."""

from __future__ import annotations

from typing import Generic, TypeVar

import anyio
import anyio.abc

from .._core.intake import RUNNING, Intake, Slot
from .._core.results import check_results
from .._exceptions import BatcherClosed
from .._waits import wait_until
from .call import BatchCall

__all__ = ["Dispatcher"]

T = TypeVar("T")
R = TypeVar("R")


class Dispatcher(Generic[T, R]):
    """Runs the batches the intake cuts, from :meth:`serve` until closed and drained, or cancelled.

    The flusher sleeps until :meth:`notify` (a full batch formed, a new partial batch started its
    clock, a batch finished, ``closing`` was set) or until the partial batch's deadline. Each batch
    runs in its own task in the task group ``serve`` opens; ``serve`` returns once ``closing`` is
    set, nothing waits for a batch and every batch is over. ``label`` names the batcher in messages.
    """

    def __init__(self, intake: Intake[T, R], call: BatchCall, label: str) -> None:
        self.intake = intake
        self.call = call
        self.label = label
        #: Set when intake stopped: the partial batch goes at once and serve returns once drained.
        self.closing = False
        self._wake: anyio.Event | None = None  # set while the flusher sleeps
        self._tg: anyio.abc.TaskGroup | None = None
        self._seq = 0

    def notify(self) -> None:
        """Wake the flusher if it sleeps: the intake may have a batch due, or closing was set."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    async def serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the flusher and the batches; report ``task_status.started()`` once items are accepted."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await self._flush_loop(tg)

    async def _flush_loop(self, tg: anyio.abc.TaskGroup) -> None:
        intake = self.intake
        try:
            while True:
                slots = intake.next_batch(anyio.current_time(), closing=self.closing)
                if slots is not None:
                    self._seq += 1
                    name = f"microbatch.Batcher batch {self._seq}"
                    tg.start_soon(self._run_batch, self._seq, slots, name=name)
                    continue
                if self.closing and intake.empty:
                    return
                self._wake = wake = anyio.Event()
                # Woken by notify() or by the partial batch's deadline (None while all slots are busy).
                await wait_until(intake.deadline(), wake.wait)
                self._wake = None
        finally:
            self._wake = None
            intake.abort(
                f"{self.label}: it shut down before this item's batch ran; this item was never given to fn"
            )

    async def _run_batch(self, seq: int, slots: list[Slot[T, R]]) -> None:
        intake = self.intake
        where = f"batch {seq} of {self.label}"
        try:
            try:
                results = await self.call([slot.item for slot in slots], where)
                values = check_results(results, len(slots), batch=seq, fn=self.call.name, where=where)
            except Exception as exc:
                intake.batch_errors += 1
                for slot in slots:
                    slot.fail(exc, exc.__traceback__)
                return
            for slot, value in zip(slots, values, strict=True):
                if isinstance(value, Exception):
                    intake.item_errors += 1
                    slot.fail(value, value.__traceback__)
                else:
                    slot.value = value
                    slot.deliver()
        finally:
            for slot in slots:
                if slot.state == RUNNING:  # cancelled while fn ran: the batcher is shutting down
                    lost = f"{self.label} shut down while batch {seq} was running; its result is lost"
                    slot.fail(BatcherClosed(lost))
            intake.finished()
            self.notify()
