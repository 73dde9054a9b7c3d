"""The folder: the one stage that owns a run's state, its stats and its checkpoints.

It receives every event the dispatchers report, puts finished batches back in batch order (the
sequencer), calls the sink, folds the results into the aggregator's state, writes dead letters,
counts, checkpoints when the schedule says so, and sends one ``Update`` per folded batch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .._core.schedule import CheckpointSchedule
from .._core.sequencer import Sequencer
from ..aggregate import Aggregator
from .checkpoints import Checkpoints
from .deadletter import DeadLetterFile
from .dispatch import Done, End, Event, Failure, Started
from .stats import Stats, Update

__all__ = ["Folder"]

log = logging.getLogger("microbatch")

V = TypeVar("V")

Sink = Callable[[int, Any], Awaitable[None]]


class Folder(Generic[V]):
    """Folds outcomes strictly in batch order; the reorder buffer is bounded by the window."""

    def __init__(
        self,
        aggregate: Aggregator[Any, Any, V],
        state: Any,
        stats: Stats,
        *,
        next_seq: int,
        checkpoints: Checkpoints,
        schedule: CheckpointSchedule,
        dead: DeadLetterFile,
        sink: Sink | None,
        send_updates: bool,
        queue_depth: Callable[[], int],
    ) -> None:
        self.agg = aggregate
        self.state = state
        self.stats = stats
        self.sequencer: Sequencer[Done] = Sequencer(next_seq)
        self.checkpoints = checkpoints
        self.schedule = schedule
        self.dead = dead
        self.sink = sink
        self.send_updates = send_updates
        self.queue_depth = queue_depth
        self.source_batches: int | None = None
        #: The source was read to its end (not stopped) and every one of its batches was folded.
        self.finished = False
        #: A batch was folded but its update not received: no checkpoint may cover it.
        self.undelivered = False

    @property
    def value(self) -> V:
        return self.agg.value(self.state)

    async def run(
        self,
        events: ObjectReceiveStream[Event],
        updates: ObjectSendStream[Update[V]],
        window: anyio.Semaphore,
    ) -> None:
        stats = self.stats
        async with events, updates:
            async for event in events:
                if isinstance(event, Done):
                    stats.in_flight -= 1
                    for done in self.sequencer.add(event.batch.seq, event):
                        await self._fold(done, updates, window)
                elif isinstance(event, Started):
                    stats.in_flight += 1
                elif isinstance(event, Failure):
                    self._count(event)
                elif isinstance(event, End):
                    self.source_batches = event.batches
            # Results also stop coming when a dispatcher failed: finished only when all were folded.
            self.finished = self.source_batches == self.sequencer.next_seq

    def _count(self, failure: Failure) -> None:
        """Count a failed attempt; the dead letters it leads to are logged when they are folded."""
        stats = self.stats
        if failure.kind == "crash":
            stats.crashes += 1
        elif failure.kind == "timeout":
            stats.timeouts += 1
        else:
            stats.errors += 1
        if failure.retrying:
            stats.retries += 1
        if failure.retrying:
            then = "; retrying"
        else:
            then = "; isolating its failing records" if failure.whole else ""
        level = logging.INFO if failure.whole and not failure.retrying else logging.DEBUG
        log.log(level, "batch %d: attempt failed (%s: %s)%s", failure.seq, type(failure.error).__name__,
                failure.error, then)

    async def _fold(
        self, done: Done, updates: ObjectSendStream[Update[V]], window: anyio.Semaphore
    ) -> None:
        batch, stats = done.batch, self.stats
        if self.sink is not None:
            for result in done.results:
                await self.sink(batch.seq, result)
        # No await from here to the counters: a checkpoint never sees half a batch.
        for result in done.results:
            self.state = self.agg.fold(self.state, result)
        if done.dead:
            self.dead.write(done.dead)
            for letter in done.dead:
                log.warning(
                    "batch %d: record at position %s failed every attempt (%s: %s); written to %s",
                    batch.seq,
                    letter.position,
                    letter.error_type,
                    letter.message,
                    self.dead.path,
                )
        stats.dead_letters += len(done.dead)
        stats.records += batch.count
        stats.run_records += batch.count
        stats.batches += 1
        stats.run_batches += 1
        stats.position = batch.end
        now = anyio.current_time()
        stats.last_latency = now - batch.cut_at
        stats.total_latency += stats.last_latency
        stats.elapsed = now - stats.started
        stats.queue_depth = self.queue_depth()
        log.debug("batch %d folded: %d records, position %s", batch.seq, batch.count, batch.end)
        window.release()  # the reader may cut one more batch
        due = self.schedule.folded(now)
        if self.send_updates:
            # A checkpoint covers only batches whose update was delivered: when the consumer leaves
            # while this send waits, the final checkpoint is skipped and a rerun delivers again
            # from the last checkpoint (at least once).
            self.undelivered = True
            await updates.send(
                Update(
                    value=self.agg.value(self.state),
                    seq=batch.seq,
                    records=stats.records,
                    batch_records=batch.count,
                    position=batch.end,
                    stats=replace(stats),
                    results=done.results,
                    split=done.split,
                )
            )
            self.undelivered = False
        if due:
            await self.save(finished=False)

    async def save(self, *, finished: bool) -> None:
        stats = self.stats
        await self.checkpoints.save(
            batches=stats.batches,
            records=stats.records,
            position=stats.position,
            state=self.checkpoints.dump(self.agg, self.state),
            finished=finished,
        )
        if self.checkpoints.store is not None:
            stats.checkpoints += 1
            self.schedule.saved(anyio.current_time())
