"""Dispatchers: run each batch on the executor, with retries, and bisect the batches that keep failing.

A dispatcher decides nothing about the run's state: it reports forward, to the fold stage, every event
the run counts — a batch started, an attempt failed (and whether it will be retried), a batch done
with its results and dead letters. Only the fold stage updates stats and state.

A split of a file (:class:`~microbatch._core.splits.FileSplit`) is one call: the worker reads it and
returns one outcome per batch, and the split's ``Done`` carries one ``Done`` per batch
(``parts``). A batch whose ``fn`` raised in the worker counts that as its first attempt: this
process reads that batch's bytes and goes on with its retries and bisection as for any batch. A
split whose call fails as a whole (a crash, a hang, a result that does not pickle) is run again
batch by batch: this process reads that split's lines and dispatches each batch as any other, so
retries, bisection and dead letters are exactly those of a run without splits. Each of those
batches is reported as soon as it is done (a ``Done`` with ``partial=True``), so the fold stage can
fold it without waiting for the rest of the split. A batch that stops the run there (``BatchFailed``)
ends the split's ``Done`` as its ``failure``: the fold stage raises it once every batch before it is
folded, numbered as the run counts batches.

A result over the executor's ``max_result_bytes`` (``ResultTooLarge``) is never retried: the same
records give a result as large again. With ``on_error="raise"`` the run stops at once with
``BatchFailed`` (one attempt). With ``on_error="dead_letter"`` the batch is bisected, as a smaller
part may well give a smaller result (fn returns one output per record): each part runs once, and a
single record whose own result is still too large is dead-lettered at once, with the
``ResultTooLarge`` as its error. When fn's result does not shrink with fewer records, the first
records become dead letters one by one and ``max_dead_letters_in_a_row`` stops the run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from .._core.bisect import BisectionPlan, RecordRange
from .._core.lines import LineBlock, cut_lines, decode_lines
from .._core.retry import RetryPolicy
from .._core.splits import FileSplit, SourceSplit
from .._core.splittask import BatchError, SplitTask, Undecodable, read_split, split_blocks
from .._core.task import BatchTask
from .._exceptions import (
    BatchFailed,
    BatchTimeout,
    ExecutorUnavailable,
    RemoteError,
    RemoteTraceback,
    ResultTooLarge,
    SourceDecodeError,
    SourceError,
    TooManyDeadLetters,
    WorkerCrashed,
)
from ..checkpoints.deadletters import DeadLetter, describe_error
from ..executors import Executor
from .reader import Batch

__all__ = ["BatchDispatcher", "Done", "End", "Event", "Failure", "SplitFailed", "Started"]

FailureKind = Literal["crash", "timeout", "error"]


@dataclass(frozen=True, slots=True)
class End:
    """The source ended (it was not stopped): ``tickets`` tickets make the whole run."""

    tickets: int


@dataclass(frozen=True, slots=True)
class Started:
    """A dispatcher took ticket ``ticket`` (a batch or a split) and sent it to the executor."""

    ticket: int


@dataclass(frozen=True, slots=True)
class Failure:
    """One attempt at ticket ``ticket``'s batch failed; ``retrying``: another attempt follows;
    ``whole``: the attempt ran the whole batch (not a part being isolated)."""

    ticket: int
    kind: FailureKind
    retrying: bool
    error: BaseException
    whole: bool = True


@dataclass(frozen=True, slots=True)
class SplitFailed:
    """The call running the file split of ticket ``ticket`` failed: its batches are run one by one
    instead."""

    ticket: int
    split: FileSplit | SourceSplit
    kind: FailureKind
    error: BaseException


@dataclass(slots=True)
class Done:
    """Batch ``batch`` is finished: the results of what succeeded, in order, and its dead letters;
    ``bisected``: it was cut into record ranges to isolate failing records (results: one per range
    that succeeded).

    For a file split, ``parts`` holds one ``Done`` per batch of the split, in order (empty when the
    split owns no line); the split's own ``results`` and ``dead`` stay empty. ``partial``: more of
    the split's batches follow in later events (a split run batch by batch); ``failure``: the error
    that stopped the run at the batch after ``parts``.
    """

    batch: Batch
    results: list[Any] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    bisected: bool = False
    parts: list[Done] | None = None
    partial: bool = False
    failure: BatchFailed | None = None


#: What dispatchers send the fold stage; ``End`` comes from the reader, passed on by a dispatcher.
Event = Started | Failure | SplitFailed | Done | End


def _kind(exc: BaseException) -> FailureKind:
    if isinstance(exc, WorkerCrashed):
        return "crash"
    if isinstance(exc, BatchTimeout):
        return "timeout"
    return "error"


def read_owned_lines(split: FileSplit, where: str) -> list[LineBlock]:
    """The batches of ``split`` as blocks of lines, read here (a split that failed in a worker)."""
    with open(split.path, "rb") as f:
        data, first = read_split(f, split, where)
    return split_blocks(data, first, split.max_size)


def read_block(path: str, start: int, end: int, count: int) -> LineBlock:
    """The ``count`` lines in bytes ``[start, end)`` of the file at ``path`` (a batch of a split)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return LineBlock(data, count, start, start + len(data))


def cut(payload: LineBlock | list[Any], lo: int, hi: int) -> LineBlock | list[Any]:
    """Records ``lo..hi`` of a payload: a list slice, or the lines of a block (no decoding)."""
    if isinstance(payload, list):
        return payload[lo:hi]
    if lo:
        _, payload = cut_lines(payload, lo)
    if hi - lo < payload.count:
        payload, _ = cut_lines(payload, hi - lo)
    return payload


class BatchDispatcher:
    """Runs batches from the queue on ``executor`` and reports every event to the fold stage."""

    def __init__(
        self,
        executor: Executor,
        task: BatchTask[Any],
        retry: RetryPolicy,
        timeout: float | None,
        *,
        raise_on_error: bool,
        max_dead_in_a_row: int | None,
    ) -> None:
        self.executor = executor
        self.task = task
        self.retry = retry
        self.timeout = timeout
        self.raise_on_error = raise_on_error
        self.max_dead_in_a_row = max_dead_in_a_row
        # Shared by every dispatcher of a run: records dead since the last success anywhere.
        self._dead_in_a_row = 0
        self._first_dead: BaseException | None = None
        # One task object for every split, so that worker processes receive it once.
        self.split_task: SplitTask[Any] = SplitTask(task)
        # Bytes per batch in the splits run so far: a split's timeout is ``timeout`` per batch.
        self._split_bytes = 0
        self._split_batches = 0

    async def serve(self, batches: ObjectReceiveStream[Batch | End], events: ObjectSendStream[Event]) -> None:
        async with batches, events:
            async for batch in batches:
                if isinstance(batch, End):
                    await events.send(batch)
                    continue
                await events.send(Started(batch.ticket))
                await events.send(await self.process(batch, events))

    async def process(
        self, batch: Batch, events: ObjectSendStream[Event], failed_with: Exception | None = None
    ) -> Done:
        """Run a batch (or a split); ``failed_with``: its first attempt already failed so."""
        payload = batch.payload
        if isinstance(payload, (FileSplit, SourceSplit)):
            return await self.process_split(batch, payload, events)
        if batch.undecodable:
            dead = undecodable_letters(self, batch.ticket, list(batch.undecodable))
            if not payload:
                return Done(batch, dead=dead)
            done = await self.process(replace(batch, undecodable=()), events, failed_with)
            done.dead[:0] = dead
            return done
        try:
            return Done(batch, [await self.attempt(batch.ticket, payload, events, failed_with=failed_with)])
        except Exception as exc:
            if self.raise_on_error or isinstance(exc, ExecutorUnavailable):
                # An unavailable executor says nothing about the records: stop, dead-letter none.
                attempts = 1 if isinstance(exc, ResultTooLarge) else self.retry.attempts
                raise BatchFailed(batch.ticket, exc, attempts) from exc
            if batch.count == 1:
                return Done(batch, dead=[self.dead_letter(batch, RecordRange(0, 1), payload, exc)])
            return await self.isolate(batch, payload, events)

    async def process_split(
        self, batch: Batch, split: FileSplit | SourceSplit, events: ObjectSendStream[Event]
    ) -> Done:
        """Run a split in one call; if that fails, run its batches one by one (see the module doc)."""
        try:
            outcomes = await self.executor.run(self.split_task, split, timeout=self.split_timeout(split))
        except Exception as exc:
            if isinstance(exc, ExecutorUnavailable):
                raise BatchFailed(batch.ticket, exc, self.retry.attempts) from exc
            await events.send(SplitFailed(batch.ticket, split, _kind(exc), exc))
            return await self.split_by_batches(batch, split, events)
        if outcomes:
            self._split_bytes += outcomes[-1][2] - outcomes[0][1]
            self._split_batches += len(outcomes)
        ticket, cut_at = batch.ticket, batch.cut_at
        parts: list[Done] = []
        for count, start, end, result in outcomes:
            position: Any = end
            if isinstance(split, SourceSplit):
                position = split.position(end)
                split.note(start, end, count)
            try:
                if not isinstance(result, BatchError):
                    self._dead_in_a_row, self._first_dead = 0, None
                    part = Batch(ticket, [], count, start, position, cut_at)
                    if isinstance(result, Undecodable):
                        dead = undecodable_letters(self, ticket, result.records)
                        parts.append(Done(part, [result.result] if result.called else [], dead))
                    else:
                        parts.append(Done(part, [result]))
                    continue
                # fn raised on this batch in the worker: that was its first attempt. The rest of
                # its attempts and its bisection go as without splits, on its records read here.
                error = result.error or RemoteError(result.type_name, result.message)
                error.__cause__ = RemoteTraceback(result.traceback)
                if isinstance(split, SourceSplit):
                    (records, _, _, bad), *_ = await read_here(self, ticket, split, start, end) or [
                        ([], start, end, [])
                    ]
                    redo = Batch(ticket, records, len(records), None, position, cut_at)
                    done = await self.process(redo, events, error) if records else Done(redo)
                    done.dead += undecodable_letters(self, ticket, bad)
                    parts.append(done)
                    continue
                block = await anyio.to_thread.run_sync(read_block, split.path, start, end, count)
                redo = Batch(ticket, block, count, start, end, cut_at)
                parts.append(await self.process(redo, events, error))
            except BatchFailed as exc:
                return Done(batch, parts=parts, failure=exc)
        return Done(batch, parts=parts)

    def split_timeout(self, split: FileSplit | SourceSplit) -> float | None:
        """``timeout`` for each batch the split holds, estimated from the splits run so far."""
        if self.timeout is None or not self._split_batches:
            return self.timeout
        per_batch = self._split_bytes / self._split_batches
        return self.timeout * (math.ceil((split.end - split.start) / max(per_batch, 1.0)) + 1)

    async def split_by_batches(
        self, batch: Batch, split: FileSplit | SourceSplit, events: ObjectSendStream[Event]
    ) -> Done:
        """Read the split's lines here and run each of its batches as a batch of its own."""
        if isinstance(split, SourceSplit):
            return await self.source_split_by_batches(batch, split, events)
        blocks = await anyio.to_thread.run_sync(read_owned_lines, split, self.task.where)
        for block in blocks:
            sub = Batch(batch.ticket, block, block.count, block.start, block.end, batch.cut_at)
            try:
                part = await self.process(sub, events)
            except BatchFailed as exc:
                return Done(batch, parts=[], failure=exc)
            await events.send(Done(batch, parts=[part], partial=True))
        return Done(batch, parts=[])

    async def source_split_by_batches(
        self, batch: Batch, split: SourceSplit, events: ObjectSendStream[Event]
    ) -> Done:
        """:meth:`split_by_batches` for a split of another source than a file."""
        try:
            batches = await read_here(self, batch.ticket, split, split.start, split.end)
        except BatchFailed as exc:
            return Done(batch, parts=[], failure=exc)
        for records, start, end, bad in batches:
            position = split.position(end)
            split.note(start, end, len(records) + len(bad))
            sub = Batch(batch.ticket, records, len(records), None, position, batch.cut_at)
            try:
                part = await self.process(sub, events) if records else Done(sub)
                part.dead += undecodable_letters(self, batch.ticket, bad)
            except BatchFailed as exc:
                return Done(batch, parts=[], failure=exc)
            await events.send(Done(batch, parts=[part], partial=True))
        return Done(batch, parts=[])

    async def attempt(
        self,
        ticket: int,
        payload: LineBlock | list[Any],
        events: ObjectSendStream[Event],
        *,
        retry: bool = True,
        whole: bool = True,
        failed_with: Exception | None = None,
    ) -> Any:
        """Run one payload, retrying with backoff on any failure; raise the last failure.

        ``failed_with``: the first attempt was made elsewhere (in a split) and failed with it.
        """
        failed = 0
        if failed_with is not None:
            failed = 1
            retrying = retry and self.retry.should_retry(failed)
            await events.send(Failure(ticket, _kind(failed_with), retrying, failed_with, whole))
            if not retrying:
                raise failed_with
            await anyio.sleep(self.retry.delay(failed, random.random()))
        while True:
            try:
                result = await self.executor.run(self.task, payload, timeout=self.timeout)
            except Exception as exc:  # noqa: PERF203 - once per failed attempt, not per record
                failed += 1
                # A result too large now would be as large again: retrying cannot help.
                retrying = retry and not isinstance(exc, ResultTooLarge) and self.retry.should_retry(failed)
                await events.send(Failure(ticket, _kind(exc), retrying, exc, whole))
                if not retrying:
                    raise
                await anyio.sleep(self.retry.delay(failed, random.random()))
            else:
                self._dead_in_a_row, self._first_dead = 0, None
                return result

    async def isolate(
        self, batch: Batch, whole: LineBlock | list[Any], events: ObjectSendStream[Event]
    ) -> Done:
        """Bisect a failing batch (``whole`` is its payload): good parts' results count, single
        failing records are dead."""
        done = Done(batch, bisected=True)
        plan = BisectionPlan(batch.count)
        while (span := plan.next()) is not None:
            payload = cut(whole, span.lo, span.hi)
            try:
                # A single record gets the full retries before it is declared dead.
                result = await self.attempt(batch.ticket, payload, events, retry=span.retry, whole=False)
                done.results.append(result)
            except Exception as exc:
                if isinstance(exc, ExecutorUnavailable):
                    raise BatchFailed(batch.ticket, exc, self.retry.attempts) from exc
                plan.failed(span)
                if span.size == 1:
                    done.dead.append(self.dead_letter(batch, span, payload, exc))
            else:
                plan.succeeded(span)
        return done

    def count_dead(self, ticket: int, exc: BaseException) -> None:
        """One more record dead: :class:`TooManyDeadLetters` when too many failed in a row."""
        self._dead_in_a_row += 1
        first = self._first_dead = self._first_dead or exc
        limit = self.max_dead_in_a_row
        if limit is not None and self._dead_in_a_row >= limit:
            raise TooManyDeadLetters(ticket, first, self._dead_in_a_row) from first

    def dead_letter(
        self, batch: Batch, span: RecordRange, payload: LineBlock | list[Any], exc: BaseException
    ) -> DeadLetter:
        """The dead letter of one record; stops the run when too many failed in a row."""
        self.count_dead(batch.ticket, exc)
        position: int | None
        if isinstance(payload, LineBlock):
            position = payload.start
            task = self.task
            try:
                record: Any = decode_lines(
                    payload.data, encoding=task.encoding, errors=task.errors, where=task.where, start=position
                )[0]
            except SourceDecodeError:
                # Keep the line as it was (written base64-encoded), not with U+FFFD in it.
                raw = decode_lines(payload.data, encoding=None, errors="strict", where=task.where, start=0)
                record = raw[0]
        else:
            position = None if batch.start is None else batch.start + span.lo
            record = payload[0]
        type_name, message, tb = describe_error(exc)
        return DeadLetter(record, batch.ticket, position, type_name, message, tb)


def undecodable_letters(
    dispatcher: BatchDispatcher, ticket: int, records: list[tuple[int, bytes, str]]
) -> list[DeadLetter]:
    """The dead letters of records of batch ``ticket`` that did not decode (``(position, raw
    bytes, message)``, from a chunk or a split), as for a line that does not decode; with
    ``on_error="raise"`` the first stops the run."""
    letters = []
    name = f"{SourceDecodeError.__module__}.{SourceDecodeError.__qualname__}"
    for position, data, message in records:
        error = SourceError(message)
        if dispatcher.raise_on_error:
            raise BatchFailed(ticket, error, 1) from error
        dispatcher.count_dead(ticket, error)
        letters.append(DeadLetter(data, ticket, position, name, message, ""))
    return letters


async def read_here(
    dispatcher: BatchDispatcher, ticket: int, split: SourceSplit, start: int, end: int
) -> list[tuple[list[Any], int, int, list[Any]]]:
    """The batches of ``[start, end)`` of ``split`` read in this process; a source that cannot be
    read (its server away past its timeout) stops the run at batch ``ticket`` (``BatchFailed``),
    in order, as an unavailable executor does: it says nothing about the records."""
    try:
        return await anyio.to_thread.run_sync(split.read_here, dispatcher.task, start, end)
    except SourceError as exc:
        raise BatchFailed(ticket, exc, dispatcher.retry.attempts) from exc
