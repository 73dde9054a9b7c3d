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
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import ObjectSendStream

from .._batching import batches, wait_until
from .._core.checkpoint import PositionKind
from .._core.lines import LineBlock, cut_parts
from .._core.params import check_int
from .._core.policy import BatchPolicy
from .._core.splits import FileSplit, plan_splits
from ..sources.identity import TAIL_BYTES, FileStamp, fd_stamp
from ..sources.protocol import Chunk, FilePart, LineParts, Part, Source
from .resume import aclose_iterator, chunk_position

__all__ = [
    "Batch",
    "Begin",
    "Emitter",
    "Stamper",
    "SplittableLines",
    "decoding",
    "describe_source",
    "read",
    "read_line_blocks",
    "read_records",
    "read_splits",
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
    until a worker read it) and ``start``/``end`` are the split's planned range. ``identity``
    names the file ``end`` is an offset in (JSON data, see ``sources.identity``), as the reader
    saw it; None when not stamped.
    """

    ticket: int
    payload: LineBlock | list[Any] | FileSplit
    count: int
    start: int | None
    end: Any
    cut_at: float
    identity: Any = None


@dataclass(frozen=True, slots=True)
class Begin:
    """The reader starts reading at ``position`` (as a batch's ``end``), in the file ``identity``
    names (None when not a file): the start checkpoint of a fresh run names them."""

    position: Any
    identity: Any = None


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
        payload: LineBlock | list[Any] | FileSplit,
        count: int,
        start: int | None,
        end: Any,
        identity: Any = None,
    ) -> None:
        await self.window.acquire()
        batch = Batch(self.ticket, payload, count, start, end, anyio.current_time(), identity)
        self.ticket += 1
        await self.send.send(batch)

    async def block(self, block: LineBlock, identity: Any = None) -> None:
        await self(block, block.count, block.start, block.end, identity)

    async def begin(self, position: Any, identity: Any = None) -> None:
        """Reading starts at ``position`` (in the file ``identity`` names); said once, the first time."""
        events, self.events = self.events, None
        if events is not None:
            await events.send(Begin(position, identity))


class Stamper:
    """Which file a line source's parts come from, and the bytes read just before an offset:
    what :meth:`identity` needs to name the file a batch's end is in, without reading it again.

    Fed every part in order (:meth:`feed`); offsets asked for lie within the part fed last.
    """

    __slots__ = ("before", "data", "end", "head", "stamp", "start")

    def __init__(self) -> None:
        self.stamp: FileStamp | None = None
        self.before = b""  # the last bytes (up to TAIL_BYTES) before the part fed last
        self.head, self.data, self.end, self.start = b"", b"", 0, 0

    def continues(self, part: Part) -> bool:
        """Whether ``part`` goes on where the part fed last ended, in the same file."""
        stamp = part.file if isinstance(part, FilePart) else None
        return stamp is self.stamp and part[3] == self.start + len(self.head) + self.end

    def feed(self, part: Part) -> None:
        """Take the next part."""
        self.before = self._before(part[3]) if self.continues(part) else b""
        self.head, self.data, self.end, self.start = part
        self.stamp = part.file if isinstance(part, FilePart) else None

    def identity(self, offset: int) -> Any:
        """The JSON identity of the file read up to ``offset``; None when it is not a file."""
        if self.stamp is None:
            return None
        return self.stamp.identity(offset, self._before(offset)).to_json()

    def _before(self, offset: int) -> bytes:
        """Up to TAIL_BYTES read just before ``offset`` (within the part fed last, or at its end)."""
        k = offset - self.start
        head = self.head
        if k <= len(head):
            return (self.before + head[:k])[-TAIL_BYTES:]
        d = k - len(head)
        piece = self.data[max(0, d - TAIL_BYTES) : d]
        if len(piece) < TAIL_BYTES:
            piece = (self.before + head)[len(piece) - TAIL_BYTES :] + piece
        return piece


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



def describe_source(source: object) -> str:
    """The source's text for the pipeline's fingerprint: ``describe()``, else its type's name."""
    describe = getattr(source, "describe", None)
    if callable(describe):
        text = describe()
        if not isinstance(text, str):
            raise TypeError(f"{type(source).__qualname__}.describe() must return a str, got {text!r}")
        return text
    return f"iterable:{type(source).__qualname__}"


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


# -- reading ----------------------------------------------------------------------------------------


async def read(
    source: Any,
    max_size: int,
    max_wait: float | None,
    emit: Emitter,
    *,
    position: Any = None,
    split_size: int | None = None,
) -> None:
    """Batch ``source`` (as :func:`resume_source` returned it, after ``position``) into ``emit``.

    Every batch's ``end`` is the source position just after it: a byte offset for line parts, a
    chunk position for chunk sources (None when its chunks are plain lists), a record count for
    other iterables. With ``split_size``, a splittable line source is emitted as splits instead.
    """
    if isinstance(source, LineParts):
        if (
            split_size is not None
            and isinstance(source, SplittableLines)
            and await anyio.to_thread.run_sync(worth_splitting, source, split_size)
        ):
            await read_splits(source, split_size, max_size, emit)
        else:
            await read_line_blocks(source, max_size, max_wait, emit)
    elif isinstance(source, Source):
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
    stamper = Stamper()
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
                    await emit.block(pending, stamper.identity(pending.end))
                    pending = None
                continue
            part = received.pop()
            head, data, end, start = part
            if pending is not None and not stamper.continues(part):
                # A followed file was truncated or replaced: positions restart in the new file, so
                # the lines of the old one leave as a batch of their own.
                policy.take_partial()
                await emit.block(pending, stamper.identity(pending.end))
                pending = None
            stamper.feed(part)
            if emit.events is not None:
                await emit.begin(start, stamper.identity(start))
            count = data.count(b"\n", 0, end)
            if data[end - 1] != 10:
                count += 1  # the last line of the file, without a newline
            full = policy.add(count, anyio.current_time())
            blocks, pending = cut_parts(pending, head, data, end, start, max_size, count)
            assert len(blocks) == full, "the reader and its policy disagree on full batches"
            for block in blocks:
                await emit.block(block, stamper.identity(block.end))
    if policy.flush() and pending is not None:
        await emit.block(pending, stamper.identity(pending.end))


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


async def read_splits(source: SplittableLines, split_size: int, max_size: int, emit: Emitter) -> None:
    """Emit the file's byte-range splits (:func:`plan_splits`) from ``source.start`` to its size now.

    Reads one byte of the file (to check that ``start`` begins a line) and no more: workers read
    the splits. Lines appended after this point are not part of the run (a resumed run over the
    grown file reads them). A ``start`` past the end of the file, or not at a line's beginning,
    raises ``ValueError`` naming the file, as reading it would.
    """
    path, start = source.path, source.start
    size, identity = await anyio.to_thread.run_sync(_size_from, path, start)
    await emit.begin(start, identity)
    for lo, hi in plan_splits(start, size, split_size):
        await emit(FileSplit(path, lo, hi, max_size, source.max_line_length), 0, lo, hi)


def _size_from(path: str, start: int) -> tuple[int, Any]:
    """The file's size, after checking that ``start`` is within it and begins a line, and the JSON
    identity of the file read up to ``start``."""
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
        before = os.pread(f.fileno(), min(start, TAIL_BYTES), start - min(start, TAIL_BYTES))
        return size, fd_stamp(f.fileno()).identity(start, before).to_json()


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
            await emit(records, len(records), None, positions.end_after(len(records)))


class _Positions:
    """A chunk source's records for :func:`batches`, noting each chunk's position and size.

    The batches come out in order and hold every record once, so walking the noted chunks by
    each batch's length gives the position after the batch. Work per chunk, not per record.
    """

    def __init__(self, source: Source[Any], chunk: Any, count: int) -> None:
        self.source = source
        #: [position, records of that chunk not yet in a batch], oldest first.
        self.segments: deque[list[Any]] = deque()
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
                    self.segments.append([chunk.position, len(records)])
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
        while segments and not segments[0][1]:  # empty chunks right after the batch
            self.chunk, self.count = segments.popleft()[0], 0
        return {"chunk": self.chunk, "skip": self.count}


