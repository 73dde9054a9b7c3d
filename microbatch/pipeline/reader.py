"""The pipeline's reading stage: a source in, numbered batches out, each with the position after it.

This is the only place that looks at what a source can do, and it asks the protocols
(:mod:`microbatch.sources.protocol`), never a source's class. A source is read one of three ways:

1. **Line parts** (:class:`LineParts`: files, standard input): the raw bytes of each read are cut
   into batches of exactly ``max_size`` lines with :func:`cut_parts`, so the event loop never
   touches single lines; workers split and decode them. A batch ends at a byte offset. A line
   source that is a regular file read without ``follow`` (:class:`SplittableLines`) holding more
   than ``split_size`` bytes is not read here at all when the pipeline has a ``split_size``: it is
   planned as byte-range splits (:func:`read_splits`) that workers read themselves; each split is
   one item on the queue.
2. **Chunks** (:class:`Source`): ``chunks()`` yields :class:`Chunk` objects. A batch ends at
   ``{"chunk": <position of the last chunk whose records are all in this or earlier batches, or
   None>, "skip": <records of the next chunk in this and earlier batches>}``; a batch may end in
   the middle of a chunk, and a chunk may hold more or fewer records than ``max_size``. A
   ``chunks()`` that yields plain lists (a TCP server) has no positions: batches end at None.
3. **Any iterable or async iterable**: a batch ends at a count of records.

The size/time decisions are :class:`BatchPolicy`'s either way, and a checkpoint records a batch's
end; :func:`~microbatch.pipeline.resume.resume_source` turns it back into what is left to read.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import ObjectSendStream

from .._batching import batches
from .._core.lines import LineBlock, cut_parts
from .._core.params import check_int
from .._core.policy import BatchPolicy
from .._core.splits import FileSplit, SourceSplit, plan_splits
from .._waits import wait_until
from ..checkpoints.format import PositionKind
from ..sources.protocol import Chunk, LineParts, Part, Source, describe_source
from .resume import aclose_iterator, chunk_position

__all__ = [
    "Batch",
    "Begin",
    "Emitter",
    "SplittableLines",
    "SplittableSource",
    "decoding",
    "describe_source",
    "read",
    "read_line_blocks",
    "read_records",
    "read_splits",
    "source_identity",
    "worth_splitting",
]


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch on its way to a worker: its ticket, its records (or block of lines), positions.

    ``ticket`` numbers what the reader sends, in order: the fold stage folds by it. It is the
    batch's number, except after a file split, which takes one ticket for all its batches.

    ``start`` is the position of its first record when positions are numbers (a byte offset, a
    record count), else None; ``end`` is the source position just after its last record. A
    :class:`FileSplit` payload stands for all the batches of one split: ``count`` is 0 (unknown
    until a worker read it) and ``start``/``end`` are the split's planned range.

    ``undecodable``: records of a chunk source that did not decode, completed by this batch (see
    :class:`~microbatch.sources.protocol.Chunk`): they go to the dead letters with it.
    """

    ticket: int
    payload: LineBlock | list[Any] | FileSplit | SourceSplit
    count: int
    start: int | None
    end: Any
    cut_at: float
    undecodable: Sequence[tuple[int, bytes, str]] = ()


@dataclass(frozen=True, slots=True)
class Begin:
    """The reader starts reading at ``position`` (as a batch's ``end``): the start checkpoint of
    a fresh run names it."""

    position: Any


class Emitter:
    """Gives batches their tickets and sends them, first waiting for the window (the reader's lead)
    to allow it; ``ticket`` is the next one.

    ``events`` (None: nowhere) receives one :class:`Begin` before the first batch.
    """

    def __init__(
        self,
        send: ObjectSendStream[Batch],
        window: anyio.Semaphore,
        ticket: int,
        events: ObjectSendStream[Any] | None = None,
    ) -> None:
        self.send = send
        self.window = window
        self.ticket = ticket
        self.events = events

    async def __call__(
        self,
        payload: LineBlock | list[Any] | FileSplit | SourceSplit,
        count: int,
        start: int | None,
        end: Any,
        undecodable: Sequence[tuple[int, bytes, str]] = (),
    ) -> None:
        await self.window.acquire()
        batch = Batch(self.ticket, payload, count, start, end, anyio.current_time(), undecodable)
        self.ticket += 1
        await self.send.send(batch)

    async def block(self, block: LineBlock) -> None:
        await self(block, block.count, block.start, block.end)

    async def begin(self, position: Any) -> None:
        """Reading starts at ``position``; said once, the first time."""
        events, self.events = self.events, None
        if events is not None:
            await events.send(Begin(position))


# -- what a source can do ---------------------------------------------------------------------------


@runtime_checkable
class SplittableLines(LineParts, Protocol):
    """A line source that may be read as byte ranges by workers (a regular file, not followed).

    ``splittable()`` says whether it can be now (it may look at the file: it is called off the
    event loop); ``start`` is the byte offset reading begins at, ``max_line_length`` the longest
    line accepted.
    """

    path: str
    start: int
    max_line_length: int

    def splittable(self) -> bool: ...


@runtime_checkable
class SplittableSource(Protocol):
    """A chunk source that may be read as splits by workers (a stream read up to its end).

    ``splittable()`` says whether it can be (no I/O); ``splits(max_size, split_size)`` plans
    them (it may ask the source's server how much is left), or returns None when no more than
    one split's worth is left: the source is then read as chunks.
    """

    def splittable(self) -> bool: ...

    async def splits(self, max_size: int, split_size: int) -> list[SourceSplit] | None: ...


def decoding(source: object) -> tuple[str, str | None, str]:
    """``(where, encoding, errors)`` with which workers decode the source's lines.

    ``("<records>", None, "strict")`` for sources whose records need no decoding.
    """
    if isinstance(source, LineParts):
        return str(source.where), source.encoding, source.errors
    return "<records>", None, "strict"


def position_kind(source: object) -> PositionKind:
    """The kind of position a checkpoint of ``source`` holds (checked when resuming)."""
    if isinstance(source, LineParts):
        return "offset"
    if isinstance(source, Source):
        return "chunk"
    return "count"


def stop_intake(source: object) -> bool:
    """Ask a source that can end on request (a TCP server) to deliver what it has received and end.

    False for the others: the run then stops reading it itself.
    """
    stop = getattr(source, "stop_intake", None)
    if not callable(stop):
        return False
    stop()
    return True


def source_identity(source: object) -> Callable[[int, int], Any] | None:
    """For a file: ``position_at(offset, records)``, the position (a ``FilePosition``) after the
    ``records``-th record read, which ends at ``offset`` of its file (a followed file may have been
    rotated since)."""
    position_at = getattr(source, "position_at", None)
    return position_at if isinstance(source, LineParts) and callable(position_at) else None


# -- reading ----------------------------------------------------------------------------------------


async def read(
    source: Any,
    max_size: int,
    max_wait: float | None,
    emit: Emitter,
    *,
    position: Any = None,
    split_size: int | Callable[[], int] | None = None,
    split_max_size: int | None = None,
) -> None:
    """Batch ``source`` (as :func:`resume_source` returned it, after ``position``) into ``emit``.

    Every batch's ``end`` is the source position just after it: a byte offset for line parts, a
    chunk position for chunk sources (None when its chunks are plain lists), a record count for
    other iterables. With ``split_size``, a splittable line source (a file) or chunk source (a
    stream read to its end) is emitted as splits instead; a file's splits hold batches of
    ``split_max_size`` lines (``max_size`` when None). A callable ``split_size`` is asked before
    each split of a file (a size that follows the run).
    """
    size_now = split_size if split_size is None or isinstance(split_size, int) else split_size()
    if isinstance(source, LineParts):
        if (
            split_size is not None
            and size_now is not None
            and isinstance(source, SplittableLines)
            and await anyio.to_thread.run_sync(worth_splitting, source, size_now)
        ):
            await read_splits(source, split_size, split_max_size or max_size, emit)
        else:
            await read_line_blocks(source, max_size, max_wait, emit)
    elif isinstance(source, Source):
        if size_now is not None and isinstance(source, SplittableSource) and source.splittable():
            splits = await source.splits(max_size, size_now)
            if splits is not None:
                await emit.begin(position)
                for split in splits:
                    await emit(split, 0, split.start, split.position(split.end))
                return
        chunk, count = (None, 0) if position is None else chunk_position(position)
        await emit.begin(position)
        await _read_chunks(source, max_size, max_wait, emit, chunk, count)
    else:
        start = 0 if position is None else check_int("position", position)
        await emit.begin(position)
        await read_records(source, max_size, max_wait, start, emit)


async def read_line_blocks(source: LineParts, max_size: int, max_wait: float | None, emit: Emitter) -> None:
    """Cut a line source's raw bytes into batches of ``max_size`` lines, bounded by time.

    The source's reads arrive as parts (``source.parts()``) that are cut where they lie, so
    each byte is copied once, into the batch it belongs to. A separate task reads, so that a
    partial batch still leaves at its deadline while a followed file is silent.
    """
    policy = BatchPolicy(max_size, max_wait)
    part_send, part_recv = anyio.create_memory_object_stream[Part](1)

    async def pump() -> None:
        async with part_send:
            async for part in source.parts():
                await part_send.send(part)

    received: list[Part] = []

    async def receive() -> None:
        received.append(await part_recv.receive())

    pending: LineBlock | None = None
    async with anyio.create_task_group() as tg, part_recv:
        tg.start_soon(pump)
        while True:
            try:
                arrived = await wait_until(policy.deadline, receive)
            except anyio.EndOfStream:
                break
            if not arrived:
                # The source was silent until the partial batch's deadline.
                if pending is not None and policy.take_partial():
                    await emit.block(pending)
                    pending = None
                continue
            head, data, end, start = received.pop()
            if pending is not None and pending.end != start:
                # A followed file was truncated or replaced: positions restart in the new file, so
                # the lines of the old one leave as a batch of their own.
                policy.take_partial()
                await emit.block(pending)
                pending = None
            if emit.events is not None:
                await emit.begin(start)
            count = data.count(b"\n", 0, end)
            if data[end - 1] != 10:
                count += 1  # the last line of the file, without a newline
            full = policy.add(count, anyio.current_time())
            blocks, pending = cut_parts(pending, head, data, end, start, max_size, count)
            assert len(blocks) == full, "the reader and its policy disagree on full batches"
            for block in blocks:
                await emit.block(block)
    if policy.flush() and pending is not None:
        await emit.block(pending)


def worth_splitting(source: SplittableLines, split_size: int) -> bool:
    """Whether to read ``source`` as splits: it can be, and more than one split's bytes are left.

    What one split would hold runs on one worker as a single call; read here and sent batch by
    batch, it spreads over every worker and the first results come sooner. Does a ``stat``.
    """
    if not source.splittable():
        return False
    try:
        return os.path.getsize(source.path) - source.start > split_size
    except OSError:
        return False  # gone since: reading it reports the error


async def read_splits(
    source: SplittableLines, split_size: int | Callable[[], int], max_size: int, emit: Emitter
) -> None:
    """Emit the file's byte-range splits (:func:`plan_splits`) from ``source.start`` to its size now.

    Reads one byte of the file (to check that ``start`` begins a line) and no more: workers read
    the splits. Lines appended after this point are not part of the run (a resumed run over the
    grown file reads them). A ``start`` past the end of the file, or not at a line's beginning,
    raises ``ValueError`` naming the file, as reading it would.
    """
    path, start = source.path, source.start
    size = await anyio.to_thread.run_sync(_size_from, path, start)
    await emit.begin(start)
    for lo, hi in plan_splits(start, size, split_size):
        await emit(FileSplit(path, lo, hi, max_size, source.max_line_length), 0, lo, hi)


def _size_from(path: str, start: int) -> int:
    """The file's size, after checking that ``start`` is within it and begins a line."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if start > size:
            raise ValueError(
                f"{path}: start={start} is past the end of the file ({size} bytes); "
                f"was the file replaced since that offset was recorded?"
            )
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                raise ValueError(
                    f"{path}: start={start} is not the beginning of a line (byte {start - 1} "
                    f"is not a newline); pass the end offset of a block or record read before"
                )
        return size


async def read_records(
    source: AsyncIterable[Any] | Iterable[Any],
    max_size: int,
    max_wait: float | None,
    start: int | None,
    emit: Emitter,
) -> None:
    """Batch any other source; positions count records from ``start`` (None: no positions)."""
    async with batches(source, max_size=max_size, max_wait=max_wait) as stream:
        async for records in stream:
            end = None if start is None else start + len(records)
            await emit(records, len(records), start, end)
            start = end


async def _read_chunks(
    source: Source[Any], max_size: int, max_wait: float | None, emit: Emitter, chunk: Any, count: int
) -> None:
    """Batch a chunk source; each batch ends at the chunk position after its last record."""
    positions = _Positions(source, chunk, count)
    async with AsyncExitStack() as stack:
        if hasattr(type(source), "__aenter__"):
            await stack.enter_async_context(source)  # type: ignore[arg-type]
        stream = await stack.enter_async_context(batches(positions, max_size=max_size, max_wait=max_wait))
        async for records in stream:
            end = positions.end_after(len(records))
            await emit(records, len(records), None, end, positions.take_undecodable())
        if any(segment[2] for segment in positions.segments):
            # The last chunks held only records that did not decode: a batch of none carries them.
            end = positions.end_after(0)
            await emit([], 0, None, end, positions.take_undecodable())


class _Positions:
    """A chunk source's records for :func:`batches`, noting each chunk's position and size.

    The batches come out in order and hold every record once, so walking the noted chunks by
    each batch's length gives the position after the batch. Work per chunk, not per record.
    """

    def __init__(self, source: Source[Any], chunk: Any, count: int) -> None:
        self.source = source
        #: [position, records of that chunk not yet in a batch, its undecodable], oldest first.
        self.segments: deque[list[Any]] = deque()
        #: The undecodable records of the chunks completed by the latest batch.
        self.undecodable: list[tuple[int, bytes, str]] = []
        self.chunk = chunk
        self.count = count
        self.positioned = True

    def chunks(self) -> AsyncGenerator[list[Any], None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[list[Any], None]:
        iterator = self.source.chunks()
        try:
            async for chunk in iterator:
                if isinstance(chunk, Chunk):
                    records = chunk.records
                    self.segments.append([chunk.position, len(records), chunk.undecodable])
                else:
                    records = chunk  # a plain list: a source without positions
                    self.positioned = False
                yield records if type(records) is list else list(records)
        finally:
            await aclose_iterator(iterator)

    def end_after(self, n: int) -> Any:
        """The position after the next ``n`` records (None once a chunk had no position)."""
        if not self.positioned:
            return None
        segments = self.segments
        while n:
            segment = segments[0]
            take = min(n, segment[1])
            segment[1] -= take
            n -= take
            if segment[1]:
                self.count += take
            else:
                segments.popleft()
                self.chunk, self.count = segment[0], 0
                self.undecodable += segment[2]
        while segments and not segments[0][1]:  # empty chunks right after the batch
            segment = segments.popleft()
            self.chunk, self.count = segment[0], 0
            self.undecodable += segment[2]
        return {"chunk": self.chunk, "skip": self.count}

    def take_undecodable(self) -> list[tuple[int, bytes, str]]:
        """The undecodable records of the chunks completed so far, and forget them."""
        taken, self.undecodable = self.undecodable, []
        return taken


