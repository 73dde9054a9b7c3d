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
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .._core.task import BatchTask
from .._exceptions import BatchFailed
from ..aggregate import Aggregator
from ..checkpoints.deadletters import DeadLetterFile
from ..checkpoints.session import Checkpoints, dead_letter_path
from ..executors import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
from ..sources.protocol import ended_idle
from .dispatch import BatchDispatcher, End, Event
from .fold import FoldStage, fold_stage_for
from .owned import loaded_here, owned_run, prepare_executor
from .reader import (
    Batch,
    Begin,
    Emitter,
    decoding,
    position_kind,
    read,
    source_identity,
    stop_intake,
)
from .resume import finished_value_stands, resume_source
from .sizes import read_sizes
from .stats import Stats, Update

if TYPE_CHECKING:
    import os

    from ..checkpoints.store import CheckpointStore
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
    """One run of a pipeline, held: ``async with pipeline.start(source) as run`` (docs/pipeline.md).

    Entering it resumes from the checkpoint (if any) and starts the stages. Inside the block:
    :meth:`updates`, :meth:`result`, :meth:`stop`, ``stats`` (the live :class:`Stats`), ``value``
    and ``finished``. Leaving the block before the run ended (``break``, an error, cancellation)
    stops every stage and every worker at once; the final checkpoint holds what was folded. A
    stage's error (``BatchFailed``, ``CheckpointMismatch``, ...) is raised when the block is left.
    """

    def __init__(
        self,
        pipeline: Pipeline[R, V],
        source: Source,
        checkpoint: str | os.PathLike[str] | CheckpointStore | None,
        fresh: bool,
        *,
        accept_changes: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.fresh = fresh
        self.accept_changes = accept_changes
        self.sends_updates = False  # updates() was called: the fold stage sends updates
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
            follow=bool(getattr(source, "follow", False)),
        )
        self.fold_stage: FoldStage[V] | None = None
        self.initial_state: Any = self.agg.initial()  # the state the run starts from
        self._stack = AsyncExitStack()
        self._intake: anyio.CancelScope | None = None  # the reader's scope, cancelled to stop intake
        self._updates: _Updates[V] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._folded: anyio.Event | None = None  # the fold stage's task returned
        self._saved: anyio.Event | None = None  # the final checkpoint is (being) written
        self._save_error: Exception | None = None
        self._finished_before = False  # the checkpoint resumed from is of a finished run
        self._stopped = False  # stop() asked the source to end (its end is then not the input's)

    @property
    def value(self) -> V:
        """The aggregate's current value (the final one once the iteration ended)."""
        if self.fold_stage is not None:
            return self.fold_stage.value
        return self.agg.value(self.initial_state)

    @property
    def finished(self) -> bool:
        """The source was read to its end (not stopped, nor quiet: ``ended_idle``), all of it folded."""
        if self.fold_stage is not None:
            return self.fold_stage.finished and not self._stopped and not ended_idle(self.source)
        return self._finished_before

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Run[R, V]:
        p, stack = self.pipeline, self._stack
        self.stats.started = anyio.current_time()
        self._intake = anyio.CancelScope()
        executor = prepare_executor(make_executor(p.executor, p.workers), p, self.agg, self.checkpoints)
        try:
            stack.callback(self.checkpoints.close)  # also releases the store's lock
            restored = await self.checkpoints.open(
                fresh=self.fresh, accept_changes=self.accept_changes, agg=self.agg
            )
        except BaseException:
            await stack.aclose()
            raise
        first_ticket, position = 0, None
        if restored is not None:
            cp, self.initial_state, position = restored.checkpoint, restored.state, restored.position
            first_ticket = cp.batches  # a resumed run's tickets start at its batch count
            self.stats.batches, self.stats.records, self.stats.position = cp.batches, cp.records, position
            try:
                location = str(getattr(self.checkpoints.store, "location", ""))
                stands = cp.finished and finished_value_stands(self.source, position, restored.file, location)
                if not stands:
                    self.source = resume_source(self.source, position, restored.file)
            except BaseException:
                await stack.aclose()
                raise
            if stands:
                self._finished_before, self.initial_state = True, await loaded_here(self.initial_state)
                log.info("the checkpoint is of a finished run: returning its value")
                return self
        ask_source_for_file_positions(self)
        try:
            stack.callback(self.dead.close)
            # Shard owners hold the keyed state, when the run uses them; their keys size its splits.
            sizes = read_sizes(p, self.checkpoints.defer_keyed)
            self.agg, self.task, self.initial_state = await owned_run(
                stack, self.agg, self.task, self.initial_state, self.stats, self.checkpoints, p, executor,
                sizes[0],
            )
            # The window opens to queue_size now and by the executor's capacity once it runs, so
            # the reader fills the queue while the workers start.
            window = anyio.Semaphore(p.queue_size, fast_acquire=True)
            batch_send, batch_recv = anyio.create_memory_object_stream[Batch | End](p.queue_size)
            # Unbounded in type only: the window holds unfolded batches to queue_size + capacity.
            event_send, event_recv = anyio.create_memory_object_stream[Event | Begin](math.inf)
            update_send, update_recv = anyio.create_memory_object_stream[Update[V]](0)
            self._updates = _Updates(update_recv)
            stack.callback(update_recv.close)
            self._folded = anyio.Event()
            self.fold_stage = fold_stage_for(
                p, self.agg, self.initial_state, self.stats, self.checkpoints, self.dead,
                first_ticket=first_ticket, position=position, resumed=restored is not None,
                send_updates=self.sends_updates,
                queue_depth=lambda: batch_send.statistics().current_buffer_used,
            )
            # Runs after the task group has stopped every stage: it sees the last folded state.
            stack.push_async_callback(self._save_final)
            log.info("run started: %r over %s", p, self.checkpoints.fingerprint["source"])
            tg = self._tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(_read, self, batch_send, event_send.clone(), window, first_ticket, position, sizes)
            tg.start_soon(_work, p, self.task, executor, batch_recv, event_send, window)
            tg.start_soon(_then_set, self._folded, self.fold_stage.run, event_recv, update_send, window)
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

    def updates(self) -> Run[R, V]:
        """``async for update in run.updates()``: one :class:`Update` per batch folded from now on.

        Before the call the run sends none. Each update waits until it is taken (backpressure).
        Those a :meth:`stop` or :meth:`result` call took meanwhile are held for this iteration, in
        order. The updates end with the run. Iterate from one task at a time.
        """
        self.sends_updates = True
        if self.fold_stage is not None:
            self.fold_stage.send_updates = True
        return self

    def __aiter__(self) -> Run[R, V]:
        return self.updates()

    async def __anext__(self) -> Update[V]:
        update = None if self._updates is None else await self._updates.next()
        if update is None:
            raise StopAsyncIteration
        return update

    async def result(self) -> V:
        """Wait for the source's end and the last batch; write the final checkpoint; the value.

        An endless source (a followed file, a TCP server) never ends by itself: see :meth:`stop`.
        Updates folded meanwhile are held for :meth:`updates` when it was called.
        """
        await self._until_folded()
        return self.value

    async def stop(self) -> V:
        """Stop intake, fold the batches already read, write the final checkpoint, return the value.

        The checkpoint is not ``finished`` (unless the source had ended), so a rerun resumes after
        the last folded batch. A TCP server stops accepting, and the lines it received are folded.
        Batches in flight still obey ``timeout`` (to abandon them, leave the block); of a file
        split, batches are folded up to the one being folded (the block's end stops the rest).
        Callable from any task, inside a loop over :meth:`updates` too (the remaining updates are
        then held for that loop), and again.
        """
        self._request_stop()
        await self._until_folded()
        return self.value

    def _request_stop(self) -> None:
        """Stop intake (what :meth:`stop` does before it waits)."""
        if stop_intake(self.source):
            self._stopped = True  # the source ends because it was asked to, not because it ran out
            return
        if self._intake is not None:
            self._intake.cancel()
        if self.fold_stage is not None:
            self.fold_stage.stop()

    async def _until_folded(self) -> None:
        """Take the updates nobody takes until they end, wait for the fold stage, write the final
        checkpoint."""
        fold_stage, updates, folded = self.fold_stage, self._updates, self._folded
        if fold_stage is None or updates is None or folded is None:
            return  # not entered, or the checkpoint was of a finished run
        await updates.drain(hold=self.sends_updates)
        if not fold_stage.machine.halted:  # a halted fold stage folds nothing more: its updates ended
            await folded.wait()
        await self._save_final()

    async def _save_final(self) -> None:
        """Write the final checkpoint once: ``stop()``/``result()`` or leaving the block, the first."""
        fold_stage = self.fold_stage
        assert fold_stage is not None
        if self._saved is not None:
            await self._saved.wait()
            if self._save_error is not None:
                raise self._save_error
            return
        saved = self._saved = anyio.Event()
        try:
            # Covers every folded batch, whether or not its update reached the consumer.
            await fold_stage.finish()
        except Exception as exc:
            self._save_error = exc  # for every other caller too: the block's end raises it
            raise
        finally:
            saved.set()
        _log_end(fold_stage.finished, self.stats, self.dead.path)




def ask_source_for_file_positions(run: Run[Any, Any]) -> None:
    """Let ``run``'s checkpoints ask a file source which file the n-th record folded came from
    (n: records folded in this run): a followed file may rotate while batches of the old one are
    still being folded."""
    identify = source_identity(run.source)
    if run.checkpoints.path is not None and identify is not None:
        stats, base = run.stats, run.stats.records
        run.checkpoints.identify = lambda offset: identify(offset, stats.records - base)


def _log_end(finished: bool, stats: Stats, dead_path: str) -> None:
    log.info(
        "run %s: %d batches, %d records folded, %d dead letters%s",
        "finished" if finished else "stopped",
        stats.batches,
        stats.records,
        stats.dead_letters,
        f" (in {dead_path})" if stats.dead_letters else "",
    )


def make_executor(spec: Executor | str, workers: int | None) -> Executor:
    """The executor a pipeline's ``executor`` setting names (an instance is used as it is)."""
    if spec == "process":
        return ProcessExecutor(workers)
    if spec == "thread":
        return ThreadExecutor(workers or 4)
    if spec == "inline":
        return InlineExecutor()
    assert not isinstance(spec, str)
    return spec


async def _read(
    run: Run[Any, Any],
    send: ObjectSendStream[Batch | End],
    events: ObjectSendStream[Event | Begin],
    window: anyio.Semaphore,
    ticket: int,
    position: Any,
    sizes: tuple[Any, int | None],
) -> None:
    """Read ``run``'s source into batches (splits of ``sizes``: split size, lines per batch)."""
    async with send, events:
        # Before any batch, the reader says where it starts: a fresh run's first checkpoint.
        emit = Emitter(send, window, ticket, events)
        p = run.pipeline
        with run._intake or anyio.CancelScope():
            size, split_batch = sizes
            await read(
                run.source, int(p.max_size), p.max_wait, emit, position=position, split_size=size,
                split_max_size=split_batch,
            )
            if not run._stopped and not ended_idle(run.source):
                # The source ended (not asked to, nor quiet): these many batches make the whole run.
                await send.send(End(emit.ticket))


async def _work(
    p: Pipeline[Any, Any],
    task: BatchTask[Any],
    executor: Executor,
    batches: MemoryObjectReceiveStream[Batch | End],
    events: MemoryObjectSendStream[Event],
    window: anyio.Semaphore,
) -> None:
    """Start the executor and run one dispatcher per call it can take; stop it after them."""
    dispatcher = BatchDispatcher(
        executor,
        task,
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


async def _then_set(done: anyio.Event, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """``await fn(*args)``, then set ``done`` (also when it failed or was cancelled)."""
    try:
        await fn(*args)
    finally:
        done.set()


class _Updates(Generic[V]):
    """A run's updates, taken by the one iterating them or held for it by ``stop()``/``result()``.

    Receiving and holding happen under one lock, so that the held updates and those received
    later stay in batch order whichever task took them.
    """

    def __init__(self, stream: ObjectReceiveStream[Update[V]]) -> None:
        self.stream = stream
        self.held: deque[Update[V]] = deque()
        self.lock = anyio.Lock(fast_acquire=True)
        self.ended = False

    async def next(self) -> Update[V] | None:
        """The next update (None at the end)."""
        if not self.held:
            await self._pull(waiting=True)
        return self.held.popleft() if self.held else None

    async def drain(self, *, hold: bool) -> None:
        """Take every update until they end; keep them for ``next()`` when ``hold``."""
        while not self.ended:
            await self._pull(hold=hold)

    async def _pull(self, *, hold: bool = True, waiting: bool = False) -> None:
        async with self.lock:
            if self.ended or (waiting and self.held):
                return  # they ended, or another task took one for ``next()`` meanwhile
            try:
                update = await self.stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                self.ended = True
                return
            if hold:
                self.held.append(update)


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
    # A stage that sent to a stage already stopped by an error fails with a broken stream: that is
    # a consequence of the error, not a second one.
    consequences = (anyio.BrokenResourceError, anyio.ClosedResourceError)
    causes = [leaf for leaf in leaves if not isinstance(leaf, consequences)]
    leaves = causes or leaves
    failed = [leaf for leaf in leaves if isinstance(leaf, BatchFailed)]
    if failed and len(failed) == len(leaves):
        # Dispatchers failing together (an executor gone for every batch in flight): the first.
        return min(failed, key=lambda leaf: leaf.seq)
    return leaves[0] if len(leaves) == 1 else group
