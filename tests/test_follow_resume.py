"""A followed file resumed from its position: the file it identified, wherever it is now.

Rotations come from a real ``logging.handlers.RotatingFileHandler`` (``doRollover()`` at chosen
moments), so every ordering is decided by the test, never by a sleep.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import microbatch as mb
from microbatch._exceptions import CheckpointMismatch
from microbatch.checkpoints.identity import FilePosition, file_position
from microbatch.checkpoints.prefix import Verify
from microbatch.pipeline import run as run_module

pytestmark = pytest.mark.anyio

POLL = 0.01
SAFETY = 20  # seconds; a net for a stuck test (a record lost: the follow waits forever), not a timing


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def _pipeline(**options: Any) -> mb.Pipeline[int, int]:
    settings: dict[str, Any] = dict(max_size=100, max_wait=0.05, executor="thread")
    settings.update(options)
    return mb.Pipeline(sum_ints, aggregate=mb.Sum(), **settings)


@contextmanager
def _handler(path: Path, name: str) -> Iterator[tuple[logging.Logger, logging.handlers.RotatingFileHandler]]:
    """A real RotatingFileHandler that never rotates by itself: the test calls ``doRollover()``."""
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=0, backupCount=1000)
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        handler.close()


def _log(logger: logging.Logger, start: int, stop: int) -> None:
    for i in range(start, stop):
        logger.info("%d", i)


async def _run_until(pipeline: mb.Pipeline[int, int], source: object, state: Path, records: int) -> int:
    """Follow until at least ``records`` records in all are folded, stop, return the value."""
    with anyio.fail_after(SAFETY):
        async with pipeline.updates(source, checkpoint=state) as updates:
            async for update in updates:
                if update.records >= records:
                    await updates.stop()
    return updates.value


async def _read(source: mb.sources.LineSource[str], count: int) -> list[int]:
    got: list[int] = []
    with anyio.fail_after(SAFETY):
        async for line in source:
            got.append(int(line))
            if len(got) == count:
                break
    return got


async def test_a_rotation_between_the_resume_check_and_the_open_reads_on_in_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follow-kill data loss: the resume found the checkpointed file at its path ("grown"),
    then the log rotated before the reader opened it. Opened by path again, the reader got the new
    file at the old offset: "start=... is not the beginning of a line" when no line of the new file
    ends there; when one does (here: 5-byte lines), a silent skip of the rest of the old file and
    of the new file's start; with a shorter new file, a silent restart at its byte 0."""
    log, state = tmp_path / "app.log", tmp_path / "state"
    with _handler(log, "resume-race") as (logger, handler):
        _log(logger, 0, 1000)
        source = mb.read_lines(log, follow=True, poll_interval=POLL)
        assert await _run_until(_pipeline(), source, state, 1000) == sum(range(1000))
        _log(logger, 1000, 1500)
        real = run_module.resume_source

        def resume_then_rotate(*args: Any) -> Any:
            resumed = real(*args)
            handler.doRollover()  # the moment of the race: after the check, before the open
            _log(logger, 1500, 3000)  # a longer new file: its byte at the old offset is no newline
            return resumed

        monkeypatch.setattr(run_module, "resume_source", resume_then_rotate)
        assert await _run_until(_pipeline(), source, state, 3000) == sum(range(3000))
        monkeypatch.setattr(run_module, "resume_source", real)
        handler.doRollover()  # and again, with a new file shorter than the old offset
        _log(logger, 3000, 3010)
        assert await _run_until(_pipeline(), source, state, 3010) == sum(range(3010))


async def test_a_position_taken_at_the_start_finds_every_file_rotated_since(tmp_path: Path) -> None:
    """Killed before its first regular checkpoint, a run resumes from the position it started at:
    that file is now ``app.log.5``; it and the four rotated after it are read, in order."""
    log = tmp_path / "app.log"
    with _handler(log, "start-position") as (logger, handler):
        _log(logger, 0, 10)
        source = mb.read_lines(log, follow=True, poll_interval=POLL)
        start = await anyio.to_thread.run_sync(source.position_at, 0, 0)
        assert start is not None and start.offset == 0
        for n in range(1, 6):
            _log(logger, max(10, n * 1000 - 1000), n * 1000)
            handler.doRollover()
        _log(logger, 5000, 5500)
    start = FilePosition.from_json(start.to_json())  # as a checkpoint holds it
    assert await _read(source.resume(start), 5500) == list(range(5500))


async def test_pending_files_of_a_position_are_read_in_the_order_it_names(tmp_path: Path) -> None:
    """Dated rotations whose times say nothing of their order: the position names the files the
    reader had reached, and the resume reads them in that order, each from byte 0."""
    log = tmp_path / "app.log"
    log.write_text("".join(f"{i}\n" for i in range(0, 100)))
    later = [tmp_path / "app.log-b", tmp_path / "app.log-a"]
    for n, path in enumerate(later, 1):
        path.write_text("".join(f"{i}\n" for i in range(n * 100, n * 100 + 100)))
        os.utime(path, (1_000_000 - n, 1_000_000 - n))  # the later file looks older
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    half = len("".join(f"{i}\n" for i in range(50)).encode())
    position = file_position(log, half)
    pending = tuple(file_position(p, 0).file for p in later)
    position = FilePosition(position.file, position.offset, position.tail_length, position.tail,
                            position.ranges, pending)
    os.rename(log, tmp_path / "app.log-c")  # the file itself rotated away too
    log.write_text("".join(f"{i}\n" for i in range(300, 310)))
    resumed = source.resume(FilePosition.from_json(position.to_json()))
    assert await _read(resumed, 260) == list(range(50, 310))


async def test_a_recreated_file_that_reuses_the_inode_is_read_from_its_start(tmp_path: Path) -> None:
    """Deleted and recreated with new content on the same inode (emulated: truncated in place and
    rewritten, which keeps the inode for certain): the resume reads the new file from byte 0."""
    log, state = tmp_path / "app.log", tmp_path / "state"
    log.write_text("".join(f"{i}\n" for i in range(1000)))
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    assert await _run_until(_pipeline(), source, state, 1000) == sum(range(1000))
    inode = log.stat().st_ino
    with open(log, "r+") as f:
        f.truncate(0)
        f.write("".join(f"{i}\n" for i in range(5000, 5100)))
    assert log.stat().st_ino == inode
    assert await _run_until(_pipeline(), source, state, 1100) == sum(range(1000)) + sum(range(5000, 5100))


async def test_a_followed_file_whose_inode_a_deleted_file_had_is_not_skipped(tmp_path: Path) -> None:
    """A rotated file read and deleted frees its inode; the next file may get it. Rotation must not
    take it for the file read before (the follow stalled for ever, silently)."""
    log = tmp_path / "app.log"
    log.write_text("0\n")
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    got: list[int] = []
    with anyio.fail_after(SAFETY):
        async with anyio.create_task_group():
            lines = source.__aiter__()
            got.append(int(await lines.__anext__()))
            # Rotate: the reader finishes app.log (now app.log.1), then reads the new app.log.
            os.rename(log, tmp_path / "app.log.1")
            log.write_text("1\n")
            got.append(int(await lines.__anext__()))
            # Recreate app.log in place of the one read, reusing its inode: truncate and rewrite
            # keeps the inode; the old content is gone as if deleted.
            old = tmp_path / "app.log.1"
            inode = old.stat().st_ino
            with open(old, "r+") as f:
                f.truncate(0)
            os.rename(log, tmp_path / "app.log.2")
            os.rename(old, log)  # app.log now has the inode of a file read before, empty
            assert log.stat().st_ino == inode
            with open(log, "a") as f:
                f.write("2\n3\n")
            got.extend([int(await lines.__anext__()), int(await lines.__anext__())])
            await lines.aclose()
    assert got == [0, 1, 2, 3]


@pytest.mark.parametrize("verify", ["full", "sampled"])
async def test_an_edit_before_the_checkpoint_stops_the_run_naming_the_range(
    tmp_path: Path, verify: Verify
) -> None:
    """Edited before the checkpointed offset, then appended: refused, naming the file and the bytes
    that differ; ``fresh`` starts over."""
    path, state = tmp_path / "numbers.txt", tmp_path / "state"
    path.write_text("".join(f"{i}\n" for i in range(20_000)))
    pipeline = _pipeline(max_size=1000)
    assert await pipeline.run(mb.read_lines(path, verify=verify), checkpoint=state) == sum(range(20_000))
    data = bytearray(path.read_bytes())
    data[:5] = b"9\n9\n9"  # "0\n1\n2" -> same length, other numbers, within the first sampled block
    path.write_bytes(bytes(data) + b"20000\n")
    with pytest.raises(CheckpointMismatch, match=rf"bytes 0-\d+ of {path} differ from those read before"):
        await pipeline.run(mb.read_lines(path, verify=verify), checkpoint=state)
    fresh = await pipeline.run(mb.read_lines(path), checkpoint=state, fresh=True)
    assert fresh == sum(range(20_001)) + 27 - 3


async def test_copytruncate_between_runs_reads_the_rest_from_the_copy(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    log.write_text("".join(f"{i}\n" for i in range(1000)))
    source = mb.read_lines(log, follow=True, poll_interval=POLL)
    assert await _run_until(_pipeline(), source, state, 1000) == sum(range(1000))
    with open(log, "a") as f:
        f.write("".join(f"{i}\n" for i in range(1000, 1500)))
    shutil.copyfile(log, tmp_path / "app.log.1")  # logrotate's copytruncate: copy, then truncate
    with open(log, "r+") as f:
        f.truncate(0)
    with open(log, "a") as f:
        f.write("".join(f"{i}\n" for i in range(1500, 1600)))
    assert await _run_until(_pipeline(), source, state, 1600) == sum(range(1600))


def _writer(log: Path) -> Callable[[int, int], None]:
    def write(start: int, stop: int) -> None:
        with open(log, "a") as f:
            f.write("".join(f"{i}\n" for i in range(start, stop)))

    return write


async def test_stop_when_idle_ends_with_a_checkpoint_and_the_next_run_continues(tmp_path: Path) -> None:
    log, state = tmp_path / "app.log", tmp_path / "state"
    write = _writer(log)
    write(0, 1000)
    log.write_bytes(log.read_bytes() + b"10")  # a partial last line: it waits for its newline
    source = mb.read_lines(log, follow=True, poll_interval=POLL, stop_when_idle=0.1)
    pipeline = _pipeline()
    with anyio.fail_after(SAFETY):
        assert await pipeline.run(source, checkpoint=state) == sum(range(1000))
        with open(log, "a") as f:
            f.write("00\n1001\n")  # completes "1000", then one more line
        assert await pipeline.run(source, checkpoint=state) == sum(range(1002))
        # Nothing new: the next run follows again, stops when idle, same value.
        assert await pipeline.run(source, checkpoint=state) == sum(range(1002))
    with pytest.raises(ValueError, match=r"stop_when_idle .* needs follow=True"):
        mb.read_lines(log, stop_when_idle=1.0)
