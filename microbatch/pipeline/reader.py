"""The pipeline's reader: a source in, numbered batches out, bounded by size, time and the window.

Line sources are read as raw bytes (:meth:`LineSource.parts`) and cut into batches of exactly
``max_size`` lines with :func:`cut_parts`, so the event loop never touches single lines;
workers split and decode them. Other sources go through :func:`microbatch.batches`. Either way the
size/time decisions are :class:`BatchPolicy`'s, and every batch carries the source position after
its last record (a byte offset, a record count, or None for sources that cannot resume), which is
what a checkpoint records.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectSendStream

from .._batching import batches
from .._core.checkpoint import PositionKind
from .._core.lines import LineBlock, cut_parts
from .._core.policy import BatchPolicy
from ..sources.files import LineSource, TcpLines

__all__ = ["Batch", "Emitter", "read_line_blocks", "read_records", "skip"]


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch on its way to a worker: its number, its records (or block of lines), positions."""

    seq: int
    payload: LineBlock | list[Any]
    count: int
    start: int | None
    end: Any
    cut_at: float


class Emitter:
    """Numbers batches and sends them, first waiting for the window (the reader's lead) to allow it."""

    def __init__(self, send: ObjectSendStream[Batch], window: anyio.Semaphore, seq: int) -> None:
        self.send = send
        self.window = window
        self.seq = seq

    async def __call__(self, payload: LineBlock | list[Any], count: int, start: int | None, end: Any) -> None:
        await self.window.acquire()
        batch = Batch(self.seq, payload, count, start, end, anyio.current_time())
        self.seq += 1
        await self.send.send(batch)

    async def block(self, block: LineBlock) -> None:
        await self(block, block.count, block.start, block.end)


async def read_line_blocks(
    source: LineSource[Any], max_size: int, max_wait: float | None, emit: Emitter
) -> None:
    """Cut a line source's raw bytes into batches of ``max_size`` lines, bounded by time.

    The source's reads arrive as parts (:meth:`LineSource.parts`) that are cut where they lie, so
    each byte is copied once, into the batch it belongs to. A separate task reads, so that a
    partial batch still leaves at its deadline while a followed file is silent.
    """
    policy = BatchPolicy(max_size, max_wait)
    part_send, part_recv = anyio.create_memory_object_stream[tuple[bytes, bytes, int, int]](1)

    async def pump() -> None:
        async with part_send:
            async for part in source.parts():
                await part_send.send(part)

    pending: LineBlock | None = None
    async with anyio.create_task_group() as tg, part_recv:
        tg.start_soon(pump)
        while True:
            part: tuple[bytes, bytes, int, int] | None = None
            if policy.deadline is None:
                try:
                    part = await part_recv.receive()
                except anyio.EndOfStream:
                    break
            else:
                with anyio.move_on_after(policy.deadline - anyio.current_time()):
                    try:
                        part = await part_recv.receive()
                    except anyio.EndOfStream:
                        break
                if part is None:
                    # The source was silent until the partial batch's deadline.
                    if pending is not None and policy.take_partial():
                        await emit.block(pending)
                        pending = None
                    continue
            head, data, end, start = part
            if pending is not None and pending.end != start:
                # A followed file was truncated or replaced: positions restart in the new file, so
                # the lines of the old one leave as a batch of their own.
                policy.take_partial()
                await emit.block(pending)
                pending = None
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


async def _skip_async(source: AsyncIterable[Any], n: int) -> AsyncIterator[Any]:
    seen = 0
    async for item in source:
        if seen < n:
            seen += 1
            continue
        yield item


def skip(source: AsyncIterable[Any] | Iterable[Any], n: int) -> AsyncIterable[Any] | Iterable[Any]:
    """The source without its first ``n`` records (resume of an iterable: valid if deterministic)."""
    if isinstance(source, AsyncIterable):
        return _skip_async(source, n)
    if isinstance(source, Iterable):
        return itertools.islice(source, n, None)
    raise TypeError(
        f"cannot resume a {type(source).__name__} source at record {n}: only files (read_lines), "
        f"iterables and async iterables can be resumed"
    )


def describe_source(source: object) -> str:
    """The source's part of a pipeline's fingerprint."""
    describe = getattr(source, "describe", None)
    if callable(describe):
        return str(describe())
    return f"iterable:{type(source).__qualname__}"


def decoding(source: object) -> tuple[str, str | None, str]:
    """``(where, encoding, errors)``: how workers decode the source's batches."""
    if isinstance(source, LineSource):
        return str(source.path), source.encoding, source.errors
    return "<records>", None, "strict"


def position_kind(source: object) -> PositionKind:
    """The kind of position checkpoints of this source hold."""
    if isinstance(source, LineSource):
        return "offset"
    if isinstance(source, TcpLines):
        return "none"
    return "count"


def resume_source(source: Any, position: Any) -> Any:
    """What to read after a checkpointed ``position``."""
    if position is None or position == 0 or isinstance(source, TcpLines):
        return source
    if isinstance(source, LineSource):
        return source.with_start(int(position))
    return skip(source, int(position))


async def read(source: Any, max_size: int, max_wait: float | None, emit: Emitter, *, position: Any) -> None:
    """Cut any source into batches and emit them; each batch's ``end`` is the position after it."""
    if isinstance(source, LineSource):
        await read_line_blocks(source, max_size, max_wait, emit)
    else:
        start = None if isinstance(source, TcpLines) else position or 0
        await read_records(source, max_size, max_wait, start, emit)
