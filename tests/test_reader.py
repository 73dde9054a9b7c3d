"""The pipeline's reader: line blocks cut into batches of exactly max_size lines, positions exact."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from microbatch._core.lines import LineBlock
from microbatch.pipeline.reader import Batch, Emitter, read_line_blocks, read_records

pytestmark = pytest.mark.anyio


def block(lines: list[bytes], start: int) -> LineBlock:
    data = b"".join(line + b"\n" for line in lines)
    return LineBlock(data, len(lines), start, start + len(data))


class Blocks:
    """A stand-in for a LineSource: only its parts() view is read, one part a block.

    Each block's first line arrives split: its first byte as the carried ``head``, the rest in
    the read, as a reader sees a line that straddles two reads.
    """

    def __init__(self, *blocks: LineBlock) -> None:
        self._blocks = blocks

    async def parts(self) -> AsyncIterator[tuple[bytes, bytes, int, int]]:
        for b in self._blocks:
            yield b.data[:1], b.data[1:] + b"partial", len(b.data) - 1, b.start


async def collect(read: Any, *args: Any) -> list[Batch]:
    send, recv = anyio.create_memory_object_stream[Batch](1000)
    async with send:
        await read(*args, Emitter(send, anyio.Semaphore(1000), 0))
    return [b async for b in recv]


async def test_blocks_are_cut_into_exact_batches_across_block_edges() -> None:
    lines = [str(i).encode() for i in range(23)]
    first = block(lines[:10], 0)
    second = block(lines[10:], first.end)
    out = await collect(read_line_blocks, Blocks(first, second), 4, None)
    assert [b.count for b in out] == [4, 4, 4, 4, 4, 3]
    assert [b.seq for b in out] == list(range(6))
    assert b"".join(b.payload.data for b in out) == first.data + second.data  # type: ignore[union-attr]
    assert [b.start for b in out[1:]] == [b.end for b in out[:-1]]
    assert out[-1].end == second.end


async def test_a_truncated_followed_file_ends_the_old_lines_batch() -> None:
    # A pending partial batch of the old file, then the file starts again at byte 0.
    old = block([b"a", b"b", b"c"], 0)
    new = block([b"1", b"2", b"3", b"4", b"5", b"6"], 0)
    out = await collect(read_line_blocks, Blocks(old, new), 4, None)
    assert [(b.count, b.start, b.end) for b in out] == [(3, 0, 6), (4, 0, 8), (2, 8, 12)]


async def test_records_carry_counted_positions_or_none() -> None:
    out = await collect(read_records, range(10), 4, None, 100)
    assert [(b.payload, b.start, b.end) for b in out] == [
        ([0, 1, 2, 3], 100, 104),
        ([4, 5, 6, 7], 104, 108),
        ([8, 9], 108, 110),
    ]
    out = await collect(read_records, range(3), 4, None, None)
    assert [(b.start, b.end) for b in out] == [(None, None)]
