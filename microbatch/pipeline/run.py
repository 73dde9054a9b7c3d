"""One run of a pipeline: wires the stages together and owns what they share the lifetime of.

The stages, each a task, talk forward through bounded memory object streams::

    reader ──Batch──▶ queue (queue_size) ──▶ dispatchers ──events──▶ folder ──Update──▶ you
       ▲                                                                │
       └──────── window: at most queue_size + capacity batches unfolded ┘

There are ``capacity * (1 + prefetch)`` dispatchers: an executor with ``prefetch`` (worker
processes) holds batches ready in each worker, and those batches count against ``queue_size``.
The reader (``reader.py``) cuts the source into batches; each dispatcher (``dispatch.py``) runs
one batch at a time with retries and bisection and reports what happened; the folder (``fold.py``)
alone updates the state and the stats and writes checkpoints (``checkpoints.py``).
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .._core.params import check_int
from .._core.schedule import CheckpointSchedule
from .._core.task import BatchTask
from .._exceptions import BatchFailed
from ..aggregate import Aggregator
from ..executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor, check_picklable
from ..sources.protocol import ended_idle
from .checkpoints import Checkpoints, dead_letter_path
from .deadletter import DeadLetterFile
from .dispatch import Dispatcher, End, Event
from .fold import Folder
from .reader import (
    Batch,
    Emitter,
    decoding,
    position_kind,
    read,
    resume_source,
    source_identity,
    stop_intake,
)
from .stats import Stats, Update

if TYPE_CHECKING:
    import os

    from ..stores import CheckpointStore
    from .pipeline import Pipeline, Source

__all__ = ["Discard", "Run"]

log = logging.getLogger("microbatch")

R = TypeVar("R")
V = TypeVar("V")


class Discard(Aggregator[Any, None, None]):
    """The aggregator of a pipeline without one: keeps nothing, its value is None."""

    def initial(self) -> None:
        return None

    def fold(self, state: None, result: Any) -> None:
        return None

    def value(self, state: None) -> None:
        return None

    def describe(self) -> str:
        return "none"


class Run(Generic[R, V]):
    """One run of a pipeline: owns its tasks, executor, dead-letter file and checkpoint store."""

    def __init__(
        self,
        pipeline: Pipeline[R, V],
        source: Source,
        checkpoint: str | os.PathLike[str] | CheckpointStore | None,
        fresh: bool,
        *,
        accept_changes: bool = False,
        updates: bool = True,
    ) -> None:
        self.p = pipeline
        self.source = source
        self.fresh = fresh
        self.accept_changes = accept_changes
        self._send_updates = updates
        self.agg: Aggregator[Any, Any, V] = pipeline.aggregate or Discard()  # type: ignore[assignment]
        self.stats = Stats()
        where, encoding, errors = decoding(source)
        self.task: BatchTask[R] = BatchTask(pipeline.fn, encoding=encoding, errors=errors, where=where)
        self.dead = DeadLetterFile(dead_letter_path(pipeline.dead_letter, checkpoint))
        kind = position_kind(source)
        path = getattr(source, "path", None) if kind == "offset" else None
        self.checkpoints = Checkpoints(
            checkpoint,
            pipeline.fingerprint(source),
            self.dead,
            kind=kind,
            path=None if path is None else str(path),
        )
        self.folder: Folder[V] | None = None
        self._state: Any = self.agg.initial()
        self._stack = AsyncExitStack()
        self._intake = anyio.CancelScope()
        self._updates: ObjectReceiveStream[Update[V]] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._finished_before = False  # the checkpoint resumed from is of a finished run
        self._stopped = False  # stop() asked the source to end (its end is then not the input's)

    @property
    def value(self) -> V:
        """The aggregate's current value (the final one once the iteration ended)."""
        if self.folder is not None:
            return self.folder.value
        return self.agg.value(self._state)

    @property
    def finished(self) -> bool:
        """The source was read to its end and every one of its batches was folded.

        A source that ended because it was quiet (``stop_when_idle``) was not read to its end: the
        next run resumes from the last checkpoint and reads what arrived since.
        """
        if self.folder is not None:
            return self.folder.finished and not self._stopped and not ended_idle(self.source)
        return self._finished_before

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Run[R, V]:
        p, stack = self.p, self._stack
        self.stats.started = anyio.current_time()
        try:
            stack.callback(self.checkpoints.close)  # also releases the store's lock
            restored = await self.checkpoints.open(
                fresh=self.fresh, accept_changes=self.accept_changes, agg=self.agg
            )
        except BaseException:
            await stack.aclose()
            raise
        next_seq, position = 0, None
        if restored is not None:
            cp, self._state, position = restored.checkpoint, restored.state, restored.position
            next_seq = cp.batches
            self.stats.batches, self.stats.records, self.stats.position = cp.batches, cp.records, position
            grown = restored.file is not None and restored.file.kind == "grown"
            if cp.finished and not grown:
                self._finished_before = True
                log.info("the checkpoint is of a finished run: returning its value")
                return self
            try:
                self.source = resume_source(self.source, position, restored.file)
            except BaseException:
                await stack.aclose()
                raise
        identify = source_identity(self.source)
        if self.checkpoints.path is not None and identify is not None:
            # A followed file may rotate while batches of the old one are still being folded: the
            # source knows which file the n-th record it read came from (n: records folded here).
            stats, base = self.stats, self.stats.records
            self.checkpoints.identify = lambda offset: identify(offset, stats.records - base)
        executor = self._make_executor()
        if isinstance(executor, ProcessExecutor):
            check_picklable(p.fn)
        try:
            stack.callback(self.dead.close)
            # The window opens to queue_size now and by the executor's capacity once it runs, so
            # the reader fills the queue while the workers start.
            window = anyio.Semaphore(p.queue_size, fast_acquire=True)
            batch_send, batch_recv = anyio.create_memory_object_stream[Batch | End](p.queue_size)
            # Unbounded in type only: the window holds unfolded batches to queue_size + capacity.
            event_send, event_recv = anyio.create_memory_object_stream[Event](math.inf)
            update_send, self._updates = anyio.create_memory_object_stream[Update[V]](0)
            schedule = CheckpointSchedule(p.checkpoint_every, p.checkpoint_every_batches, self.stats.started)
            folder = self.folder = Folder(
                self.agg,
                self._state,
                self.stats,
                next_seq=next_seq,
                checkpoints=self.checkpoints,
                schedule=schedule,
                dead=self.dead,
                sink=p.sink,
                send_updates=self._send_updates,
                queue_depth=lambda: batch_send.statistics().current_buffer_used,
            )
            # Runs after the task group has stopped every stage: it sees the last folded state.
            stack.push_async_callback(self._final_checkpoint)
            log.info("run started: %r over %s", p, self.checkpoints.fingerprint["source"])
            tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(self._read, batch_send, window, next_seq, position)
            tg.start_soon(self._work, executor, batch_recv, event_send, window)
            tg.start_soon(folder.run, event_recv, update_send, window)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if (exc_info[1] is not None or not self.finished) and self._tg is not None:
            # Leaving early: stop every stage; the final checkpoint still records what was folded.
            self._tg.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            error = _unwrap(group)
            # Hide the group (the context), keep the error's own cause (BatchFailed's original error).
            raise error from error.__cause__

    def stop(self) -> None:
        """Stop intake: read no more of the source, finish and fold the batches already read.

        The iteration then ends normally with a final checkpoint that is not ``finished`` (unless
        the source had already ended), so a rerun with the same checkpoint resumes after the last
        folded batch; records read but not yet cut into a batch are read again then. Batches in
        flight still obey ``timeout``; to abandon them, leave the ``async with`` block instead.
        Calling it again does nothing. The batches of file splits in flight are folded only up to
        the batch being folded when it is called (a split holds many batches). A TCP server stops
        accepting and reading, and the complete lines it had received are batched and folded.
        """
        if stop_intake(self.source):
            self._stopped = True  # the source ends because it was asked to, not because it ran out
            return
        self._intake.cancel()
        if self.folder is not None:
            self.folder.stop()

    def __aiter__(self) -> Run[R, V]:
        return self

    async def __anext__(self) -> Update[V]:
        if self._updates is None:
            raise StopAsyncIteration
        try:
            return await self._updates.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def _make_executor(self) -> Executor:
        spec, workers = self.p.executor, self.p.workers
        if spec == "process":
            return ProcessExecutor(workers)
        if spec == "thread":
            return ThreadExecutor(workers or 4)
        if spec == "inline":
            return InlineExecutor()
        return spec

    async def _final_checkpoint(self) -> None:
        folder = self.folder
        assert folder is not None
        if folder.undelivered:
            log.info("the last folded batch was not delivered: no final checkpoint covers it")
        else:
            with anyio.CancelScope(shield=True):
                await folder.save(finished=self.finished)
        stats = self.stats
        log.info(
            "run %s: %d batches, %d records folded, %d dead letters%s",
            "finished" if folder.finished else "stopped",
            stats.batches,
            stats.records,
            stats.dead_letters,
            f" (in {self.dead.path})" if stats.dead_letters else "",
        )

    # -- stages -------------------------------------------------------------------------------------

    async def _read(
        self, send: ObjectSendStream[Batch | End], window: anyio.Semaphore, seq: int, position: Any
    ) -> None:
        async with send:
            emit = Emitter(send, window, seq)
            p = self.p
            with self._intake:
                size = split_size_for(p.split_size, p.executor)
                await read(self.source, p.max_size, p.max_wait, emit, position=position, split_size=size)
                # The source ended (not stopped): these many batches make the whole run.
                await send.send(End(emit.seq))

    async def _work(
        self,
        executor: Executor,
        batches: MemoryObjectReceiveStream[Batch | End],
        events: MemoryObjectSendStream[Event],
        window: anyio.Semaphore,
    ) -> None:
        """Start the executor and run one dispatcher per call it can take; stop it after them."""
        p = self.p
        dispatcher = Dispatcher(
            executor,
            self.task,
            p.retry,
            p.timeout,
            raise_on_error=p.on_error == "raise",
            max_dead_in_a_row=p.max_dead_letters_in_a_row,
        )
        async with batches, events, executor, anyio.create_task_group() as tg:
            # Known once entered (a Dask cluster counts its threads). An executor with ``prefetch``
            # takes that many more calls per unit of capacity and queues them where they run (a
            # worker starts its next batch without waiting for this loop). The window is not
            # widened: those batches come out of the queue_size share.
            capacity = executor.capacity
            for _ in range(capacity):
                window.release()
            for _ in range(capacity * (1 + getattr(executor, "prefetch", 0))):
                tg.start_soon(dispatcher.serve, batches.clone(), events.clone())


class UnsetSplitSize(int):
    """A ``split_size`` the user did not give: the pipeline's default, which an executor may replace."""


def split_size_for(split_size: int | None, executor: object) -> int | None:
    """The split size a run uses: ``split_size`` when given (an int or None), else the executor's
    ``split_size`` attribute when it has one (a remote executor wants larger splits)."""
    if not isinstance(split_size, UnsetSplitSize):
        return split_size
    preferred = getattr(executor, "split_size", None)
    return int(split_size) if preferred is None else check_int("executor.split_size", preferred, minimum=1)


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The single real error inside a task group's exception group, or the group itself."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        elif not isinstance(exc, cancelled):
            leaves.append(exc)

    collect(group)
    failed = [leaf for leaf in leaves if isinstance(leaf, BatchFailed)]
    if failed and len(failed) == len(leaves):
        # Dispatchers failing together (an executor gone for every batch in flight): the first.
        return min(failed, key=lambda leaf: leaf.seq)
    return leaves[0] if len(leaves) == 1 else group
