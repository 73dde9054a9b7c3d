"""The folder: the one stage that owns a run's state, its stats and its checkpoints.

It receives every event the dispatchers report, puts finished batches back in batch order (the
sequencer), calls the sink, folds the results into the aggregator's state, writes dead letters,
counts, checkpoints when the schedule says so, and sends one ``Update`` per folded batch.

A file split arrives as one ``Done`` holding its batches (``parts``): the sequencer orders splits,
and each of the split's batches is folded and reported in turn, numbered by a running batch counter
(``stats.batches``). A split run batch by batch (it failed in its worker) sends its batches as
they are done (``partial`` events): those of the split due next are folded at once, the others are
held until it is their split's turn. A checkpoint may fall after any batch, also inside a split:
its position is that batch's end, a line start from which a resumed run plans the rest of the split
and then the same splits (:mod:`microbatch._core.splits`), cutting the same batches.

:meth:`Folder.stop` (the run's ``stop()``) stops folding a split's batches at the next batch: a
split holds many, so finishing the splits in flight could take long. The updates then end, and
with them the run, which stops the work still in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace as replace_field
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .._core.schedule import CheckpointSchedule
from .._core.sequencer import Sequencer
from .._exceptions import BatchFailed, TooManyDeadLetters
from ..aggregate import Aggregator
from ..checkpoints.deadletters import DeadLetterFile
from ..checkpoints.session import Checkpoints
from .dispatch import Done, End, Event, Failure, SplitFailed, Started
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
        #: Batches of splits that arrived before their split was due, by split number.
        self.pieces: dict[int, list[Done]] = {}
        #: ``stop()`` was called: fold no further batch of a split; ``halted``: one was left out.
        self.stopping = False
        self.halted = False

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
                if isinstance(event, Done) and event.partial:
                    seq = event.batch.seq
                    if seq == self.sequencer.next_seq:
                        await self._fold_parts(event, updates)
                    else:
                        self.pieces.setdefault(seq, []).append(event)
                elif isinstance(event, Done):
                    stats.in_flight -= 1
                    for done in self.sequencer.add(event.batch.seq, event):
                        await self._fold(done, updates, window)
                    # The split due next may have sent batches already.
                    for piece in self.pieces.pop(self.sequencer.next_seq, ()):
                        await self._fold_parts(piece, updates)
                elif isinstance(event, Started):
                    stats.in_flight += 1
                elif isinstance(event, Failure):
                    self._count(event)
                elif isinstance(event, SplitFailed):
                    # Counted as a failed attempt that is retried (batch by batch).
                    self._count(Failure(event.seq, event.kind, True, event.error), log_it=False)
                    stats.split_fallbacks += 1
                    log.info(
                        "split %d (bytes %d-%d of %s) failed in its worker (%s: %s); running its "
                        "batches one by one",
                        event.seq, event.split.start, event.split.end, event.split.path,
                        type(event.error).__name__, event.error,
                    )
                elif isinstance(event, End):
                    self.source_batches = event.batches
            # Results also stop coming when a dispatcher failed: finished only when all were folded.
            self.finished = self.source_batches == self.sequencer.next_seq and not self.halted

    def stop(self) -> None:
        """Fold no further batch of a split (those of whole batches in flight are still folded)."""
        self.stopping = True

    def _count(self, failure: Failure, *, log_it: bool = True) -> None:
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
        if not log_it:
            return
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
        if done.parts is None:
            if not self.halted:
                await self._fold_batch(done, done.batch.seq, updates, window)
            return
        # A file split: the batches it sent before, then its last ones.
        window.release()  # the reader may emit one more split
        if self.halted:
            return
        self.stats.splits += 1
        for piece in self.pieces.pop(done.batch.seq, ()):
            await self._fold_parts(piece, updates)
        await self._fold_parts(done, updates)
        if self.halted:
            return
        failure = done.failure
        if failure is not None:
            # Raised in order, numbered as this run counts batches.
            seq = self.stats.batches
            cause = failure.cause
            if isinstance(failure, TooManyDeadLetters):
                raise TooManyDeadLetters(seq, cause, failure.attempts) from cause
            raise BatchFailed(seq, cause, failure.attempts) from cause

    async def _fold_parts(self, done: Done, updates: ObjectSendStream[Update[V]]) -> None:
        """Fold the batches of a split that ``done`` holds, in order, unless the run is stopping."""
        for part in done.parts or ():
            if self.stopping and not self.halted:
                self.halted = True
                # The updates end here, and with them the run: the splits still queued or running
                # would be computed only to be thrown away. Events are still drained meanwhile.
                await updates.aclose()
            if self.halted:
                return
            await self._fold_batch(part, self.stats.batches, updates, None)

    async def _fold_batch(
        self, done: Done, seq: int, updates: ObjectSendStream[Update[V]], window: anyio.Semaphore | None
    ) -> None:
        """Fold one batch numbered ``seq``; release ``window`` (None: a batch of a split) for it."""
        batch, stats = done.batch, self.stats
        if self.sink is not None:
            for result in done.results:
                await self.sink(seq, result)
        # No await from here to the counters: a checkpoint never sees half a batch.
        for result in done.results:
            self.state = self.agg.fold(self.state, result)
        if done.dead:
            letters = [
                letter if letter.batch == seq else replace_field(letter, batch=seq) for letter in done.dead
            ]
            self.dead.write(letters)
            for letter in letters:
                log.warning(
                    "batch %d: record at position %s failed every attempt (%s: %s); written to %s",
                    seq,
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
        log.debug("batch %d folded: %d records, position %s", seq, batch.count, batch.end)
        if window is not None:
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
                    seq=seq,
                    records=stats.records,
                    batch_records=batch.count,
                    position=batch.end,
                    stats=replace_field(stats),
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
