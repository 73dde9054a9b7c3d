"""``Pipeline``: batches from a source, run in workers, folded in order, checkpointed.

The stages of one run, each a task, talking through bounded memory object streams::

    reader ──Batch──▶ queue (queue_size) ──▶ dispatchers ──▶ folder ──Update──▶ you
       ▲                                                          │
       └────── window: at most queue_size + capacity batches unfolded

There are ``capacity * (1 + prefetch)`` dispatchers: an executor with ``prefetch`` (worker
processes) holds batches ready in each worker, and those batches count against ``queue_size``.

The reader cuts the source into batches (line sources as raw blocks of bytes, split in the worker);
each dispatcher runs one batch at a time on the executor with retries and, when a batch keeps
failing, bisects it to isolate the failing records into the dead-letter file; the folder puts results
back into batch order, folds them into the aggregator's state, and writes checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from .._core.checkpoint import Checkpoint, CheckpointStore, check_fingerprint, is_sqlite_target, open_store
from .._core.lines import LineBlock, cut_lines, decode_lines
from .._core.policy import check_limits
from .._core.retry import RetryPolicy, halves
from .._core.task import BatchTask
from .._exceptions import BatchFailed, BatchTimeout, ExecutorUnavailable, WorkerCrashed
from ..aggregate import Aggregator
from ..executors.process import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor, check_picklable
from ..sources.files import LineSource, TcpLines
from .deadletter import DeadLetter, DeadLetterFile, describe_error
from .reader import Batch, Emitter, read_line_blocks, read_records, skip

__all__ = ["Pipeline", "Stats", "Update"]

R = TypeVar("R")
V = TypeVar("V")

Sink = Callable[[int, Any], Awaitable[None]]
OnError = Literal["dead_letter", "raise"]
ExecutorSpec = Literal["process", "thread", "inline"] | Executor


@dataclass(slots=True)
class Stats:
    """Counters of one run; every ``Update`` carries a snapshot.

    ``records`` and ``batches`` count what was folded (including what a resumed run inherited);
    ``queue_depth`` is the number of batches waiting for a worker, ``in_flight`` those running;
    latencies are seconds from a batch being cut to its result being folded.
    """

    records: int = 0
    batches: int = 0
    retries: int = 0
    crashes: int = 0
    timeouts: int = 0
    errors: int = 0
    dead_letters: int = 0
    checkpoints: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    position: Any = None
    started: float = 0.0
    elapsed: float = 0.0
    last_latency: float = 0.0
    total_latency: float = 0.0
    run_records: int = 0
    run_batches: int = 0

    @property
    def mean_latency(self) -> float:
        """Mean seconds from cutting a batch to folding it, over this run."""
        return self.total_latency / self.run_batches if self.run_batches else 0.0

    @property
    def records_per_second(self) -> float:
        """Records folded per second in this run."""
        return self.run_records / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Update(Generic[V]):
    """The state after one batch was folded."""

    value: V
    seq: int
    records: int
    batch_records: int
    position: Any
    stats: Stats


@dataclass(slots=True)
class _Outcome:
    results: list[Any] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def _qualname(obj: Any) -> str:
    target = getattr(obj, "func", obj)  # functools.partial
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


class Pipeline(Generic[R, V]):
    """Runs ``fn`` on micro-batches of a source in workers and folds the results in batch order.

    ``fn(records) -> result`` receives a list of 1..``max_size`` records; ``aggregate`` folds the
    results (``Sum()``, ``TopK(10)``, your own ``Aggregator``). A pipeline is a reusable
    description: the source is given to :meth:`run` or :meth:`updates`.

    Parameters (all limits have defaults; memory is bounded by
    ``(queue_size + workers) * max_size`` records plus one read block):

    - ``max_size`` (10,000), ``max_wait`` (0.5 s): batch bounds, see :func:`microbatch.batches`.
    - ``workers``: worker processes (default: the number of CPUs); ignored with an executor instance.
    - ``executor``: ``"process"`` (default), ``"thread"``, ``"inline"`` or an ``Executor``.
    - ``queue_size`` (4): batches waiting for a worker; the reader stops reading when it is full.
    - ``retries`` (3), ``backoff`` (0.1 s), ``max_backoff`` (10 s): attempts after a failure, with
      exponential backoff and full jitter.
    - ``timeout`` (60 s, None for none): seconds one batch may run; the worker is then killed.
    - ``on_error``: ``"dead_letter"`` (default) isolates failing records by bisection and writes them
      to ``dead_letter`` (default: ``dead-letters.jsonl`` in the checkpoint folder, or in the
      current directory without one), the rest counts; ``"raise"`` stops with ``BatchFailed``.
      Either way, an executor that cannot run anything (``ExecutorUnavailable``: workers that do
      not start, a lost Dask scheduler) stops the run with ``BatchFailed`` after the retries, and
      no record is dead-lettered for it.
    - ``checkpoint_every`` (5 s) and ``checkpoint_every_batches`` (None): how often a checkpoint is
      written when ``run(..., checkpoint=...)`` is given; always also at the end and on cancellation.
    - ``sink``: ``async def sink(seq, result)``, called in batch order before the checkpoint that
      covers the batch: results written elsewhere at least once, deduplicated by batch number. A
      batch split to isolate failing records calls it once per surviving part, in order.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], R],
        *,
        aggregate: Aggregator[R, Any, V],
        max_size: int = 10_000,
        max_wait: float | None = 0.5,
        workers: int | None = None,
        queue_size: int = 4,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        timeout: float | None = 60.0,
        on_error: OnError = "dead_letter",
        dead_letter: str | os.PathLike[str] | None = None,
        executor: ExecutorSpec = "process",
        checkpoint_every: float | None = 5.0,
        checkpoint_every_batches: int | None = None,
        sink: Sink | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        check_limits(max_size, max_wait)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if timeout is not None and (math.isnan(timeout) or timeout <= 0):
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if on_error not in ("dead_letter", "raise"):
            raise ValueError(f"on_error must be 'dead_letter' or 'raise', got {on_error!r}")
        if isinstance(executor, str) and executor not in ("process", "thread", "inline"):
            raise ValueError(
                f"executor must be 'process', 'thread', 'inline' or an Executor, got {executor!r}"
            )
        if checkpoint_every is not None and (math.isnan(checkpoint_every) or checkpoint_every < 0):
            raise ValueError(f"checkpoint_every must be >= 0 seconds or None, got {checkpoint_every!r}")
        if checkpoint_every_batches is not None and checkpoint_every_batches < 1:
            raise ValueError(
                f"checkpoint_every_batches must be >= 1 or None, got {checkpoint_every_batches!r}"
            )
        self.fn = fn
        self.aggregate = aggregate
        self.max_size = max_size
        self.max_wait = max_wait
        self.workers = workers
        self.queue_size = queue_size
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self.timeout = timeout
        self.on_error: OnError = on_error
        self.dead_letter = dead_letter
        self.executor = executor
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_batches = checkpoint_every_batches
        self.sink = sink

    @property
    def retries(self) -> int:
        return self.retry.retries

    def replace(self, **changes: Any) -> Pipeline[R, V]:
        """A copy with some settings changed (the command line's overrides use this)."""
        settings: dict[str, Any] = {
            "aggregate": self.aggregate,
            "max_size": self.max_size,
            "max_wait": self.max_wait,
            "workers": self.workers,
            "queue_size": self.queue_size,
            "retries": self.retry.retries,
            "backoff": self.retry.backoff,
            "max_backoff": self.retry.max_backoff,
            "timeout": self.timeout,
            "on_error": self.on_error,
            "dead_letter": self.dead_letter,
            "executor": self.executor,
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_every_batches": self.checkpoint_every_batches,
            "sink": self.sink,
        }
        unknown = set(changes) - set(settings) - {"fn"}
        if unknown:
            raise TypeError(f"unknown Pipeline setting(s): {', '.join(sorted(unknown))}")
        settings.update(changes)
        fn = settings.pop("fn", self.fn)
        return Pipeline(fn, **settings)

    def fingerprint(self, source: object) -> dict[str, str]:
        """What a checkpoint must match to be resumed: the function, the aggregator, the source."""
        return {
            "fn": _qualname(self.fn),
            "aggregate": self.aggregate.describe(),
            "source": _describe_source(source),
        }

    async def run(
        self,
        source: AsyncIterable[Any] | Iterable[Any],
        *,
        checkpoint: str | os.PathLike[str] | CheckpointStore | None = None,
        fresh: bool = False,
    ) -> V:
        """Run to the end of ``source`` and return the aggregate's final value.

        With ``checkpoint`` (a folder, a ``*.sqlite`` file or a store), a run resumes from the
        newest valid checkpoint there; ``fresh=True`` discards it first.
        """
        run = _Run(self, source, checkpoint, fresh, updates=False)
        async with run:
            async for _ in run:
                pass  # nothing comes: the run ends when the folder is done
            return run.value

    @asynccontextmanager
    async def updates(
        self,
        source: AsyncIterable[Any] | Iterable[Any],
        *,
        checkpoint: str | os.PathLike[str] | CheckpointStore | None = None,
        fresh: bool = False,
    ) -> AsyncIterator[_Run[R, V]]:
        """Run over ``source``, yielding an async iterator of :class:`Update`, one per folded batch.

        Leaving the block early (``break``, an error, cancellation) stops every stage, writes a final
        checkpoint of what was folded and stops every worker.
        """
        run = _Run(self, source, checkpoint, fresh)
        async with run:
            yield run


def _describe_source(source: object) -> str:
    if isinstance(source, LineSource):
        return f"file:{os.path.abspath(source.path)}"
    if isinstance(source, TcpLines):
        return "tcp"
    return f"iterable:{type(source).__qualname__}"


def _payload_size(payload: LineBlock | list[Any]) -> int:
    return payload.count if isinstance(payload, LineBlock) else len(payload)


class _Run(Generic[R, V]):
    """One run of a pipeline: owns its tasks, executor, dead-letter file and checkpoint store."""

    def __init__(
        self,
        pipeline: Pipeline[R, V],
        source: AsyncIterable[Any] | Iterable[Any],
        checkpoint: str | os.PathLike[str] | CheckpointStore | None,
        fresh: bool,
        *,
        updates: bool = True,
    ) -> None:
        p = self.p = pipeline
        self._send_updates = updates
        self.source = source
        self.fingerprint = p.fingerprint(source)
        self._checkpoint_target = checkpoint
        self.store: CheckpointStore | None = None
        self.fresh = fresh
        self.agg = p.aggregate
        self.state: Any = self.agg.initial()
        self.stats = Stats()
        self.finished = False
        self.next_seq = 0
        if isinstance(source, LineSource):
            where, encoding, errors = source.path, source.encoding, source.errors
        else:
            where, encoding, errors = "<records>", None, "strict"
        self.task: BatchTask[R] = BatchTask(p.fn, encoding=encoding, errors=errors, where=str(where))
        if p.dead_letter is not None:
            dl_path: str | os.PathLike[str] = p.dead_letter
        elif isinstance(checkpoint, (str, os.PathLike)) and not is_sqlite_target(checkpoint):
            dl_path = os.path.join(checkpoint, "dead-letters.jsonl")
        else:
            dl_path = "dead-letters.jsonl"
        self.dead = DeadLetterFile(dl_path)
        self._stack = AsyncExitStack()
        self._intake = anyio.CancelScope()
        self._source_batches: int | None = None
        self._updates_recv: ObjectReceiveStream[Update[V]] | None = None
        self._last_checkpoint = 0.0
        self._batches_since_checkpoint = 0

    @property
    def value(self) -> V:
        """The aggregate's current value (the final one once the iteration ended)."""
        return self.agg.value(self.state)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> _Run[R, V]:
        p = self.p
        self.stats.started = anyio.current_time()
        self._last_checkpoint = self.stats.started
        try:
            await self._restore()
        except BaseException:
            await self._stack.aclose()  # closes the store and releases its lock
            raise
        if self.finished:
            return self
        executor = self._make_executor()
        if isinstance(executor, ProcessExecutor):
            check_picklable(self.p.fn)
        self.executor = executor
        stack = self._stack
        try:
            stack.callback(self.dead.close)
            # Runs after the task group has stopped every stage: it sees the last folded state.
            stack.push_async_callback(self._final_checkpoint)
            # The window opens to queue_size now and by the executor's capacity once it runs, so
            # the reader fills the queue while the workers start.
            window = anyio.Semaphore(p.queue_size, fast_acquire=True)
            batch_send, batch_recv = anyio.create_memory_object_stream[Batch](p.queue_size)
            # Unbounded in type only: the window holds unfolded batches to queue_size + capacity.
            result_send, result_recv = anyio.create_memory_object_stream[tuple[Batch, _Outcome]](
                math.inf
            )
            update_send, self._updates_recv = anyio.create_memory_object_stream[Update[V]](0)
            self._batch_send = batch_send
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = tg
            tg.start_soon(self._read, batch_send, window)
            tg.start_soon(self._work, batch_recv, result_send, window)
            tg.start_soon(self._fold, result_recv, update_send, window)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if exc_info[1] is not None or not self.finished:
            # Leaving early: stop every stage; the final checkpoint still records what was folded.
            if hasattr(self, "_tg"):
                self._tg.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    def stop(self) -> None:
        """Stop intake: read no more of the source, finish and fold the batches already read.

        The iteration then ends normally with a final checkpoint that is not ``finished`` (unless
        the source had already ended), so a rerun with the same checkpoint resumes after the last
        folded batch; records read but not yet cut into a batch are read again then. Batches in
        flight still obey ``timeout``; to abandon them, leave the ``async with`` block instead.
        Calling it again does nothing.
        """
        self._intake.cancel()

    def __aiter__(self) -> _Run[R, V]:
        return self

    async def __anext__(self) -> Update[V]:
        if self._updates_recv is None:
            raise StopAsyncIteration
        try:
            return await self._updates_recv.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def _make_executor(self) -> Executor:
        spec = self.p.executor
        workers = self.p.workers
        if spec == "process":
            return ProcessExecutor(workers)
        if spec == "thread":
            return ThreadExecutor(workers or 4)
        if spec == "inline":
            return InlineExecutor()
        return spec

    # -- checkpoints --------------------------------------------------------------------------------

    async def _restore(self) -> None:
        target = self._checkpoint_target
        if target is None:
            return
        # Opening and locking a store is file I/O (the lock also removes stale temporary files).
        store = self.store = await anyio.to_thread.run_sync(open_store, target)
        self._stack.callback(store.close)
        lock = getattr(store, "lock", None)  # the built-in stores admit one writer at a time
        if lock is not None:
            await anyio.to_thread.run_sync(lock)
        # A run without a checkpoint appends to the dead-letter file as it finds it; checkpoints
        # record the file's absolute length, so a resumed run cuts back only what it wrote itself.
        if self.fresh:
            await anyio.to_thread.run_sync(store.clear)
            return
        cp = await anyio.to_thread.run_sync(store.load)
        if cp is None:
            return
        check_fingerprint(cp.fingerprint, self.fingerprint, location=store.location)
        self.state = self.agg.load(cp.state)
        self.next_seq = cp.batches
        self.stats.batches = cp.batches
        self.stats.records = cp.records
        self.stats.position = cp.position
        self.dead.truncate_to(cp.dead_letters)
        self.finished = cp.finished
        self.source = self._resume_source(cp.position)

    def _resume_source(self, position: Any) -> AsyncIterable[Any] | Iterable[Any]:
        source = self.source
        if position is None or position == 0 or isinstance(source, TcpLines):
            return source
        if isinstance(source, LineSource):
            return source.with_start(int(position))
        return skip(source, int(position))

    def _checkpoint_now(self, finished: bool) -> Checkpoint:
        return Checkpoint(
            batches=self.stats.batches,
            records=self.stats.records,
            position=self.stats.position,
            state=self.agg.dump(self.state),
            dead_letters=self.dead.length,
            fingerprint=self.fingerprint,
            finished=finished,
        )

    async def _save(self, finished: bool) -> None:
        store = self.store
        if store is None:
            return
        cp = self._checkpoint_now(finished)

        def write() -> None:
            self.dead.sync()
            store.save(cp)

        await anyio.to_thread.run_sync(write)
        self.stats.checkpoints += 1
        self._last_checkpoint = anyio.current_time()
        self._batches_since_checkpoint = 0

    async def _maybe_checkpoint(self) -> None:
        p = self.p
        self._batches_since_checkpoint += 1
        due = (
            p.checkpoint_every_batches is not None
            and self._batches_since_checkpoint >= p.checkpoint_every_batches
        ) or (
            p.checkpoint_every is not None
            and anyio.current_time() - self._last_checkpoint >= p.checkpoint_every
        )
        if due:
            await self._save(finished=False)

    async def _final_checkpoint(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._save(finished=self.finished)

    # -- stages -------------------------------------------------------------------------------------

    async def _read(self, send: ObjectSendStream[Batch], window: anyio.Semaphore) -> None:
        async with send:
            emit = Emitter(send, window, self.next_seq)
            source, p = self.source, self.p
            with self._intake:
                if isinstance(source, LineSource):
                    await read_line_blocks(source, p.max_size, p.max_wait, emit)
                else:
                    start = None if isinstance(source, TcpLines) else self.stats.position or 0
                    await read_records(source, p.max_size, p.max_wait, start, emit)
                # The source ended (not stopped): these many batches make the whole run.
                self._source_batches = emit.seq

    async def _work(
        self,
        batches_in: MemoryObjectReceiveStream[Batch],
        results_out: MemoryObjectSendStream[tuple[Batch, _Outcome]],
        window: anyio.Semaphore,
    ) -> None:
        """Start the executor and run one dispatcher per call it can take; stop it after them."""
        async with batches_in, results_out, self.executor, anyio.create_task_group() as tg:
            # Known once entered (a Dask cluster counts its threads). An executor with ``prefetch``
            # takes that many more calls per unit of capacity and queues them where they run (a
            # worker starts its next batch without waiting for this loop). The window is not
            # widened: those batches come out of the queue_size share.
            capacity = self.executor.capacity
            for _ in range(capacity):
                window.release()
            for _ in range(capacity * (1 + getattr(self.executor, "prefetch", 0))):
                tg.start_soon(self._dispatch, batches_in.clone(), results_out.clone())

    async def _dispatch(
        self,
        batches_in: ObjectReceiveStream[Batch],
        results_out: ObjectSendStream[tuple[Batch, _Outcome]],
    ) -> None:
        async with batches_in, results_out:
            async for batch in batches_in:
                self.stats.in_flight += 1
                try:
                    outcome = await self._process(batch)
                finally:
                    self.stats.in_flight -= 1
                await results_out.send((batch, outcome))

    async def _process(self, batch: Batch) -> _Outcome:
        try:
            return _Outcome(results=[await self._attempt(batch.payload)])
        except Exception as exc:
            if self.p.on_error == "raise" or isinstance(exc, ExecutorUnavailable):
                # An unavailable executor says nothing about the records: stop, dead-letter none.
                raise BatchFailed(batch.seq, exc, self.p.retry.attempts) from exc
            if batch.count == 1:
                return _Outcome(dead=[self._dead_letter(batch, batch.payload, batch.start, exc)])
            outcome = _Outcome()
            await self._isolate(batch, batch.payload, batch.start, outcome)
            return outcome

    async def _attempt(self, payload: LineBlock | list[Any], *, retry: bool = True) -> Any:
        """Run one payload, retrying with backoff on any failure; raise the last failure."""
        failed = 0
        while True:
            try:
                return await self.executor.run(self.task, payload, timeout=self.p.timeout)
            except Exception as exc:  # noqa: PERF203 - once per failed attempt, not per record
                if isinstance(exc, WorkerCrashed):
                    self.stats.crashes += 1
                elif isinstance(exc, BatchTimeout):
                    self.stats.timeouts += 1
                else:
                    self.stats.errors += 1
                failed += 1
                if not retry or not self.p.retry.should_retry(failed):
                    raise
                self.stats.retries += 1
                await anyio.sleep(self.p.retry.delay(failed, random.random()))

    async def _isolate(
        self, batch: Batch, payload: LineBlock | list[Any], start: int | None, outcome: _Outcome
    ) -> None:
        """Bisect a failing payload: good parts' results count, single failing records are dead."""
        head_n, _ = halves(_payload_size(payload))
        parts: list[tuple[LineBlock | list[Any], int | None]]
        if isinstance(payload, LineBlock):
            head, tail = cut_lines(payload, head_n)
            parts = [(head, head.start), (tail, tail.start)]
        else:
            tail_start = None if start is None else start + head_n
            parts = [(payload[:head_n], start), (payload[head_n:], tail_start)]
        for part, part_start in parts:
            single = _payload_size(part) == 1
            try:
                # A single record gets the full retries before it is declared dead.
                outcome.results.append(await self._attempt(part, retry=single))
            except Exception as exc:
                if isinstance(exc, ExecutorUnavailable):
                    raise BatchFailed(batch.seq, exc, self.p.retry.attempts) from exc
                if single:
                    outcome.dead.append(self._dead_letter(batch, part, part_start, exc))
                else:
                    await self._isolate(batch, part, part_start, outcome)

    def _dead_letter(
        self, batch: Batch, part: LineBlock | list[Any], position: int | None, exc: BaseException
    ) -> DeadLetter:
        if isinstance(part, LineBlock):
            record: Any = decode_lines(
                part.data,
                encoding=self.task.encoding,
                errors="replace" if self.task.encoding else "strict",
                where=self.task.where,
                start=part.start,
            )[0]
        else:
            record = part[0]
        type_name, message, tb = describe_error(exc)
        return DeadLetter(record, batch.seq, position, type_name, message, tb)

    async def _fold(
        self,
        results: ObjectReceiveStream[tuple[Batch, _Outcome]],
        updates: ObjectSendStream[Update[V]],
        window: anyio.Semaphore,
    ) -> None:
        """Fold outcomes strictly in batch order; the reorder buffer is bounded by the window."""
        reorder: dict[int, tuple[Batch, _Outcome]] = {}
        sink = self.p.sink
        stats = self.stats
        async with results, updates:
            async for batch, outcome in results:
                reorder[batch.seq] = (batch, outcome)
                while self.next_seq in reorder:
                    batch, outcome = reorder.pop(self.next_seq)
                    if sink is not None:
                        for result in outcome.results:
                            await sink(batch.seq, result)
                    # No await from here to the counters: a checkpoint never sees half a batch.
                    for result in outcome.results:
                        self.state = self.agg.fold(self.state, result)
                    self.dead.write(outcome.dead)
                    stats.dead_letters += len(outcome.dead)
                    stats.records += batch.count
                    stats.run_records += batch.count
                    stats.batches += 1
                    stats.run_batches += 1
                    stats.position = batch.end
                    now = anyio.current_time()
                    stats.last_latency = now - batch.cut_at
                    stats.total_latency += stats.last_latency
                    stats.elapsed = now - stats.started
                    stats.queue_depth = self._batch_send.statistics().current_buffer_used
                    self.next_seq += 1
                    window.release()
                    await self._maybe_checkpoint()
                    if self._send_updates:
                        await updates.send(
                            Update(
                                value=self.agg.value(self.state),
                                seq=batch.seq,
                                records=stats.records,
                                batch_records=batch.count,
                                position=batch.end,
                                stats=replace(stats),
                            )
                        )
            # Finished only when the source was read to its end (not after stop()) and every one of
            # its batches was folded: results also stop coming when a dispatcher failed.
            self.finished = self._source_batches is not None and self.next_seq == self._source_batches


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
