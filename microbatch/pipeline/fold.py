"""The fold stage: the one stage that owns a run's state, its stats and its checkpoints.

A thin shell around :class:`~microbatch._core.fold.FoldMachine`, which decides the order of
folding and when a checkpoint is due with which position; this stage carries that out: it
receives every event the dispatchers report, calls the sink, folds the results into the
aggregator's state, writes dead letters, counts, writes the checkpoints it is told to, and sends
one ``Update`` per folded batch. While it waits (for a result that is late, for the consumer of
the updates), it still writes the checkpoints that fall due on the clock.

When a batch counts as folded, and so which checkpoints cover it: with an aggregator the state
is the output, and a batch counts once folded into it, whether or not its update reached the
consumer (a consumer that leaves early finds every folded batch in the final checkpoint).
Without one (``map()``), the results are the output: a batch counts once its update was taken,
so a consumer that leaves early gets the results it did not take again from a resumed run.

A file split arrives as one ``Done`` holding its batches (``parts``), under one ticket; each of
its batches is folded and reported in turn, numbered by a running batch counter
(``stats.batches``). A split run batch by batch (it failed in its worker) sends its batches as
they are done (``partial`` events), pieces of its ticket. A checkpoint may fall after any batch,
also inside a split: its position is that batch's end, a line start from which a resumed run
plans the rest of the split and then the same splits (:mod:`microbatch._core.splits`), cutting
the same batches.

:meth:`FoldStage.stop` (the run's ``stop()``) stops folding a split's batches at the next batch: a
split holds many, so finishing the splits in flight could take long. The updates then end, and
with them the run, which stops the work still in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace as replace_field
from typing import Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._core.deadline import wait_deadline
from .._core.fold import FoldMachine, Save
from .._exceptions import BatchFailed, TooManyDeadLetters
from ..aggregate import Aggregator
from ..aggregate.windows import Windows
from ..checkpoints.deadletters import DeadLetterFile
from ..checkpoints.session import Checkpoints
from .dispatch import Done, End, Event, Failure, SplitFailed, Started
from .reader import Begin
from .stats import Stats, Update
from .windowfold import WindowHook

__all__ = ["FoldStage", "fold_stage_for"]

log = logging.getLogger("microbatch")

V = TypeVar("V")

Sink = Callable[[int, Any], Awaitable[None]]


class FoldStage(Generic[V]):
    """Folds outcomes strictly in batch order; the reorder buffer is bounded by the window."""

    def __init__(
        self,
        aggregate: Aggregator[Any, Any, V],
        state: Any,
        stats: Stats,
        machine: FoldMachine[Done],
        *,
        checkpoints: Checkpoints,
        dead: DeadLetterFile,
        sink: Sink | None,
        send_updates: bool,
        deliver_first: bool = False,
        queue_depth: Callable[[], int],
    ) -> None:
        self.agg = aggregate
        self.state = state
        self.stats = stats
        self.machine = machine
        self.checkpoints = checkpoints
        self.dead = dead
        self.sink = sink
        self.send_updates = send_updates
        #: The results are the output (no aggregate): a batch counts once its update was taken.
        self.results_are_output = deliver_first
        self.queue_depth = queue_depth
        #: ``stop()`` was called: fold no further batch of a split.
        self.stopping = False
        #: The batch whose fold raised: the state may hold part of it and is never saved again.
        self.spoiled: int | None = None
        #: Time windows: the sink receives the windows each batch closes instead of fn's results.
        self.windows = None if not isinstance(aggregate, Windows) else WindowHook(
            aggregate, state, sink, dead, stats)

    @property
    def deliver_first(self) -> bool:
        """A batch counts once its update was taken: the results are the output, and someone takes
        the updates (``send_updates`` may be switched on after the stage was made)."""
        return self.send_updates and self.results_are_output

    @property
    def value(self) -> V:
        return self.agg.value(self.state)

    @property
    def finished(self) -> bool:
        """The source was read to its end (not stopped) and every one of its batches was folded."""
        return self.machine.finished

    async def run(
        self,
        events: MemoryObjectReceiveStream[Event | Begin],
        updates: MemoryObjectSendStream[Update[V]],
        window: anyio.Semaphore,
    ) -> None:
        stats, machine = self.stats, self.machine
        async with events, updates:
            while True:
                try:
                    event = await self._next(events)
                except anyio.EndOfStream:
                    if self.windows is not None:
                        seq = max(stats.batches - 1, 0)
                        await self.windows.end_of_source(self.state, machine.finished, seq)
                    return
                if event is None:  # a checkpoint's deadline came while waiting
                    await self._save(machine.tick(anyio.current_time()))
                elif isinstance(event, Done):
                    await self._arrived(event, updates, window)
                elif isinstance(event, Started):
                    stats.in_flight += 1
                elif isinstance(event, Failure):
                    count_failure(stats, event)
                elif isinstance(event, SplitFailed):
                    count_split_failure(stats, event)
                elif isinstance(event, End):
                    machine.end(event.tickets)
                else:
                    await self._save(machine.begin(event.position))
                # A batch's results (they can be large) are not kept while the next event is awaited.
                event = None

    async def _arrived(
        self, event: Done, updates: MemoryObjectSendStream[Update[V]], window: anyio.Semaphore
    ) -> None:
        """A dispatcher finished a batch (or a piece of a split): fold what that releases, in order."""
        if not event.partial:
            self.stats.in_flight -= 1
        for done in self.machine.arrive(event.batch.ticket, event, last=not event.partial):
            await self._fold(done, updates, window)

    async def _next(self, events: MemoryObjectReceiveStream[Event | Begin]) -> Event | Begin | None:
        """The next event; None when a checkpoint falls due on the clock first."""
        try:
            return events.receive_nowait()
        except anyio.WouldBlock:
            pass
        with anyio.CancelScope(deadline=wait_deadline(self.machine.deadline)):
            return await events.receive()
        return None

    def stop(self) -> None:
        """Fold no further batch of a split (those of whole batches in flight are still folded)."""
        self.stopping = True

    async def finish(self) -> None:
        """Write the run's final checkpoint: every batch folded (none without a store), unless
        closed windows were being handed over (the checkpoint before them stands)."""
        if self.windows is not None and self.windows.undelivered:
            log.info("closed windows were not all delivered: no final checkpoint covers them")
            return
        await self._save(self.machine.final())

    async def _fold(
        self, done: Done, updates: MemoryObjectSendStream[Update[V]], window: anyio.Semaphore
    ) -> None:
        """Fold a released ``done``: a whole batch, a piece of a split, or a split's last piece."""
        if done.parts is None:
            if not self.machine.halted:
                await self._fold_batch(done, done.batch.ticket, updates, window)
                self.machine.processed()
            return
        if not done.partial:
            window.release()  # the reader may emit one more split
            if not self.machine.halted:
                self.stats.splits += 1
        for part in done.parts:
            if self.stopping and not self.machine.halted:
                self.machine.halt()
                # The updates end here, and with them the run: the splits still queued or running
                # would be computed only to be thrown away. Events are still drained meanwhile.
                await updates.aclose()
            if self.machine.halted:
                return
            await self._fold_batch(part, self.stats.batches, updates, None)
        failure = done.failure
        if failure is None:
            self.machine.processed()
        else:
            # Raised in order, numbered as this run counts batches.
            seq = self.stats.batches
            cause = failure.cause
            if isinstance(failure, TooManyDeadLetters):
                raise TooManyDeadLetters(seq, cause, failure.attempts) from cause
            raise BatchFailed(seq, cause, failure.attempts) from cause

    async def _fold_batch(
        self, done: Done, seq: int, updates: MemoryObjectSendStream[Update[V]], window: anyio.Semaphore | None
    ) -> None:
        """Fold one batch numbered ``seq``; release ``window`` (None: a batch of a split) for it."""
        batch, windows, results = done.batch, self.windows, done.results
        if self.sink is not None and windows is None:
            for result in results:
                await self.sink(seq, result)
        if self.deliver_first:
            # The results are the output: the batch counts once its update was taken, so a
            # consumer that leaves meanwhile gets them again from a resumed run (at least once).
            preview = replace_field(self.stats)
            self._count(preview, done, anyio.current_time())
            await self._deliver(updates, self._update(done, seq, preview))
        # No await from here to the machine's count: a checkpoint never sees half a batch.
        if windows is not None:
            results = windows.stamp(results, batch.cut_at)
        try:
            for result in results:
                self.state = self.agg.fold(self.state, result)
        except Exception:
            # The state may hold part of this batch: no checkpoint may save it from here on.
            self.spoiled = seq
            log.error(
                "%s failed to fold batch %d; no checkpoint is written after it (the last one "
                "stands, and a resumed run folds the batch again)", self.agg.describe(), seq)
            raise
        closed = None if windows is None else windows.close(self.state, seq)
        if done.dead:
            write_dead(self.dead, done, seq)
        now = anyio.current_time()
        self._count(self.stats, done, now)
        save = self.machine.folded(batch.end, batch.count, now)
        log.debug("batch %d folded: %d records, position %s", seq, batch.count, batch.end)
        if window is not None:
            window.release()  # the reader may cut one more batch
        if windows is not None and closed:
            await windows.deliver(seq, closed)
        await self._save(save)
        if self.send_updates and not self.deliver_first:
            # The state is the output: the batch counts once folded, whether or not its update
            # reaches the consumer.
            await self._deliver(updates, self._update(done, seq, replace_field(self.stats)))

    def _count(self, stats: Stats, done: Done, now: float) -> None:
        """Count the batch ``done``, folded at ``now``, in ``stats``."""
        batch = done.batch
        stats.count_batch(batch.count, len(done.dead), batch.end, batch.cut_at, now)
        stats.queue_depth = self.queue_depth()

    def _update(self, done: Done, seq: int, stats: Stats) -> Update[V]:
        return Update(
            value=self.agg.value(self.state),
            seq=seq,
            records=stats.records,
            batch_records=done.batch.count,
            position=done.batch.end,
            stats=stats,
            results=done.results,
            split=done.bisected,
        )

    async def _deliver(self, updates: MemoryObjectSendStream[Update[V]], update: Update[V]) -> None:
        """Send ``update``; while the consumer keeps it waiting, write the checkpoints that fall due."""
        try:
            updates.send_nowait(update)
            return
        except anyio.WouldBlock:
            pass
        if self.machine.deadline is None:
            await updates.send(update)  # nothing folds meanwhile: no checkpoint can fall due
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._save_when_due)
            await updates.send(update)
            tg.cancel_scope.cancel()

    async def _save_when_due(self) -> None:
        machine = self.machine
        while (deadline := machine.deadline) is not None:
            await anyio.sleep_until(deadline)
            await self._save(machine.tick(anyio.current_time()))

    async def _save(self, save: Save | None) -> None:
        """Write the checkpoint ``save`` asks for (nothing for None), even if cancelled meanwhile."""
        if save is None or self.spoiled is not None:
            return
        # Once begun a save is finished: the changes it takes from a keyed state are in no other.
        with anyio.CancelScope(shield=True):
            await self.checkpoints.save(
                batches=save.batches,
                records=save.records,
                position=save.position,
                state=self.checkpoints.dump(self.agg, self.state),
                finished=save.finished,
            )
            self.stats.checkpoints += 1
            self.machine.saved(save, anyio.current_time())


def fold_stage_for(
    pipeline: Any,
    agg: Aggregator[Any, Any, V],
    state: Any,
    stats: Stats,
    checkpoints: Checkpoints,
    dead: DeadLetterFile,
    *,
    first_ticket: int,
    position: Any,
    resumed: bool,
    send_updates: bool,
    queue_depth: Callable[[], int],
) -> FoldStage[V]:
    """The fold stage of a run of ``pipeline``, with its machine, starting at ``position``
    (``first_ticket``); ``queue_depth`` tells the batches waiting for a worker (for the stats)."""
    machine = FoldMachine[Done](
        first_ticket=first_ticket,
        batches=stats.batches,
        records=stats.records,
        position=position,
        resumed=resumed,
        saving=checkpoints.store is not None,
        every=pipeline.checkpoint_every,
        every_batches=pipeline.checkpoint_every_batches,
        now=stats.started,
    )
    return FoldStage(
        agg,
        state,
        stats,
        machine,
        checkpoints=checkpoints,
        dead=dead,
        sink=pipeline.sink,
        send_updates=send_updates,
        deliver_first=pipeline.aggregate is None,
        queue_depth=queue_depth,
    )


def count_failure(stats: Stats, failure: Failure, *, log_it: bool = True) -> None:
    """Count a failed attempt; the dead letters it leads to are logged when they are folded."""
    stats.count_attempt(failure.kind, failure.retrying)
    if not log_it:
        return
    if failure.retrying:
        then = "; retrying"
    else:
        then = "; isolating its failing records" if failure.whole else ""
    level = logging.INFO if failure.whole and not failure.retrying else logging.DEBUG
    log.log(level, "batch %d: attempt failed (%s: %s)%s", failure.ticket, type(failure.error).__name__,
            failure.error, then)


def count_split_failure(stats: Stats, failed: SplitFailed) -> None:
    """Count a split that failed in its worker: a failed attempt, retried batch by batch."""
    count_failure(stats, Failure(failed.ticket, failed.kind, True, failed.error), log_it=False)
    stats.split_fallbacks += 1
    log.info("split %d (%r) failed in its worker (%s: %s); running its batches one by one",
             failed.ticket, failed.split, type(failed.error).__name__, failed.error)


def write_dead(dead: DeadLetterFile, done: Done, seq: int) -> None:
    """Write a batch's dead letters, numbered ``seq`` as this run counts batches, and log each."""
    letters = [
        letter if letter.batch == seq else replace_field(letter, batch=seq) for letter in done.dead
    ]
    dead.write(letters)
    for letter in letters:
        log.warning(
            "batch %d: record at position %s failed every attempt (%s: %s); written to %s",
            seq,
            letter.position,
            letter.error_type,
            letter.message,
            dead.path,
        )
