"""read_lines(follow=True): tailing a growing, truncated and rotated file like ``tail -F``.

Each test appends to a real file, then waits until the expected record arrives; ``fail_after`` is
only a safety net, never what decides an outcome.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

import microbatch as mb

pytestmark = pytest.mark.anyio

POLL = 0.005
SAFETY = 10  # seconds; a generous net for a stuck test, not a timing assumption


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@asynccontextmanager
async def _follow(source: Any) -> AsyncIterator[MemoryObjectReceiveStream[Any]]:
    """Run ``async for record in source`` in a task; the records arrive on the yielded stream."""
    send, receive = anyio.create_memory_object_stream[Any](1000)

    async def pump() -> None:
        async with send:
            async for record in source:
                await send.send(record)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        with anyio.fail_after(SAFETY):
            yield receive
        tg.cancel_scope.cancel()


async def _take(receive: MemoryObjectReceiveStream[Any], n: int) -> list[Any]:
    return [await receive.receive() for _ in range(n)]


async def test_follow_delivers_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"old 1\nold 2\n")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await _take(records, 2) == ["old 1", "old 2"]
        for i in range(5):
            _append(path, f"new {i}\n".encode())
            assert await records.receive() == f"new {i}"
        _append(path, b"a\r\nb\n")
        assert await _take(records, 2) == ["a", "b"]


async def test_follow_holds_back_a_partial_line_until_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    # One write: once "first" arrives, "par" has been read too and is held back.
    path.write_bytes(b"first\npar")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await records.receive() == "first"
        _append(path, b"tial\nnext\n")
        assert await _take(records, 2) == ["partial", "next"]


async def test_follow_parts_have_exact_positions(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"a\nbb\n")
    source = mb.read_lines(path, follow=True, poll_interval=POLL)

    class Parts:
        def __aiter__(self) -> Any:
            return source.parts()

    async with _follow(Parts()) as received:
        head, data, end, start = await received.receive()
        assert (head + data[:end], start) == (b"a\nbb\n", 0)
        _append(path, b"ccc\n")
        head, data, end, start = await received.receive()
        assert (head + data[:end], start) == (b"ccc\n", 5)
    # Resuming at a block's end reads exactly what came after it.
    async with _follow(source.with_start(5)) as records:
        assert await records.receive() == "ccc"


async def test_follow_restarts_at_zero_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"line one\nline two\nhalf")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await _take(records, 2) == ["line one", "line two"]
        # Truncate and write less than was read: the size shrinks below the read position.
        with open(path, "wb") as f:
            f.write(b"x\n")
        # The held-back partial line of the truncated content is delivered, then the new content.
        assert await _take(records, 2) == ["half", "x"]
        _append(path, b"y\n")
        assert await records.receive() == "y"


async def test_copytruncate_reads_the_rest_from_the_copy_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    caplog.set_level(logging.WARNING, "microbatch.sources")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert (await _take(records, 100))[-1] == "line 99"
        # The copy holds 2 lines the reader never saw (written just before the copy), then the
        # file is truncated: those 2 lines (14 bytes) are read from the copy, then the file again.
        (tmp_path / "app.log.1").write_bytes(path.read_bytes() + b"late 1\nlate 2\n")
        with open(path, "r+b") as f:
            f.truncate(0)
        _append(path, b"new\n")
        assert await _take(records, 3) == ["late 1", "late 2", "new"]
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert f"{path}: truncated at byte 790 (copytruncate): reading the 14 bytes written after" in warning
    assert str(tmp_path / "app.log.1") in warning


async def test_copytruncate_drops_a_line_the_copy_tore_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy was made while the writer was inside a line: the copy ends in part of it, and the
    rest went to the file before the truncation took it away. That part is no record: dropped."""
    path = tmp_path / "app.log"
    path.write_bytes(b"line a\nline b\n")
    caplog.set_level(logging.WARNING, "microbatch.sources")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await _take(records, 2) == ["line a", "line b"]
        (tmp_path / "app.log.1").write_bytes(b"line a\nline b\nline c\nline d is t")
        with open(path, "r+b") as f:
            f.truncate(0)
        _append(path, b"new\n")
        assert await _take(records, 2) == ["line c", "new"]
    (torn,) = [r.getMessage() for r in caplog.records if "partial line" in r.getMessage()]
    assert str(tmp_path / "app.log.1") in torn and "11 bytes" in torn and "dropped" in torn


async def test_copytruncate_twice_while_the_reader_was_behind_reads_every_copy(tmp_path: Path) -> None:
    """Two copytruncate rotations (logrotate: shift ``app.log.N``, copy, truncate) while the reader
    was not looking: the rest of the first copy, the whole second copy, then the file itself."""
    path = tmp_path / "app.log"
    path.write_bytes(b"a1\na2\n")

    def copytruncate() -> None:
        for old in sorted(tmp_path.glob("app.log.*"), reverse=True):
            old.rename(tmp_path / f"app.log.{int(old.suffix[1:]) + 1}")
        shutil.copyfile(path, tmp_path / "app.log.1")
        os.truncate(path, 0)

    source = mb.read_lines(path, follow=True, poll_interval=POLL)
    got: list[str] = []
    async with aclosing(source.chunks()) as chunks:
        assert await chunks.__anext__() == ["a1", "a2"]
        _append(path, b"a3\n")
        copytruncate()  # app.log.1: a1 a2 a3
        _append(path, b"b1\nb2\n")
        copytruncate()  # app.log.2: a1 a2 a3, app.log.1: b1 b2
        _append(path, b"c1\n")
        with anyio.fail_after(SAFETY):
            while got[-1:] != ["c1"]:
                got.extend(await chunks.__anext__())
    assert got == ["a3", "b1", "b2", "c1"]


async def test_rotations_faster_than_the_reader_are_read_file_by_file(tmp_path: Path) -> None:
    """Two rotations while the reader was not looking: app.log.2 and app.log.1 are read in turn."""
    path = tmp_path / "app.log"
    path.write_bytes(b"a\n")
    source = mb.read_lines(path, follow=True, poll_interval=POLL)
    async with aclosing(source.chunks()) as chunks:
        assert await chunks.__anext__() == ["a"]
        # The reader waits for its next read: rotate twice meanwhile, like RotatingFileHandler.
        _append(path, b"b\n")
        os.rename(path, tmp_path / "app.log.1")
        path.write_bytes(b"c\n")
        os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
        os.rename(path, tmp_path / "app.log.1")
        path.write_bytes(b"d\n")
        with anyio.fail_after(SAFETY):
            got = [await chunks.__anext__() for _ in range(3)]
    assert got == [["b"], ["c"], ["d"]]


async def test_follow_finishes_the_old_file_then_reads_the_new_one_after_rotation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.log"
    rotated = tmp_path / "app.log.1"
    path.write_bytes(b"before\n")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await records.receive() == "before"
        os.rename(path, rotated)
        # The writer still holds the old file: these lines must not be lost.
        _append(rotated, b"late 1\nlate 2\npartial")
        path.write_bytes(b"fresh 1\n")
        assert await _take(records, 4) == ["late 1", "late 2", "partial", "fresh 1"]
        _append(path, b"fresh 2\n")
        assert await records.receive() == "fresh 2"


async def test_follow_keeps_reading_the_old_file_while_the_path_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"a\n")
    async with _follow(mb.read_lines(path, follow=True, poll_interval=POLL)) as records:
        assert await records.receive() == "a"
        moved = tmp_path / "moved.log"
        os.rename(path, moved)
        _append(moved, b"b\n")
        assert await records.receive() == "b"


async def test_follow_start_past_the_end_reads_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"short\n")
    source = mb.read_lines(path, follow=True, poll_interval=POLL, start=1000)
    async with _follow(source) as records:
        assert await records.receive() == "short"


async def test_follow_line_too_long_raises_after_earlier_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"ok\n")
    source = mb.read_lines(path, follow=True, poll_interval=POLL, max_line_length=8)
    got: list[str] = []
    with anyio.fail_after(SAFETY), pytest.raises(mb.LineTooLong) as info:
        async for line in source:
            got.append(line)
            if line == "ok":
                _append(path, b"fine\n" + b"z" * 9)
    assert got == ["ok", "fine"]
    assert info.value.offset == 8


async def test_cancelling_a_follow_stops_it_and_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"a\n")
    source = mb.read_lines(path, follow=True, poll_interval=POLL)
    got: list[str] = []
    with anyio.move_on_after(SAFETY) as scope:
        async for line in source:
            got.append(line)
            scope.cancel()
    assert got == ["a"]
    assert scope.cancelled_caught
