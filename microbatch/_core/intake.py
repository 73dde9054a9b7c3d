"""A ``Batcher``'s bookkeeping, with no I/O and no event loop: who waits, which batch goes next.

``Batcher`` (``microbatch/_service/``) is a thin async shell around :class:`Intake`: it creates a
:class:`Slot` per submitted item, parks the caller on the slot's event, and asks the intake what to
do next, passing the time explicitly. The intake decides:

- whether an item is queued or its caller must wait for room (``max_pending``);
- whether the flusher task must be woken (a full batch formed, a new partial batch started its
  clock) or may sleep on (the item joined a partial batch whose deadline it already waits for);
- which batch is cut next and why (size, time or close), through :class:`BatchPolicy`, given how
  many batches are running (``max_concurrent_batches``);
- what a caller's cancellation means: a queued item is withdrawn, a dispatched one's result dropped;
- the counters behind ``Batcher.stats``.

A slot's ``event`` is any object with a ``set()`` method (the shell gives an ``anyio.Event``), so
this module and its tests need no event loop.
"""

from __future__ import annotations

import math
from collections import deque
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from .._exceptions import BatcherClosed
from .params import check_int
from .policy import BatchPolicy, check_limits

__all__ = ["BLOCKED", "DONE", "DROPPED", "QUEUED", "RUNNING", "Intake", "Slot"]

T = TypeVar("T")
R = TypeVar("R")

# Slot states. A slot is one submitted item and the place its result is delivered to.
BLOCKED = 0  # its caller waits for room (max_pending items are queued)
QUEUED = 1  # in the queue, not yet given to fn
RUNNING = 2  # part of a batch that fn is processing
DONE = 3  # result or error delivered
DROPPED = 4  # its caller went away after dispatch; the result will be discarded


class Waker(Protocol):
    """What a caller waits on: ``set()`` wakes it (an ``anyio.Event`` in the async shell)."""

    def set(self) -> None: ...


class Slot(Generic[T, R]):
    """One submitted item, its state, and where its caller waits for the outcome."""

    __slots__ = ("item", "event", "state", "value", "error", "tb", "t_submit", "t_admit")

    def __init__(self, item: T, event: Waker, now: float) -> None:
        self.item = item
        self.event = event
        self.state = QUEUED
        self.value: R | None = None
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None
        self.t_submit = now
        self.t_admit = now

    def deliver(self) -> None:
        """The outcome (``value`` or ``error``) is in place: wake the caller, if it still waits."""
        if self.state != DROPPED:
            self.state = DONE
        self.event.set()

    def fail(self, error: BaseException, tb: TracebackType | None = None) -> None:
        """Deliver ``error`` (raised to the caller with traceback ``tb``)."""
        self.error = error
        self.tb = tb
        self.deliver()


class Intake(Generic[T, R]):
    """The queue of submitted items, the batches cut from it, and the counters.

    Every method is synchronous and takes the current time where time matters. Methods that may
    give the flusher work return ``True`` when it must be woken. ``next_batch`` returns the next
    due batch (and counts it as running until ``finished``), ``deadline`` says until when the
    flusher may sleep.
    """

    def __init__(
        self, max_size: int, max_wait: float | None, max_concurrent_batches: int, max_pending: int | None
    ) -> None:
        check_limits(max_size, max_wait)
        check_int("max_concurrent_batches", max_concurrent_batches, minimum=1)
        if max_pending is None:
            max_pending = 10 * max_size
        check_int("max_pending", max_pending, minimum=1)
        if max_pending < max_size:
            raise ValueError(f"max_pending must be at least max_size={max_size}, got {max_pending}")
        self.max_size = max_size
        self.max_concurrent_batches = max_concurrent_batches
        self.max_pending = max_pending
        self.policy = BatchPolicy(max_size, max_wait)
        self.queue: deque[Slot[T, R]] = deque()
        self.blocked: deque[Slot[T, R]] = deque()
        self.full = 0  # full batches at the front of the queue (the policy's ``add`` results)
        self.running = 0
        # Counters (see BatcherStats).
        self.items = 0
        self.by_size = 0
        self.by_time = 0
        self.by_close = 0
        self.sizes: dict[int, int] = {}
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.batch_errors = 0
        self.item_errors = 0
        self.cancelled = 0
        self.dropped = 0

    @property
    def has_room(self) -> bool:
        """Whether a new item may be queued now, without waiting (fewer than ``max_pending`` queued)."""
        return len(self.queue) < self.max_pending

    @property
    def empty(self) -> bool:
        """No item waits for a batch, queued or blocked."""
        return not self.queue and not self.blocked

    @property
    def busy(self) -> bool:
        """Every batch slot is taken: ``max_concurrent_batches`` batches are running."""
        return self.running >= self.max_concurrent_batches

    def offer(self, slot: Slot[T, R]) -> bool:
        """Queue ``slot``, or park it as blocked while ``max_pending`` items are queued.

        Returns whether the flusher must be woken.
        """
        if self.has_room:
            return self.admit(slot)
        slot.state = BLOCKED
        self.blocked.append(slot)
        return False

    def admit(self, slot: Slot[T, R]) -> bool:
        """Append ``slot`` to the queue at ``slot.t_admit``; return whether the flusher must act."""
        slot.state = QUEUED
        self.queue.append(slot)
        policy = self.policy
        full = policy.add(1, slot.t_admit)
        if full:
            self.full += full
        elif policy.pending != 1 or policy.deadline is None:
            return False  # joined a partial batch whose deadline the flusher already sleeps on
        return not self.busy

    def withdraw(self, slot: Slot[T, R], now: float) -> bool:
        """The caller of ``slot`` went away: withdraw a waiting item, or drop a dispatched one's result.

        Returns whether the flusher must be woken (the queue changed).
        """
        state = slot.state
        if state == QUEUED:
            self.queue.remove(slot)
            self.cancelled += 1
            self._recount()
            self._admit_blocked(now)
            return True
        if state == BLOCKED:
            self.blocked.remove(slot)
            self.cancelled += 1
        elif state in (RUNNING, DONE):
            slot.state = DROPPED
            self.dropped += 1
        return False

    def deadline(self) -> float | None:
        """Until when the flusher may sleep (``None``: until woken).

        The partial batch's deadline does not matter while every batch slot is taken.
        """
        return None if self.busy else self.policy.deadline

    def next_batch(self, now: float, closing: bool) -> list[Slot[T, R]] | None:
        """Cut the next batch that is due at ``now`` and count it as running; None if none is due.

        Full batches go first; while ``closing``, the partial batch goes at once; otherwise it goes
        when its deadline passed. Nothing is cut while every batch slot is taken.
        """
        if self.busy:
            return None
        policy = self.policy
        if self.full:
            self.full -= 1
            n = self.max_size
            self.by_size += 1
        elif closing and policy.pending:
            n = policy.flush()
            self.by_close += 1
        elif policy.due(now):
            n = policy.take_partial()
            self.by_time += 1
        else:
            return None
        queue = self.queue
        slots = [queue.popleft() for _ in range(n)]
        self._admit_blocked(now)
        for slot in slots:
            slot.state = RUNNING
        self.items += n
        self.sizes[n] = self.sizes.get(n, 0) + 1
        self.wait_total += n * now - math.fsum(slot.t_submit for slot in slots)
        self.wait_max = max(self.wait_max, now - slots[0].t_submit)
        self.running += 1
        return slots

    def finished(self) -> None:
        """A batch from ``next_batch`` is over (its callers have their outcomes)."""
        self.running -= 1

    def abort(self, message: str) -> None:
        """Fail every item not yet dispatched with ``BatcherClosed(message)``."""
        if self.empty:
            return
        error = BatcherClosed(message)
        for queue in (self.queue, self.blocked):
            while queue:
                queue.popleft().fail(error)
        self.policy.flush()
        self.full = 0

    def _recount(self) -> None:
        """Re-derive the policy's counts after an item left the middle of the queue.

        ``BatchPolicy`` has no way to remove a record, so the counts are rebuilt from the queue:
        it is regrouped from its front, and the partial batch's deadline is ``max_wait`` after
        the admission of its (new) first item.
        """
        queue = self.queue
        self.policy.flush()
        n = len(queue)
        rest = n % self.max_size
        start = queue[n - rest].t_admit if rest else 0.0
        self.full = self.policy.add(n, start)

    def _admit_blocked(self, now: float) -> None:
        blocked = self.blocked
        while blocked and self.has_room:
            slot = blocked.popleft()
            slot.state = QUEUED
            slot.t_admit = now
            self.queue.append(slot)
            self.full += self.policy.add(1, now)
