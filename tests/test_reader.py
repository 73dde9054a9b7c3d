"""The pipeline's reading stage: batches of any source, and the position after each batch."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import microbatch as mb
from microbatch._core.lines import LineBlock
from microbatch.pipeline.reader import (
    Batch,
    Emitter,
    decoding,
    describe_source,
    read,
    read_line_blocks,
    read_records,
)
from microbatch.pipeline.resume import resume_source
from microbatch.sources import Chunk

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
    assert [b.ticket for b in out] == list(range(6))
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


# -- the reading stage's interface: any source, positions per kind ----------------------------------


class Log:
    """A user-defined source: records 0..n-1 in chunks of ``size``, position = offset after a chunk.

    ``yielded`` (shared by the sources ``resume`` makes) counts every record handed out, so a test
    can tell how much a resumed run read again.
    """

    def __init__(self, n: int, size: int, start: int = 0, yielded: list[int] | None = None) -> None:
        self.n, self.size, self.start = n, size, start
        self.yielded: list[int] = [] if yielded is None else yielded

    def describe(self) -> str:
        return f"log:{self.n}"

    async def chunks(self) -> AsyncIterator[Chunk[int]]:
        for lo in range(self.start, self.n, self.size):
            hi = min(lo + self.size, self.n)
            self.yielded.extend(range(lo, hi))
            yield Chunk(list(range(lo, hi)), {"offset": hi})

    def resume(self, position: Any) -> Log:
        return Log(self.n, self.size, position["offset"], self.yielded)


async def read_all(
    source: Any, max_size: int, position: Any = None, max_wait: float | None = None
) -> list[Batch]:
    send, recv = anyio.create_memory_object_stream[Batch](1000)
    async with send:
        await read(source, max_size, max_wait, Emitter(send, anyio.Semaphore(1000), 0), position=position)
    return [b async for b in recv]


def _done(end: dict[str, Any]) -> int:
    """Records of a Log that a batch end says are read."""
    return (0 if end["chunk"] is None else end["chunk"]["offset"]) + end["skip"]


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 9, 23, 40])
async def test_chunk_positions_count_complete_chunks_and_records_of_the_next(chunk_size: int) -> None:
    out = await read_all(Log(23, chunk_size), 4)
    assert [r for b in out for r in b.payload] == list(range(23))  # type: ignore[union-attr]
    assert all(1 <= b.count <= 4 for b in out)
    read_so_far = 0
    for b in out:
        read_so_far += b.count
        assert _done(b.end) == read_so_far
        # "chunk" is the last chunk whose records are all in this or earlier batches.
        complete = read_so_far // chunk_size * chunk_size if read_so_far < 23 else 23
        assert b.end["chunk"] == (None if complete == 0 else {"offset": complete})
        assert b.end["skip"] == read_so_far - complete


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 23])
async def test_a_resumed_chunk_source_rereads_at_most_the_chunk_in_progress(chunk_size: int) -> None:
    for b in await read_all(Log(23, chunk_size), 4):
        log = Log(23, chunk_size)
        resumed = resume_source(log, b.end)
        rest = await read_all(resumed, 4, position=b.end)
        done = _done(b.end)
        assert [r for x in rest for r in x.payload] == list(range(done, 23))  # type: ignore[union-attr]
        read_again = [r for r in log.yielded if r < done]
        assert len(read_again) < chunk_size
        if rest:  # positions go on counting from the checkpoint
            assert _done(rest[-1].end) == 23


async def test_empty_chunks_and_plain_list_chunks() -> None:
    class Gaps(Log):
        async def chunks(self) -> AsyncIterator[Chunk[int]]:
            yield Chunk([], {"offset": 0})
            yield Chunk([0, 1], {"offset": 2})
            yield Chunk([], {"offset": 2})
            yield Chunk([2], {"offset": 3})

    out = await read_all(Gaps(3, 1), 2)
    assert [(b.payload, b.end) for b in out] == [
        ([0, 1], {"chunk": {"offset": 2}, "skip": 0}),
        ([2], {"chunk": {"offset": 3}, "skip": 0}),
    ]

    class Lists(Log):
        async def chunks(self) -> AsyncIterator[Any]:
            yield [0, 1, 2]

    out = await read_all(Lists(3, 3), 2)
    assert [(b.payload, b.end) for b in out] == [([0, 1], None), ([2], None)]


async def test_a_partial_batch_of_a_silent_chunk_source_leaves_at_its_deadline() -> None:
    release = anyio.Event()

    class Silent(Log):
        async def chunks(self) -> AsyncIterator[Chunk[int]]:
            yield Chunk([0, 1, 2, 3, 4], {"offset": 5})
            await release.wait()
            yield Chunk([5], {"offset": 6})

    send, recv = anyio.create_memory_object_stream[Batch](10)
    async with anyio.create_task_group() as tg:
        emit = Emitter(send, anyio.Semaphore(10), 0)
        tg.start_soon(functools.partial(read, Silent(6, 5), 4, 0.01, emit, position=None))
        first, second = await recv.receive(), await recv.receive()
        assert (first.payload, first.end) == ([0, 1, 2, 3], {"chunk": None, "skip": 4})
        assert (second.payload, second.end) == ([4], {"chunk": {"offset": 5}, "skip": 0})
        release.set()
        third = await recv.receive()
        assert (third.payload, third.end) == ([5], {"chunk": {"offset": 6}, "skip": 0})


async def test_iterables_count_records_and_resume_by_skipping() -> None:
    out = await read_all(range(10), 4)
    assert [(b.start, b.end) for b in out] == [(0, 4), (4, 8), (8, 10)]
    resumed = resume_source(range(10), 8)
    out = await read_all(resumed, 4, position=8)
    assert [(b.payload, b.start, b.end) for b in out] == [([8, 9], 8, 10)]
    assert resume_source(range(3), None) == range(3)


async def test_line_sources_end_at_byte_offsets_and_resume_there(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\nbb\nccc\n")
    source = mb.read_lines(path, errors="replace")
    out = await read_all(source, 2)
    assert [(b.count, b.end) for b in out] == [(2, 5), (1, 9)]
    rest = await read_all(resume_source(source, 5), 2, position=5)
    assert [(b.payload.data, b.start, b.end) for b in rest] == [(b"ccc\n", 5, 9)]  # type: ignore[union-attr]
    assert decoding(source) == (str(path), "utf-8", "replace")
    assert decoding(range(3)) == ("<records>", None, "strict")


def test_describe_source_uses_describe_or_the_type_name(tmp_path: Path) -> None:
    assert describe_source(mb.read_lines(tmp_path / "x")) == f"file:{tmp_path / 'x'}"
    assert describe_source(mb.tcp_lines(0)) == "tcp"
    assert describe_source(Log(1, 1)) == "log:1"
    assert describe_source([1, 2]) == "iterable:list"


def test_a_position_of_another_kind_is_refused_with_the_position_named() -> None:
    with pytest.raises(ValueError, match="not a chunk source's position"):
        resume_source(Log(3, 1), 7)
    with pytest.raises(TypeError, match=r"position\['skip'\]"):
        resume_source(Log(3, 1), {"chunk": None, "skip": "2"})
    assert resume_source(mb.tcp_lines(0), None) is not None


async def test_batches_takes_the_records_of_a_sources_chunks() -> None:
    async with mb.batches(Log(7, 3), max_size=2) as stream:
        assert [b async for b in stream] == [[0, 1], [2, 3], [4, 5], [6]]


class Pages:
    """A user-defined source with pages of given sizes (some empty); a position is a page number."""

    def __init__(self, sizes: list[int], page: int = 0, yielded: list[int] | None = None) -> None:
        self.sizes, self.page = sizes, page
        self.yielded: list[int] = [] if yielded is None else yielded

    def describe(self) -> str:
        return "pages"

    async def chunks(self) -> AsyncIterator[Chunk[int]]:
        first = sum(self.sizes[: self.page])
        for page in range(self.page, len(self.sizes)):
            records = list(range(first, first + self.sizes[page]))
            first += self.sizes[page]
            self.yielded.extend(records)
            yield Chunk(records, {"page": page + 1})

    def resume(self, position: Any) -> Pages:
        return Pages(self.sizes, position["page"], self.yielded)


async def _check_pages(sizes: list[int], max_size: int) -> None:
    total = sum(sizes)
    out = await read_all(Pages(sizes), max_size)
    assert [r for b in out for r in b.payload] == list(range(total))  # type: ignore[union-attr]
    assert all(1 <= b.count <= max_size for b in out)
    done = 0
    for b in out:
        done += b.count
        source = Pages(sizes)
        rest = await read_all(resume_source(source, b.end), max_size, position=b.end)
        assert [r for x in rest for r in x.payload] == list(range(done, total))  # type: ignore[union-attr]
        again = [r for r in source.yielded if r < done]
        assert len(again) < max(sizes), "more than the chunk in progress was read again"


@given(sizes=st.lists(st.integers(0, 7), max_size=10), max_size=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_any_chunk_sizes_resume_exactly_from_every_batch_end(sizes: list[int], max_size: int) -> None:
    for backend in ("asyncio", "trio"):
        anyio.run(_check_pages, sizes, max_size, backend=backend)
