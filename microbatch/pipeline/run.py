"""One run of a pipeline: wires the stages together and owns what they share the lifetime of.

The stages, each a task, talk forward through bounded memory object streams::

    reader ──Batch──▶ queue (queue_size) ──▶ dispatchers ──events──▶ fold stage ──Update──▶ you
       ▲                                                                  │
       └───────── window: at most queue_size + capacity batches unfolded ─┘

There are ``capacity * (1 + prefetch)`` dispatchers: an executor with ``prefetch`` (worker
processes) holds batches ready in each worker, and those batches count against ``queue_size``.
The reader (``reader.py``) cuts the source into batches; each dispatcher (``dispatch.py``) runs
one batch at a time with retries and bisection and reports what happened; the fold stage
(``fold.py``) alone updates the state and the stats and writes checkpoints (``checkpoints.py``).
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

from .._core.fold import FoldMachine
from .._core.params import check_int
from .._core.task import BatchTask
from .._exceptions import BatchFailed
from ..aggregate import Aggregator
from ..executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor, check_picklable
from .checkpoints import Checkpoints, dead_letter_path
from .deadletter import DeadLetterFile
from .dispatch import BatchDispatcher, Done, End, Event
from .fold import FoldStage
from .reader import (
    Batch,
    Begin,
    Emitter,
    decoding,
    position_kind,
    read,
    stop_intake,
)
from .resume import resume_source
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
        self.pipeline = pipeline
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
            by_path=not getattr(source, "follow", False),
        )
        self.fold_stage: FoldStage[V] | None = None
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
        if self.fold_stage is not None:
            return self.fold_stage.value
        return self.agg.value(self._state)

    @property
    def finished(self) -> bool:
        """The source was read to its end and every one of its batches was folded."""
        if self.fold_stage is not None:
            return self.fold_stage.finished and not self._stopped
        return self._finished_before

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Run[R, V]:
        p, stack = self.pipeline, self._stack
        self.stats.started = anyio.current_time()
        try:
            stack.callback(self.checkpoints.close)  # also releases the store's lock
            restored = await self.checkpoints.open(
                fresh=self.fresh, accept_changes=self.accept_changes, agg=self.agg
            )
        except BaseException:
            await stack.aclose()
            raise
        first_ticket, position, identity = 0, None, None
        if restored is not None:
            cp, self._state, position = restored.checkpoint, restored.state, restored.position
            identity = cp.identity
            first_ticket = cp.batches  # a resumed run's tickets start at its batch count
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
        executor = make_executor(p.executor, p.workers)
        if isinstance(executor, ProcessExecutor):
            check_picklable(p.fn)
        try:
            stack.callback(self.dead.close)
            # The window opens to queue_size now and by the executor's capacity once it runs, so
            # the reader fills the queue while the workers start.
            window = anyio.Semaphore(p.queue_size, fast_acquire=True)
            batch_send, batch_recv = anyio.create_memory_object_stream[Batch | End](p.queue_size)
            # Unbounded in type only: the window holds unfolded batches to queue_size + capacity.
            event_send, event_recv = anyio.create_memory_object_stream[Event | Begin](math.inf)
            update_send, self._updates = anyio.create_memory_object_stream[Update[V]](0)
            machine = FoldMachine[Done](
                first_ticket=first_ticket,
                batches=self.stats.batches,
                records=self.stats.records,
                position=(position, identity),
                resumed=restored is not None,
                saving=self.checkpoints.store is not None,
                every=p.checkpoint_every,
                every_batches=p.checkpoint_every_batches,
                now=self.stats.started,
            )
            fold_stage = self.fold_stage = FoldStage(
                self.agg,
                self._state,
                self.stats,
                machine,
                checkpoints=self.checkpoints,
                dead=self.dead,
                sink=p.sink,
                send_updates=self._send_updates,
                deliver_first=p.aggregate is None,
                queue_depth=lambda: batch_send.statistics().current_buffer_used,
            )
            # Runs after the task group has stopped every stage: it sees the last folded state.
            stack.push_async_callback(self._final_checkpoint)
            log.info("run started: %r over %s", p, self.checkpoints.fingerprint["source"])
            tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(self._read, batch_send, event_send.clone(), window, first_ticket, position)
            tg.start_soon(self._work, executor, batch_recv, event_send, window)
            tg.start_soon(fold_stage.run, event_recv, update_send, window)
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
        if self.fold_stage is not None:
            self.fold_stage.stop()

    def __aiter__(self) -> Run[R, V]:
        return self

    async def __anext__(self) -> Update[V]:
        if self._updates is None:
            raise StopAsyncIteration
        try:
            return await self._updates.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def _final_checkpoint(self) -> None:
        fold_stage = self.fold_stage
        assert fold_stage is not None
        # Covers every folded batch, whether or not its update reached the consumer.
        await fold_stage.finish()
        stats = self.stats
        log.info(
            "run %s: %d batches, %d records folded, %d dead letters%s",
            "finished" if fold_stage.finished else "stopped",
            stats.batches,
            stats.records,
            stats.dead_letters,
            f" (in {self.dead.path})" if stats.dead_letters else "",
        )

    # -- stages -------------------------------------------------------------------------------------

    async def _read(
        self,
        send: ObjectSendStream[Batch | End],
        events: ObjectSendStream[Event | Begin],
        window: anyio.Semaphore,
        ticket: int,
        position: Any,
    ) -> None:
        async with send, events:
            # Before any batch, the reader says where it starts: a fresh run's first checkpoint.
            emit = Emitter(send, window, ticket, events)
            p = self.pipeline
            with self._intake:
                size = split_size_for(p.split_size, p.executor)
                await read(self.source, p.max_size, p.max_wait, emit, position=position, split_size=size)
                if not self._stopped:
                    # The source ended (not asked to): these many batches make the whole run.
                    await send.send(End(emit.ticket))

    async def _work(
        self,
        executor: Executor,
        batches: MemoryObjectReceiveStream[Batch | End],
        events: MemoryObjectSendStream[Event],
        window: anyio.Semaphore,
    ) -> None:
        """Start the executor and run one dispatcher per call it can take; stop it after them."""
        p = self.pipeline
        dispatcher = BatchDispatcher(
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


def make_executor(spec: str | Executor, workers: int | None) -> Executor:
    """The executor a pipeline's ``executor`` setting names (an instance as it is)."""
    if spec == "process":
        return ProcessExecutor(workers)
    if spec == "thread":
        return ThreadExecutor(workers or 4)
    if spec == "inline":
        return InlineExecutor()
    assert not isinstance(spec, str)
    return spec


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
    # A stage that sent to one that had already stopped on an error (the fold stage raising a
    # batch's failure while a dispatcher reports another batch) fails with BrokenResourceError:
    # a consequence, not a second error.
    leaves = [leaf for leaf in leaves if not isinstance(leaf, anyio.BrokenResourceError)] or leaves
    failed = [leaf for leaf in leaves if isinstance(leaf, BatchFailed)]
    if failed and len(failed) == len(leaves):
        # Dispatchers failing together (an executor gone for every batch in flight): the first.
        return min(failed, key=lambda leaf: leaf.seq)
    return leaves[0] if len(leaves) == 1 else group
