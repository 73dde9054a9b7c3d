"""``Pipeline``: a reusable description of a job — ``fn``, how to fold its results, and the limits."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic, Literal, TypeVar

from .._core.fingerprint import pipeline_fingerprint
from .._core.params import callable_name, check_int, check_seconds
from .._core.policy import check_limits
from .._core.retry import RetryPolicy
from ..aggregate import Aggregator
from ..aggregate.windows import WindowedFn, Windows, combine_in_worker
from ..checkpoints.store import CheckpointStore
from ..executors import Executor
from .reader import describe_source
from .run import Discard, Run
from .sizes import UnsetMaxSize, UnsetSplitSize
from .windowed import WindowStream

__all__ = ["DEFAULT_SPLIT_SIZE", "Pipeline"]

#: Bytes of a file per split (one executor call) when workers read the file themselves.
DEFAULT_SPLIT_SIZE = 2 << 20

R = TypeVar("R")
V = TypeVar("V")

Sink = Callable[[int, Any], Awaitable[None]]
OnError = Literal["dead_letter", "raise"]
ExecutorSpec = Literal["process", "thread", "inline"] | Executor
Source = AsyncIterable[Any] | Iterable[Any]
Target = str | os.PathLike[str] | CheckpointStore


#: The settings :meth:`Pipeline.replace` copies as they are (the retry settings come from ``retry``).
_SETTINGS = (
    "aggregate", "max_size", "max_wait", "workers", "queue_size", "timeout", "on_error", "dead_letter",
    "max_dead_letters_in_a_row", "executor", "checkpoint_every", "checkpoint_every_batches", "sink",
    "split_size",
)


class Pipeline(Generic[R, V]):
    """Runs ``fn`` on micro-batches of a source in workers and folds the results in batch order.

    ``fn(records) -> result`` receives a list of 1..``max_size`` records; ``aggregate`` folds the
    results (``Sum()``, ``TopK(10)``, your own ``Aggregator``). Without ``aggregate``, a run keeps no
    value: use :meth:`map` (or :meth:`updates`, or a ``sink``) for ``fn``'s results. A pipeline is a
    reusable description: the source is given to :meth:`run`, :meth:`updates` or :meth:`map`.

    Parameters (all limits have defaults; memory is bounded by
    ``(queue_size + workers) * max_size`` records plus one read block):

    - ``max_size`` (10,000), ``max_wait`` (0.5 s): batch bounds, see :func:`microbatch.batches`.
      With shard owners, each split of a file is one batch unless ``max_size`` is given, and
      splits are of 1 or 4 MiB, as the keys say, unless ``split_size`` is (``docs/aggregators.md``).
    - ``workers``: worker processes (default: the number of CPUs); ignored with an executor instance.
    - ``executor``: ``"process"`` (default), ``"thread"``, ``"inline"`` or an ``Executor``.
    - ``queue_size`` (4): batches waiting for a worker; the reader stops reading when it is full.
    - ``retries`` (3), ``backoff`` (0.1 s), ``max_backoff`` (10 s): attempts after a failure, with
      exponential backoff and full jitter.
    - ``timeout`` (60 s, None for none): seconds one batch may run; the worker is then killed.
    - ``on_error``: ``"dead_letter"`` (default) isolates failing records by bisection and writes them
      to ``dead_letter`` (default: ``dead-letters.jsonl`` in the checkpoint folder,
      ``NAME.dead-letters.jsonl`` beside a SQLite checkpoint ``NAME``, ``dead-letters.jsonl`` in the
      current directory without a checkpoint), the rest counts; ``"raise"`` stops with ``BatchFailed``.
      Either way, an executor that cannot run anything (``ExecutorUnavailable``: workers that do
      not start, a lost Dask scheduler) stops the run with ``BatchFailed`` after the retries, and
      no record is dead-lettered for it.
    - ``max_dead_letters_in_a_row`` (10, None for no limit): a run whose records keep failing with
      none succeeding in between (``fn`` fails on everything) stops with ``TooManyDeadLetters``,
      showing the first failure, instead of isolating and dead-lettering the whole input.
    - ``checkpoint_every`` (5 s) and ``checkpoint_every_batches`` (None): how often a checkpoint is
      written when ``run(..., checkpoint=...)`` is given; always also at the end and on cancellation.
    - ``split_size`` (2 MiB, or the executor's ``split_size`` attribute when it has one, such as
      ``DaskExecutor``'s 16 MiB; None for none): a regular file read without ``follow`` with more
      than ``split_size`` bytes to read is cut into byte ranges of about this size that workers
      read themselves, each one executor call holding its batches of ``max_size`` lines (see
      ``docs/pipeline.md``, "Splits"); the pipeline process does not read the file. ``timeout``
      then bounds a whole split as that many batches (one batch for the first split). A batch
      whose ``fn`` raises inside a split is retried and bisected on its own; a split whose
      worker crashes or times out is run again batch by batch. A ``nats_stream`` read with
      ``until="end"`` is cut the same way into ranges of stream sequences that workers fetch from
      the server (``docs/sources.md``).
    - ``sink``: ``async def sink(seq, result)``, called in batch order before the checkpoint that
      covers the batch: results written elsewhere at least once, deduplicated by batch number. A
      batch split to isolate failing records calls it once per surviving part, in order. With a
      ``Windows`` aggregate it is called ``sink(seq, window)`` for each window that batch ``seq``
      closed, in close order, instead.

    With ``aggregate=Windows(...)``, :meth:`windows` gives the windows as they close and
    :meth:`run` returns the list of them (``docs/windows.md``).
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], R],
        *,
        aggregate: Aggregator[R, Any, V] | None = None,
        max_size: int = UnsetMaxSize(10_000),
        max_wait: float | None = 0.5,
        workers: int | None = None,
        queue_size: int = 4,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        timeout: float | None = 60.0,
        on_error: OnError = "dead_letter",
        dead_letter: str | os.PathLike[str] | None = None,
        max_dead_letters_in_a_row: int | None = 10,
        executor: ExecutorSpec = "process",
        checkpoint_every: float | None = 5.0,
        checkpoint_every_batches: int | None = None,
        sink: Sink | None = None,
        split_size: int | None = UnsetSplitSize(DEFAULT_SPLIT_SIZE),
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        check_limits(max_size, max_wait)
        if workers is not None:
            check_int("workers", workers, minimum=1)
        check_int("queue_size", queue_size, minimum=1)
        if timeout is not None:
            check_seconds("timeout", timeout)
        if on_error not in ("dead_letter", "raise"):
            raise ValueError(f"on_error must be 'dead_letter' or 'raise', got {on_error!r}")
        if isinstance(executor, str) and executor not in ("process", "thread", "inline"):
            raise ValueError(
                f"executor must be 'process', 'thread', 'inline' or an Executor, got {executor!r}"
            )
        if max_dead_letters_in_a_row is not None:
            check_int("max_dead_letters_in_a_row", max_dead_letters_in_a_row, minimum=1)
        if checkpoint_every is not None:
            check_seconds("checkpoint_every", checkpoint_every, allow_zero=True)
        if checkpoint_every_batches is not None:
            check_int("checkpoint_every_batches", checkpoint_every_batches, minimum=1)
        if split_size is not None:
            check_int("split_size", split_size, minimum=1)
        if isinstance(fn, WindowedFn):  # a copy made by replace(): wrap the user's function afresh
            fn = fn.fn
        # Event-time windows group fn's (timestamp, partial) pairs by window in the worker.
        self.fn = combine_in_worker(fn, aggregate) if isinstance(aggregate, Windows) else fn
        self.aggregate = aggregate
        self.max_size = max_size
        self.max_wait = max_wait
        self.workers = workers
        self.queue_size = queue_size
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self.timeout = timeout
        self.on_error: OnError = on_error
        self.dead_letter = dead_letter
        self.max_dead_letters_in_a_row = max_dead_letters_in_a_row
        self.executor = executor
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_batches = checkpoint_every_batches
        self.sink = sink
        self.split_size = split_size

    @property
    def retries(self) -> int:
        return self.retry.retries

    def __repr__(self) -> str:
        return f"Pipeline({callable_name(self.fn)}, aggregate={self.aggregate!r})"

    def replace(self, **changes: Any) -> Pipeline[R, V]:
        """A copy with some settings changed (the command line's overrides use this)."""
        settings: dict[str, Any] = {name: getattr(self, name) for name in _SETTINGS}
        retry = self.retry
        settings.update(retries=retry.retries, backoff=retry.backoff, max_backoff=retry.max_backoff)
        unknown = set(changes) - set(settings) - {"fn"}
        if unknown:
            raise TypeError(f"unknown Pipeline setting(s): {', '.join(sorted(unknown))}")
        settings.update(changes)
        fn = settings.pop("fn", self.fn)
        return Pipeline(fn, **settings)

    def fingerprint(self, source: object) -> dict[str, str]:
        """What a checkpoint must match to be resumed: the function and the aggregator (names and
        code), the source and the Python version. See ``microbatch._core.fingerprint``."""
        return pipeline_fingerprint(self.fn, self.aggregate or Discard(), describe_source(source))

    def start(
        self,
        source: Source,
        *,
        checkpoint: Target | None = None,
        fresh: bool = False,
        accept_changes: bool = False,
    ) -> Run[R, V]:
        """One run over ``source``, held: ``async with pipeline.start(source) as run:``.

        The :class:`Run` gives ``run.updates()``, ``await run.result()``, ``await run.stop()`` and
        ``run.stats``; leaving the block early stops every stage and every worker. With
        ``checkpoint`` (a folder, a ``*.sqlite`` file or a store), a run resumes from the newest
        valid checkpoint there; ``fresh=True`` discards it first. A checkpoint of a pipeline whose
        function, aggregator or input changed is refused with ``CheckpointMismatch`` naming the
        change; ``accept_changes=True`` resumes anyway (for a change known to be compatible). A
        finished run over a file that has grown since reads only the appended lines; over a
        source that cannot be read again (standard input, a pipe, a TCP server) it is refused
        with ``CheckpointFinished`` (pass ``fresh=True`` to start over); over any other source
        it reads nothing and its value is the checkpoint's.
        """
        return Run(self, source, checkpoint, fresh, accept_changes=accept_changes)

    async def run(
        self,
        source: Source,
        *,
        checkpoint: Target | None = None,
        fresh: bool = False,
        accept_changes: bool = False,
    ) -> V:
        """Run to the end of ``source`` and return the aggregate's final value (None without one).

        ``await run.result()`` of :meth:`start`, which documents the parameters. With a ``Windows``
        aggregate it returns the list of the windows that closed in this run.
        """
        if isinstance(self.aggregate, Windows):
            stream = self.windows(source, checkpoint=checkpoint, fresh=fresh, accept_changes=accept_changes)
            return [window async for window in stream]  # type: ignore[return-value]
        async with self.start(
            source, checkpoint=checkpoint, fresh=fresh, accept_changes=accept_changes
        ) as run:
            return await run.result()

    @asynccontextmanager
    async def updates(
        self,
        source: Source,
        *,
        checkpoint: Target | None = None,
        fresh: bool = False,
        accept_changes: bool = False,
    ) -> AsyncIterator[Run[R, V]]:
        """Run over ``source``, yielding the run, an async iterator of :class:`Update`, one per
        folded batch: ``run.updates()`` of :meth:`start`, which documents the parameters.

        Leaving the block early (``break``, an error, cancellation) stops every stage, writes a final
        checkpoint of what was folded and stops every worker.
        """
        async with self.start(
            source, checkpoint=checkpoint, fresh=fresh, accept_changes=accept_changes
        ) as run:
            yield run.updates()

    def windows(
        self,
        source: Source,
        *,
        checkpoint: Target | None = None,
        fresh: bool = False,
        accept_changes: bool = False,
    ) -> WindowStream:
        """Run over ``source`` with a ``Windows`` aggregate, giving each window as it closes.

        ``async for w in pipeline.windows(src, checkpoint="state/")`` yields ``WindowResult``s in
        close order; use ``async with pipeline.windows(...) as ws: async for w in ws`` to be able
        to leave early (see :class:`~microbatch.pipeline.windowed.WindowStream`). In one run each
        window comes out once. Across a crash and resume, a window may come out again, always with
        the same ``(start, end, key)`` and value; a window that a checkpoint records as emitted
        never comes out again. ``stream.by_window()`` gives the same windows one item per window
        (a ``KeyedWindow`` with every key's value for a ``ByKey`` inner), with no object per key.
        """
        if not isinstance(self.aggregate, Windows):
            raise TypeError(
                f"pipeline.windows() needs aggregate=mb.Windows(...), this pipeline has "
                f"{self.aggregate!r}: use run() or updates()"
            )
        return WindowStream(self, source, checkpoint, fresh, accept_changes)

    @asynccontextmanager
    async def map(
        self,
        source: Source,
        *,
        checkpoint: Target | None = None,
        fresh: bool = False,
        accept_changes: bool = False,
    ) -> AsyncIterator[AsyncIterator[R]]:
        """Run over ``source``, yielding an async iterator of ``fn``'s results in batch order.

        A batch split to isolate failing records gives its parts' results, in order. With
        ``checkpoint``, a resumed run delivers results again from the last checkpoint on: delivery
        is at least once. Deduplicate by batch number with :meth:`updates` (``update.seq`` and
        ``update.results``) where that matters.
        """
        async with self.updates(
            source, checkpoint=checkpoint, fresh=fresh, accept_changes=accept_changes
        ) as run:
            yield _results(run)


async def _results(run: Run[R, Any]) -> AsyncIterator[R]:
    # Nothing here refers to a result once it was given out: while the next update is awaited, the
    # consumer alone decides whether the previous result stays in memory (results can be large).
    async for update in run:
        pending = update.results[::-1]
        del update
        while pending:
            yield pending.pop()
