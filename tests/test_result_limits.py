"""Results of worker processes: refused over ``max_result_bytes``, large ones unpickled as they are
read from the pipe (never gathered whole first), the pipe kept in step whatever happens."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import struct
import termios
from pathlib import Path
from typing import Any

import anyio
import pytest
from _procs import new_children

import microbatch as mb
from microbatch.executors.pipes import _Pipes
from microbatch.executors.remote import RESULT
from microbatch.executors.streaming import STREAM_AT, receive_streamed

pytestmark = pytest.mark.anyio

MB = 1 << 20


def blob(megabytes: int) -> bytes:
    return os.urandom(MB) * megabytes


def pid_of(_: object) -> int:
    return os.getpid()


def _refuse_here() -> None:
    raise ValueError("this object does not unpickle in the pipeline process")


class Unloadable:
    """Pickles in the worker; unpickling it raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_here, ())


def unloadable_first(megabytes: int) -> list[Any]:
    return [Unloadable(), blob(megabytes)]


def unloadable_last(megabytes: int) -> list[Any]:
    return [blob(megabytes), Unloadable()]


def large_results(kind: str) -> Any:
    data = blob(3)
    return {
        "bytes": data,
        "bytearray": bytearray(data),
        "str": data.hex(),
        "many": [data[i : i + 4096] for i in range(0, len(data), 4096)],
        "nested": {"a": (data, [data[:10]]), "b": memoryview(data[:STREAM_AT]).tobytes()},
    }[kind]


def numbers_to_blob(lines: list[str]) -> bytes:
    return blob(3) if "50" in lines else b"ok"


async def test_a_result_over_max_result_bytes_is_refused_and_the_worker_stays() -> None:
    async with mb.ProcessExecutor(1, max_result_bytes="2MB") as executor:
        [worker] = executor.pids
        with pytest.raises(mb.ResultTooLarge) as info:
            await executor.run(blob, 3)
        error = info.value
        assert (error.size > 3 * MB, error.limit) == (True, 2_000_000)
        assert "test_result_limits.blob returned a result of" in str(error)
        assert f"{error.size} bytes pickled, over max_result_bytes=2000000" in str(error)
        assert isinstance(error, mb.ExecutorError)
        assert await executor.run(pid_of, None) == worker
        assert len(await executor.run(blob, 1)) == MB  # up to the limit: sent
        assert (executor.crashes, executor.restarts) == (0, 0)


async def test_an_answer_over_the_limit_is_not_read_and_its_worker_is_killed() -> None:
    async with mb.ProcessExecutor(1) as executor:
        [worker] = executor.pids
        # The worker was told 64 MiB; a parent that allows less must not read what it sends.
        executor.max_result_bytes = 1000
        with pytest.raises(mb.ResultTooLarge, match=f"worker process {worker} sent an answer of"):
            await executor.run(blob, 1)
        assert worker not in executor.pids
        executor.max_result_bytes = 64 * MB
        assert await executor.run(pid_of, None) != worker


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "str", "many", "nested"])
async def test_large_results_arrive_whole(kind: str) -> None:
    async with mb.ProcessExecutor(2) as executor:
        async with anyio.create_task_group() as tg:
            got: list[Any] = []

            async def one() -> None:
                got.append(await executor.run(large_results, kind))

            for _ in range(4):  # two per worker: one runs, one waits in its pipe
                tg.start_soon(one)
        assert len(got) == 4
        for result in got:
            assert type(result) is type(large_results(kind))
            assert len(pickle.dumps(result)) >= STREAM_AT
        assert (executor.crashes, executor.restarts) == (0, 0)


@pytest.mark.parametrize("fn", [unloadable_first, unloadable_last])
async def test_a_large_result_that_does_not_unpickle_here_fails_its_call_only(fn: Any) -> None:
    async with mb.ProcessExecutor(1) as executor:
        [worker] = executor.pids
        with pytest.raises(mb.ExecutorError, match=r"cannot be unpickled here.*does not unpickle"):
            await executor.run(fn, 4)
        # the rest of the frame was read: the next answer is the next call's
        assert await executor.run(pid_of, None) == worker
        assert len(await executor.run(blob, 2)) == 2 * MB


async def test_a_pipeline_stops_with_batch_failed_naming_the_batch_and_the_size() -> None:
    executor = mb.ProcessExecutor(1, max_result_bytes="1MiB")
    pipeline = mb.Pipeline(
        numbers_to_blob, max_size=10, executor=executor, retries=0, on_error="raise"
    )
    lines = [str(i) for i in range(100)]
    with pytest.raises(mb.BatchFailed) as info:
        async with pipeline.map(lines) as results:
            async for _ in results:
                pass
    assert info.value.seq == 5  # lines 50..59
    assert isinstance(info.value.cause, mb.ResultTooLarge)
    assert f"{info.value.cause.size} bytes pickled, over max_result_bytes={MB}" in str(info.value)
    assert new_children(zombies=False) == []


class LoggedCalls:
    """fn for a pipeline: logs each call's records as a line of ``path`` (one append per call, in a
    worker process), returns them, and a 3 MB result for a batch holding ``big``."""

    def __init__(self, path: Path, big: str) -> None:
        self.path = path
        self.big = big

    def __call__(self, lines: list[str]) -> Any:
        with open(self.path, "a") as log:
            log.write(",".join(lines) + "\n")
        return blob(3) if self.big in lines else lines

    def calls(self) -> list[list[str]]:
        return [line.split(",") for line in self.path.read_text().splitlines()]


async def test_a_result_too_large_is_not_retried_the_run_stops_at_once(tmp_path: Path) -> None:
    fn = LoggedCalls(tmp_path / "calls.txt", big="25")
    executor = mb.ProcessExecutor(2, max_result_bytes="1MiB")
    pipeline = mb.Pipeline(fn, max_size=10, executor=executor, retries=3, on_error="raise")
    with pytest.raises(mb.BatchFailed) as info:
        async with pipeline.map([str(i) for i in range(100)]) as results:
            async for _ in results:
                pass
    error = info.value
    assert (error.seq, error.attempts) == (2, 1)
    assert isinstance(error.cause, mb.ResultTooLarge)
    assert str(error).startswith("batch 2 failed after 1 attempt(s): ResultTooLarge: ")
    assert f"{error.cause.size} bytes pickled, over max_result_bytes={MB}" in str(error)
    assert [call for call in fn.calls() if "25" in call] == [[str(i) for i in range(20, 30)]]
    assert new_children(zombies=False) == []


async def test_a_result_too_large_is_bisected_once_per_part_into_a_dead_letter(tmp_path: Path) -> None:
    fn = LoggedCalls(tmp_path / "calls.txt", big="5")
    dead = tmp_path / "dead.jsonl"
    executor = mb.ProcessExecutor(2, max_result_bytes="1MiB")
    pipeline = mb.Pipeline(fn, max_size=8, executor=executor, retries=3, backoff=0.0, dead_letter=dead)
    async with pipeline.map([str(i) for i in range(16)]) as results:
        got = [result async for result in results]
    # Records 0..7: [0,4) ok, [4,8) too large, [4,6) too large, [4,5) ok, [5,6) dead, [6,8) ok.
    assert got == [["0", "1", "2", "3"], ["4"], ["6", "7"], [str(i) for i in range(8, 16)]]
    with_big = [call for call in fn.calls() if "5" in call]
    assert with_big == [[str(i) for i in range(8)], ["4", "5", "6", "7"], ["4", "5"], ["5"]]
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (letter["record"], letter["batch"], letter["error"]) == ("5", 0, "ResultTooLarge")
    assert "over max_result_bytes=1048576" in letter["message"]


def test_max_result_bytes_is_checked() -> None:
    assert mb.ProcessExecutor(1).max_result_bytes == 64 * MB
    assert mb.ProcessExecutor(1, max_result_bytes="256MB").max_result_bytes == 256_000_000
    with pytest.raises(ValueError, match="max_result_bytes must be a number of bytes"):
        mb.ProcessExecutor(1, max_result_bytes="lots")
    with pytest.raises(ValueError, match="max_result_bytes must be at least"):
        mb.ProcessExecutor(1, max_result_bytes=0)


# --- reading a large frame from a real pipe, without a worker ---


def unread(fd: int) -> int:
    """Bytes waiting in a pipe."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


async def pipe_with(data: bytes) -> tuple[_Pipes, int]:
    """The parent's side of a pipe holding ``data``, and the descriptor that writes more."""
    read_fd, write_fd = os.pipe()
    other_r, other_w = os.pipe()  # _Pipes wants a write end too: an unused one
    os.close(other_r)
    pipes = _Pipes(read_fd, other_w)
    fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), MB)
    assert os.write(write_fd, data) == len(data)
    return pipes, write_fd


# Frames that fit a widened pipe (1 MiB): the writer never waits for the reader.
BODY = pickle.dumps(os.urandom(600_000), protocol=5)


async def test_a_frame_is_read_exactly_and_the_next_one_stays_in_the_pipe() -> None:
    body = BODY
    pipes, write_fd = await pipe_with(b"HEAD" + body + b"NEXT")
    try:
        # the start of the body is read with the header, as in a worker's answer
        assert await pipes.receive_exactly(4) == b"HEAD"
        outcome = await receive_streamed(pipes, RESULT, len(body), "fn")
        assert outcome == (RESULT, pickle.loads(body))
        assert await pipes.receive_exactly(4) == b"NEXT" and not pipes.lent
    finally:
        pipes.close()
        os.close(write_fd)


async def test_a_frame_cut_short_is_the_end_of_the_stream() -> None:
    body = BODY
    pipes, write_fd = await pipe_with(body[:300_000])
    os.close(write_fd)  # the worker died while sending
    try:
        with pytest.raises(anyio.EndOfStream):
            await receive_streamed(pipes, RESULT, len(body), "fn")
    finally:
        pipes.close()


async def test_a_cancelled_read_stops_its_thread_and_close_waits_for_it() -> None:
    body = BODY
    pipes, write_fd = await pipe_with(body[:300_000])
    read_fd = pipes.read_fd
    inode = os.fstat(read_fd).st_ino
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_streamed, pipes, RESULT, len(body), "fn")
                while unread(read_fd) or not pipes.lent:  # the thread took all there was: it waits
                    await anyio.sleep(0.01)
                pipes.close()  # the executor left meanwhile: the read end stays open for the thread
                assert os.fstat(read_fd).st_ino == inode
                tg.cancel_scope.cancel()
        assert not pipes.lent
        try:  # given back, then closed (the number may have been given to another file since)
            assert os.fstat(read_fd).st_ino != inode
        except OSError:
            pass
    finally:
        os.close(write_fd)
