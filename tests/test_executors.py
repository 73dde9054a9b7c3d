"""Executors with real worker processes and threads, on asyncio, uvloop and trio.

Orderings between the test and a worker go through files (a worker writes "started", waits for
"go"), never through sleeps; the only waits on time are deadlines that make a broken test fail.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psutil
import pytest
from _procs import alive, new_children
from trio.testing import MockClock

import microbatch as mb
from microbatch._core.task import BatchTask
from microbatch.executors import (
    Executor,
    InlineExecutor,
    ProcessExecutor,
    ThreadExecutor,
    check_picklable,
)

pytestmark = pytest.mark.anyio

DEADLINE = 10.0  # seconds a condition may take before the test fails


# ---- functions run in workers (module level: they travel by reference) ----------------------------


def double(x: int) -> int:
    return 2 * x


def fail(x: int) -> int:
    raise ValueError(f"bad record {x}")


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt by unpickling (its __init__ needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def fail_unpicklable(x: int) -> int:
    raise TwoArgError(x, x + 1)


def exit_abruptly(code: int) -> None:
    os._exit(code)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


def segfault(_: object) -> None:
    ctypes.string_at(0)


def wait_for_go(paths: tuple[str, str, int]) -> int:
    """Write our pid to ``started``, wait until ``go`` exists, return ``value``."""
    started, go, value = paths
    Path(started + ".tmp").write_text(str(os.getpid()))
    os.replace(started + ".tmp", started)
    while not os.path.exists(go):
        time.sleep(0.005)
    return value


def hang(started: str) -> None:
    Path(started + ".tmp").write_text(str(os.getpid()))
    os.replace(started + ".tmp", started)
    while True:
        time.sleep(0.05)


def noisy(n: int) -> int:
    for i in range(n):
        print(f"noise line {i} " + "x" * 80)
    sys.stdout.flush()
    os.write(1, b"raw write to fd 1\n")
    return n


def echo(x: object) -> object:
    return x


def crash_batch(records: list[int]) -> int:
    os._exit(3)


def worker_pid(_: object) -> int:
    return os.getpid()


class CountsUnpickling:
    """A callable that appends a line to a file each time it is unpickled."""

    def __init__(self, log: str) -> None:
        self.log = log

    def __call__(self, x: int) -> int:
        return x + 1

    def __getstate__(self) -> dict[str, str]:
        return {"log": self.log}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.log = state["log"]
        with open(self.log, "a") as f:
            f.write("unpickled\n")


# ---- helpers -----------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(DEADLINE):
        while not condition():
            await anyio.sleep(0.005)


def children() -> list[psutil.Process]:
    return new_children(zombies=False)


def all_children() -> list[psutil.Process]:
    """Every child, zombies included: an unreaped worker counts as left behind."""
    return new_children()


# ---- ProcessExecutor ---------------------------------------------------------------------------


async def test_many_concurrent_calls_give_correct_results() -> None:
    results: dict[int, int] = {}
    async with ProcessExecutor(2) as executor:
        assert executor.capacity == 2
        assert len(executor.pids) == 2  # started eagerly

        async def one(i: int) -> None:
            results[i] = await executor.run(double, i)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
    assert results == {i: 2 * i for i in range(200)}
    assert all_children() == []


async def test_large_arguments_and_results_round_trip() -> None:
    block = bytes(range(256)) * 8192  # 2 MiB, larger than any pipe buffer
    async with ProcessExecutor(1) as executor:
        assert await executor.run(echo, block) == block
        assert await executor.run(echo, [block, "text", 3]) == [block, "text", 3]


async def test_function_is_sent_once_per_worker(tmp_path: Path) -> None:
    log = tmp_path / "unpickled.log"
    fn = CountsUnpickling(str(log))
    async with ProcessExecutor(1) as executor:
        for i in range(20):
            assert await executor.run(fn, i) == i + 1
    assert log.read_text().splitlines() == ["unpickled"]


async def test_exception_is_reraised_with_remote_traceback() -> None:
    async with ProcessExecutor(1) as executor:
        with pytest.raises(ValueError, match="bad record 7") as info:
            await executor.run(fail, 7)
        cause = info.value.__cause__
        assert isinstance(cause, mb.RemoteTraceback)
        assert "in fail" in cause.tb and "ValueError: bad record 7" in cause.tb
        # the worker survived: same process answers the next call
        pid = executor.pids[0]
        assert await executor.run(worker_pid, None) == pid
        assert executor.crashes == executor.restarts == 0


async def test_exception_that_cannot_be_unpickled_becomes_remote_error() -> None:
    async with ProcessExecutor(1) as executor:
        with pytest.raises(mb.RemoteError) as info:
            await executor.run(fail_unpicklable, 4)
        assert info.value.type_name.endswith("TwoArgError")
        assert info.value.message == "4/5"
        assert isinstance(info.value.__cause__, mb.RemoteTraceback)
        assert "TwoArgError: 4/5" in info.value.__cause__.tb
        assert await executor.run(double, 1) == 2


async def test_unpicklable_function_fails_before_running() -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(mb.UnpicklableFunction, match=r"uses_lock.*lock"):
        check_picklable(uses_lock)
    async with ProcessExecutor(1) as executor:
        pid = executor.pids[0]
        with pytest.raises(mb.UnpicklableFunction, match="uses_lock"):
            await executor.run(uses_lock, 1)
        assert executor.pids == [pid]  # nothing reached the worker, which is untouched
        assert await executor.run(worker_pid, None) == pid


async def test_main_module_functions_and_closures_travel_by_value() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def triple(x):\n    return 3 * x\n", namespace)
    triple = namespace["triple"]
    assert triple.__module__ == "__main__"
    offset = 10
    async with ProcessExecutor(1) as executor:
        assert await executor.run(triple, 5) == 15
        assert await executor.run(lambda x: x + offset, 5) == 15


@pytest.mark.parametrize(
    ("fn", "arg", "expected"),
    [
        (exit_abruptly, 3, "exit code 3"),
        (kill_self, signal.SIGKILL, "SIGKILL"),
        (segfault, None, "SIGSEGV"),
    ],
    ids=["os._exit", "sigkill", "segfault"],
)
async def test_crash_fails_only_its_call(
    tmp_path: Path, fn: Callable[[Any], Any], arg: Any, expected: str
) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    async with ProcessExecutor(2) as executor:
        survivor: list[int] = []

        async def long_call() -> None:
            survivor.append(await executor.run(wait_for_go, (str(started), str(go), 42)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call)
            await until(started.exists, "the long call started")
            with pytest.raises(mb.WorkerCrashed, match=expected) as info:
                await executor.run(fn, arg)
            assert str(os.getpid()) not in str(info.value)
            go.touch()
        assert survivor == [42]
        assert executor.crashes == 1
        # the dead worker is replaced when two calls need workers at once again
        assert await executor.run(double, 1) == 2
        assert executor.restarts == 0  # a live worker was idle
        started2, go2 = tmp_path / "started2", tmp_path / "go2"
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.run, wait_for_go, (str(started2), str(go2), 0))
            await until(started2.exists, "the first call started")
            assert await executor.run(double, 2) == 4
            go2.touch()
        assert executor.restarts == 1
        assert len(executor.pids) == 2


async def test_timeout_kills_the_worker_and_raises_batch_timeout(tmp_path: Path) -> None:
    started = tmp_path / "started"
    async with ProcessExecutor(1) as executor:
        # The worker imports this module on its first call: not part of the time limit tested here.
        assert await executor.run(double, 1) == 2
        with pytest.raises(mb.BatchTimeout, match=r"timeout=0\.5") as info:
            await executor.run(hang, str(started), timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        hung_pid = int(started.read_text())
        assert not alive(hung_pid)
        assert executor.timeouts == 1
        assert await executor.run(double, 21, timeout=30) == 42
        assert executor.restarts == 1
        assert executor.pids != [hung_pid]


async def test_cancelling_a_call_kills_its_worker_only(tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    other_started = tmp_path / "other"
    async with ProcessExecutor(2) as executor:
        other: list[int] = []

        async def other_call() -> None:
            other.append(await executor.run(wait_for_go, (str(other_started), str(go), 7)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_call)
            await until(other_started.exists, "the other call started")
            with anyio.CancelScope() as scope:

                async def cancel_when_started() -> None:
                    await until(started.exists, "the hanging call started")
                    scope.cancel()

                tg.start_soon(cancel_when_started)
                await executor.run(hang, str(started))
            assert scope.cancelled_caught
            assert not alive(int(started.read_text()))
            assert alive(int(other_started.read_text()))
            go.touch()
        assert other == [7]
        assert await executor.run(double, 2) == 4


async def test_messages_name_the_users_function_not_its_wrapper() -> None:
    task = BatchTask(crash_batch)
    assert repr(task) == f"BatchTask({__name__}.crash_batch)"
    async with ProcessExecutor(1) as executor:
        with pytest.raises(mb.WorkerCrashed) as info:
            await executor.run(task, [1])
    assert f"while running {__name__}.crash_batch (exit code 3)" in str(info.value)
    assert "object at 0x" not in str(info.value)
    release = threading.Event()
    with pytest.raises(mb.BatchTimeout) as timed_out:
        await ThreadExecutor(1).run(BatchTask(lambda _: release.wait(DEADLINE)), [1], timeout=0.01)
    release.set()
    assert "<lambda> ran longer than timeout=0.01 s" in str(timed_out.value)
    assert "object at 0x" not in str(timed_out.value)


async def retried(attempt: Callable[[], Awaitable[object]], times: int) -> BaseException:
    """Each attempt made while handling the previous failure, as a pipeline's retries are."""
    try:
        await attempt()
    except mb.ExecutorError as exc:
        return exc if times == 1 else await retried(attempt, times - 1)
    raise AssertionError("the attempt did not fail")


async def test_crashes_and_timeouts_carry_the_workers_side_not_the_parents_tracebacks(
    tmp_path: Path,
) -> None:
    async with ProcessExecutor(1) as executor:
        assert await executor.run(double, 1) == 2  # this module imported before the time limits
        crash = await retried(lambda: executor.run(kill_self, signal.SIGKILL), 3)
        timeout = await retried(lambda: executor.run(hang, str(tmp_path / "started"), timeout=0.5), 3)
    assert isinstance(crash, mb.WorkerCrashed) and "killed by SIGKILL (exit code -9)" in str(crash)
    assert isinstance(timeout, mb.BatchTimeout) and "timeout=0.5 s in worker process" in str(timeout)
    for error in (crash, timeout):
        # One traceback: neither the pipe error behind it nor the failures it was retried after.
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        assert text.count("Traceback (most recent call last)") == 1, text
        assert error.__cause__ is None and len(text) < 4000


# ---- calls queued in a worker behind the running one (prefetch) ---------------------------------


def queued_calls(executor: ProcessExecutor) -> int:
    """Calls sent to the executor's only worker and not answered yet."""
    (slot,) = executor._pool
    assert slot.worker is not None
    return len(slot.worker.queue)


@pytest.mark.parametrize("failure", ["crash", "timeout"])
async def test_a_call_queued_behind_a_failing_one_is_sent_again(tmp_path: Path, failure: str) -> None:
    started = tmp_path / "started"
    async with ProcessExecutor(1, prefetch=1) as executor:
        first_pid = executor.pids[0]
        queued: list[int] = []
        async with anyio.create_task_group() as tg:

            async def queued_call() -> None:
                await until(started.exists, "the first call started")
                queued.append(await executor.run(worker_pid, None, timeout=30))

            tg.start_soon(queued_call)
            if failure == "crash":

                async def kill_when_queued() -> None:
                    await until(lambda: queued_calls(executor) == 2, "the second call was queued")
                    os.kill(first_pid, signal.SIGKILL)

                tg.start_soon(kill_when_queued)
                with pytest.raises(mb.WorkerCrashed):
                    await executor.run(hang, str(started))
            else:
                with pytest.raises(mb.BatchTimeout):
                    await executor.run(hang, str(started), timeout=1.0)
        # the queued call ran in the new worker, and is neither a crash nor a timeout of its own
        assert queued == executor.pids != [first_pid]
        assert (executor.crashes, executor.timeouts) == ((1, 0) if failure == "crash" else (0, 1))
        assert executor.restarts == 1


class _JumpLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock a test can move forward, as trio's ``MockClock.jump``."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_queued_calls_timeout_counts_from_its_own_start(tmp_path: Path, backend: str) -> None:
    """Explicit time: the clock jumps a minute while a call waits behind another in its worker."""
    started, go, hung = tmp_path / "started", tmp_path / "go", tmp_path / "hung"
    clock = MockClock(rate=1.0)  # real time, plus the jumps

    def jump(seconds: float) -> None:
        if backend == "trio":
            clock.jump(seconds)
        else:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, _JumpLoop)
            loop.offset += seconds

    async def settle() -> None:
        # Timers that the jump made due fire within a few turns of the event loop.
        for _ in range(5):
            await anyio.lowlevel.checkpoint()

    async def main() -> None:
        async with ProcessExecutor(1, prefetch=1) as executor:
            results: list[int] = []
            async with anyio.create_task_group() as tg:

                async def first() -> None:
                    results.append(await executor.run(wait_for_go, (str(started), str(go), 1)))

                async def queued() -> None:
                    results.append(await executor.run(double, 21, timeout=30.0))

                tg.start_soon(first)
                await until(started.exists, "the first call started")
                tg.start_soon(queued)
                await until(lambda: queued_calls(executor) == 2, "the second call was queued")
                jump(60.0)  # twice the queued call's timeout, spent waiting for its turn
                await settle()
                go.touch()
            assert results == [1, 42]
            assert executor.timeouts == 0 and executor.restarts == 0
            # The same jump does time out a call that is running.
            async with anyio.create_task_group() as tg:

                async def jump_when_started() -> None:
                    await until(hung.exists, "the hanging call started")
                    jump(60.0)

                tg.start_soon(jump_when_started)
                with pytest.raises(mb.BatchTimeout):
                    await executor.run(hang, str(hung), timeout=30.0)
            assert executor.timeouts == 1

    if backend == "trio":
        anyio.run(main, backend="trio", backend_options={"clock": clock})
    else:
        anyio.run(main, backend="asyncio", backend_options={"loop_factory": _JumpLoop})


SLOW_IMPORT_MODULE = """
import os, time
here = {here!r}
if os.path.exists(os.path.join(here, "block")):  # in a worker, not in the test's process
    open(os.path.join(here, "importing"), "w").close()
    while not os.path.exists(os.path.join(here, "go")):
        time.sleep(0.005)

def triple(x):
    return 3 * x
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_loading_fn_in_a_fresh_worker_is_not_part_of_its_time_limit(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explicit time: the clock jumps a minute while the worker imports fn's module."""
    import importlib

    name = f"slow_import_{backend}"
    (tmp_path / f"{name}.py").write_text(SLOW_IMPORT_MODULE.format(here=str(tmp_path)))
    monkeypatch.syspath_prepend(str(tmp_path))  # workers get the parent's sys.path
    triple = importlib.import_module(name).triple  # by reference: the worker imports the module
    (tmp_path / "block").touch()
    clock = MockClock(rate=1.0)

    def jump(seconds: float) -> None:
        if backend == "trio":
            clock.jump(seconds)
        else:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, _JumpLoop)
            loop.offset += seconds

    async def main() -> None:
        async with ProcessExecutor(1, start_timeout=1000.0) as executor:
            async with anyio.create_task_group() as tg:

                async def jump_while_importing() -> None:
                    await until((tmp_path / "importing").exists, "the worker imports fn's module")
                    jump(60.0)  # twice the call's timeout, spent importing
                    for _ in range(5):
                        await anyio.lowlevel.checkpoint()
                    (tmp_path / "go").touch()

                tg.start_soon(jump_while_importing)
                assert await executor.run(triple, 14, timeout=30.0) == 42
            assert executor.timeouts == 0 and executor.restarts == 0

    try:
        if backend == "trio":
            anyio.run(main, backend="trio", backend_options={"clock": clock})
        else:
            anyio.run(main, backend="asyncio", backend_options={"loop_factory": _JumpLoop})
    finally:
        sys.modules.pop(name, None)


async def test_cancelling_a_queued_call_leaves_the_running_one(tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    async with ProcessExecutor(1, prefetch=1) as executor:
        first_pid = executor.pids[0]
        results: list[int] = []
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                results.append(await executor.run(wait_for_go, (str(started), str(go), 7)))

            tg.start_soon(first)
            await until(started.exists, "the first call started")
            with anyio.CancelScope() as scope:

                async def cancel_when_queued() -> None:
                    await until(lambda: queued_calls(executor) == 2, "the second call was queued")
                    scope.cancel()

                tg.start_soon(cancel_when_queued)
                await executor.run(hang, str(tmp_path / "never"))
            assert scope.cancelled_caught
            assert alive(first_pid)
            go.touch()
        assert results == [7]
        # the worker would now run the cancelled call: it was replaced instead
        assert not alive(first_pid)
        assert await executor.run(double, 2) == 4
        assert executor.restarts == 1 and executor.crashes == 0
    assert all_children() == []


async def test_each_worker_holds_one_more_call_than_it_runs(tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    async with ProcessExecutor(1, prefetch=1) as executor:
        order: list[int] = []
        async with anyio.create_task_group() as tg:

            async def call(value: int) -> None:
                order.append(await executor.run(echo, value))

            tg.start_soon(executor.run, wait_for_go, (str(started), str(go), 0))
            await until(started.exists, "the first call started")
            for value in range(3):
                tg.start_soon(call, value)
            await until(lambda: queued_calls(executor) == 2, "one call was queued")
            for _ in range(10):  # the limit holds the other two back, however long the wait
                await anyio.lowlevel.checkpoint()
            assert queued_calls(executor) == 2
            go.touch()
        assert sorted(order) == [0, 1, 2]


async def test_worker_pipes_deliver_frames_split_or_joined_in_any_way() -> None:
    """The parent's pipe reader: frames that arrive together, in pieces, or bigger than the pipe."""
    from microbatch.executors.pipes import _Pipes

    read_fd, write_to_reader = os.pipe()
    read_from_writer, write_fd = os.pipe()
    pipes = _Pipes(read_fd, write_fd)
    big = os.urandom(3 << 20)  # three times what a widened pipe holds
    try:
        os.write(write_to_reader, b"abcdefgh")  # two small frames in one write
        assert await pipes.receive_exactly(3) == b"abc"
        assert await pipes.receive_exactly(5) == b"defgh"

        def write_in_pieces() -> None:  # blocking writes, in a thread
            for start in range(0, len(big), 100_000):
                os.write(write_to_reader, big[start : start + 100_000])

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, write_in_pieces)
            got = await pipes.receive_exactly(len(big))
        assert len(got) == len(big) and got == big

        # Writing more than the pipe holds waits for the reader instead of failing.
        def drain() -> bytes:
            received = bytearray()
            while len(received) < len(big) + 4:
                received.extend(os.read(read_from_writer, 1 << 20))
            return bytes(received)

        results: list[bytes] = []

        async def drain_in_thread() -> None:
            results.append(await anyio.to_thread.run_sync(drain))

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_in_thread)
            await pipes.send([b"head", big])
        assert len(results[0]) == len(big) + 4 and results[0] == b"head" + big

        os.close(write_to_reader)
        write_to_reader = -1
        with pytest.raises(anyio.EndOfStream):
            await pipes.receive_exactly(1)
    finally:
        pipes.close()
        for fd in (write_to_reader, read_from_writer):
            if fd != -1:
                os.close(fd)
    with pytest.raises(anyio.ClosedResourceError):
        await pipes.receive_exactly(1)


async def test_no_process_left_after_normal_end() -> None:
    async with ProcessExecutor(2) as executor:
        pids = executor.pids
        server = executor._servers.server  # the workers' fork server
        assert server is not None and server.pid not in pids
        assert {p.pid for p in children()} == {*pids, server.pid}
        assert {p.ppid() for p in children() if p.pid in pids} == {server.pid}
        await executor.run(double, 1)
    assert all_children() == []
    assert not any(alive(pid) for pid in [*pids, server.pid])


async def test_no_process_left_after_an_error_with_a_hung_worker(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom")):
        async with ProcessExecutor(2) as executor, anyio.create_task_group() as tg:
            tg.start_soon(executor.run, hang, str(started))
            await until(started.exists, "the hanging call started")
            raise RuntimeError("boom")
    assert all_children() == []


async def test_no_process_left_after_cancellation_with_a_hung_worker(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with anyio.CancelScope() as scope:
        async with ProcessExecutor(2) as executor:
            async with anyio.create_task_group() as tg:
                tg.start_soon(executor.run, hang, str(started))
                await until(started.exists, "the hanging call started")
                scope.cancel()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert all_children() == []


async def test_no_process_left_when_cancelled_while_starting() -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with ProcessExecutor(2):
            pytest.fail("entered a cancelled scope")  # pragma: no cover
    assert all_children() == []


async def test_closing_with_a_call_in_flight_fails_that_call(tmp_path: Path) -> None:
    started = tmp_path / "started"
    errors: list[BaseException] = []
    executor = ProcessExecutor(1)
    await executor.__aenter__()

    async def call() -> None:
        try:
            await executor.run(hang, str(started))
        except mb.WorkerCrashed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await until(started.exists, "the hanging call started")
        await executor.__aexit__(None, None, None)
    assert len(errors) == 1 and "executor was closed" in str(errors[0])
    assert executor.crashes == 0
    assert all_children() == []


async def test_more_functions_than_the_worker_cache_holds() -> None:
    functions = [lambda x, i=i: x + i for i in range(40)]  # more than the 32 a worker keeps
    async with ProcessExecutor(1) as executor:
        for _ in range(2):
            assert [await executor.run(fn, 100) for fn in functions] == [100 + i for i in range(40)]
        assert await executor.run(functions[0], 1) == 1


async def test_print_in_worker_does_not_break_the_protocol(capfd: pytest.CaptureFixture[str]) -> None:
    async with ProcessExecutor(1) as executor:
        assert await executor.run(noisy, 500) == 500  # ~45 KB of output
        assert await executor.run(double, 4) == 8
    err = capfd.readouterr().err
    assert "noise line 499" in err
    assert "raw write to fd 1" in err


async def test_run_outside_async_with_is_an_error() -> None:
    executor = ProcessExecutor(1)
    with pytest.raises(RuntimeError, match="async with ProcessExecutor"):
        await executor.run(double, 1)
    async with executor:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await executor.run(double, 1)
    async with executor:
        with pytest.raises(RuntimeError, match="already running"):
            async with executor:
                pass  # pragma: no cover


async def test_an_executor_can_be_entered_again_after_it_was_left() -> None:
    executor = ProcessExecutor(1)
    async with executor:
        first = executor.pids
        assert await executor.run(double, 2) == 4
    async with executor:
        assert await executor.run(double, 3) == 6
        assert executor.pids != first
    assert new_children() == []


@pytest.mark.skipif(not hasattr(os, "nice"), reason="Unix scheduling priority")
async def test_workers_run_at_a_lower_priority_than_their_parent() -> None:
    parent = psutil.Process().nice()
    async with ProcessExecutor(1) as executor:
        [pid] = executor.pids
        assert psutil.Process(pid).nice() == min(parent + 10, 19)
    async with ProcessExecutor(1, nice=0) as executor:
        [pid] = executor.pids
        assert psutil.Process(pid).nice() == parent


def test_invalid_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="nice"):
        ProcessExecutor(1, nice=20)
    with pytest.raises(ValueError, match="workers"):
        ProcessExecutor(0)
    with pytest.raises(ValueError, match="start_timeout"):
        ProcessExecutor(1, start_timeout=0)
    with pytest.raises(ValueError, match="prefetch"):
        ProcessExecutor(1, prefetch=-1)
    with pytest.raises(ValueError, match="workers"):
        ThreadExecutor(0)


async def test_invalid_timeout_names_the_parameter() -> None:
    for executor in (InlineExecutor(), ThreadExecutor(1)):
        with pytest.raises(ValueError, match="timeout"):
            await executor.run(double, 1, timeout=0)


def test_default_workers_is_cpu_count() -> None:
    assert ProcessExecutor().capacity == (os.cpu_count() or 1)


def test_all_executors_follow_the_protocol() -> None:
    for executor in (ProcessExecutor(1), ThreadExecutor(), InlineExecutor()):
        assert isinstance(executor, Executor)


# ---- workers killed while starting, signals meant for the process group ------------------------

# Starts the real worker, except for the first KILLS starts: those announce their pid and wait,
# still starting, for the test to kill them.
STARTUP_WRAPPER = """
import os, runpy, sys, time
here, real, kills = {here!r}, {real!r}, {kills}
for i in range(kills):
    try:
        os.close(os.open(os.path.join(here, f"claim-{{i}}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        continue
    with open(os.path.join(here, f"pid-{{i}}.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(here, f"pid-{{i}}.tmp"), os.path.join(here, f"pid-{{i}}"))
    while True:
        time.sleep(1)
runpy.run_path(real, run_name="__main__")
"""


async def test_workers_killed_while_starting_are_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microbatch.executors import process

    kills = 20
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(STARTUP_WRAPPER.format(here=str(tmp_path), real=process._WORKER_SCRIPT, kills=kills))
    monkeypatch.setattr(process, "_WORKER_SCRIPT", str(wrapper))

    async def kill_each_start() -> None:
        for i in range(kills):  # SIGKILL, and SIGTERM as a signal to the process group would
            pid_file = tmp_path / f"pid-{i}"
            await until(pid_file.exists, f"start {i}")
            os.kill(int(pid_file.read_text()), signal.SIGKILL if i % 2 else signal.SIGTERM)

    results: dict[int, int] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_each_start)
        async with ProcessExecutor(2, prefetch=0) as executor:

            async def one(i: int) -> None:
                results[i] = await executor.run(double, i)

            async with anyio.create_task_group() as calls:
                for i in range(50):
                    calls.start_soon(one, i)
            assert executor.crashes == 0 and len(executor.pids) == 2
    assert results == {i: 2 * i for i in range(50)}
    assert len(list(tmp_path.glob("claim-*"))) == kills
    assert all_children() == []


def test_a_worker_that_exits_while_starting_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from microbatch.executors import process

    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text("import sys\nopen(sys.argv[0] + '.started', 'a').write('x')\nsys.exit(4)\n")
    monkeypatch.setattr(process, "_WORKER_SCRIPT", str(wrapper))

    async def main() -> None:
        with pytest.raises(mb.ExecutorUnavailable, match=r"died while starting \(exit code 4\)"):
            async with ProcessExecutor(1):
                pass  # pragma: no cover

    anyio.run(main)
    assert Path(str(wrapper) + ".started").read_text() == "x"  # one attempt, no more


GROUP_SIGNAL_PARENT = textwrap.dedent(
    """
    import json, os, signal, sys
    import anyio
    from microbatch import ProcessExecutor

    # Default dispositions, whatever the test runner inherited (a background shell ignores SIGINT).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def pid(_):
        return os.getpid()

    async def main():
        async with ProcessExecutor(2) as executor:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                print(*executor.pids, flush=True)
                received = []
                async for signum in signals:
                    received.append(signum)
                    if len(received) == 2:
                        break
            used = {await executor.run(pid, None) for _ in range(6)}
            print(json.dumps([sorted(used), executor.crashes, executor.restarts]), flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_workers_leave_group_signals_to_the_parent_and_die_with_it(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(GROUP_SIGNAL_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), backend], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2
        os.killpg(parent.pid, signal.SIGTERM)  # the whole group: the parent and its workers
        os.killpg(parent.pid, signal.SIGINT)
        used, crashes, restarts = json.loads(parent.stdout.readline())
        # the same workers answered after the signals; none died or was replaced
        assert set(used) <= set(pids) and (crashes, restarts) == (0, 0)
        assert all(alive(pid) for pid in pids)
        parent.kill()
        parent.wait(timeout=DEADLINE)
        deadline = time.monotonic() + 2.0
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        parent.kill()
        parent.wait()


async def test_a_call_sent_to_a_worker_that_died_idle_goes_to_a_new_worker() -> None:
    async with ProcessExecutor(1) as executor:
        [pid] = executor.pids
        os.kill(pid, signal.SIGKILL)
        (slot,) = executor._pool
        worker = slot.worker
        assert worker is not None
        # Once the event loop has seen the exit (uvloop holds the pipes until then).
        await until(lambda: worker.process.returncode is not None, "the exit was seen")
        # The call never reached the dead worker: sent again, no crash of its own.
        assert await executor.run(double, 21) == 42
        assert executor.crashes == 0 and executor.restarts == 1
        assert pid not in executor.pids


async def test_a_fork_server_killed_from_outside_is_replaced_and_no_call_fails() -> None:
    async with ProcessExecutor(2) as executor:
        server, workers = executor._servers.server, executor.pids
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        await until(lambda: not any(alive(pid) for pid in workers), "its workers died with it")
        # The calls reach no dead worker: they go to workers forked from a new server.
        ran_in = {await executor.run(worker_pid, None) for _ in range(4)}
        assert executor._servers.server is not None and executor._servers.server.pid != server.pid
        assert executor.crashes == 0 and not ran_in & set(workers)
    assert all_children() == []


async def test_a_fork_cancelled_before_its_answer_leaves_the_next_fork_its_own_worker() -> None:
    from microbatch.executors.forkserver import ServerHolder

    def pipe_inodes(pid: int) -> set[int]:
        return {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")}

    holder = ServerHolder()
    try:
        from microbatch.executors import process

        server = await holder.get(process._WORKER_SCRIPT, nice=0, start_timeout=DEADLINE)
        first_r, first_w = os.pipe()
        read_answers = server._read_until

        async def cancelled_while_reading(done: Any) -> None:
            scope.cancel()  # the FORK was sent: the start is cancelled while its answer is awaited
            server._read_until = read_answers  # type: ignore[method-assign]
            await read_answers(done)

        server._read_until = cancelled_while_reading  # type: ignore[method-assign]
        with anyio.CancelScope() as scope:
            await server.fork(first_r, first_w)
        os.close(first_r)
        os.close(first_w)
        read_fd, write_fd = os.pipe()
        forked = await server.fork(read_fd, write_fd)
        # The pid given is the worker holding the pipe just sent, not the one forked before it.
        assert os.fstat(read_fd).st_ino in pipe_inodes(forked.pid)
        os.close(read_fd)
        os.close(write_fd)
    finally:
        await holder.close()


# ---- workers die with their parent -------------------------------------------------------------

PARENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import anyio
    from microbatch import ProcessExecutor

    def spin(_):  # defined in __main__: travels by value
        while True:
            pass

    async def main():
        async with ProcessExecutor(2) as executor, anyio.create_task_group() as tg:
            tg.start_soon(executor.run, spin, None)
            print(*executor.pids, executor._servers.server.pid, flush=True)  # the workers, their fork server
            await anyio.sleep_forever()

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.parametrize(
    ("backend", "pdeathsig"),
    [("asyncio", True), ("trio", False)],
    ids=["pdeathsig-asyncio", "watch-thread-trio"],
)
def test_workers_die_within_2s_of_a_sigkilled_parent(tmp_path: Path, backend: str, pdeathsig: bool) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = dict(os.environ)
    if not pdeathsig:
        env["MICROBATCH_WORKER_NO_PDEATHSIG"] = "1"  # only the thread watching the parent remains
    parent = subprocess.Popen(
        [sys.executable, str(script), backend], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 3, f"parent printed {line!r}"
        assert all(alive(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=DEADLINE)
        deadline = time.monotonic() + 2.0
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        parent.kill()
        parent.wait()


# ---- ThreadExecutor and InlineExecutor ---------------------------------------------------------


async def test_thread_executor_runs_in_threads_and_passes_exceptions_unchanged() -> None:
    error = ValueError("mine")

    def raise_it(_: object) -> None:
        raise error

    async with ThreadExecutor(2) as executor:
        assert executor.capacity == 2
        assert await executor.run(double, 21) == 42
        assert await executor.run(lambda _: threading.get_ident(), None) != threading.get_ident()
        with pytest.raises(ValueError) as info:
            await executor.run(raise_it, None)
        assert info.value is error


async def test_thread_executor_limits_concurrency() -> None:
    release = threading.Event()
    running = 0
    peak = 0
    lock = threading.Lock()

    def blocking(_: object) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(DEADLINE)
        with lock:
            running -= 1

    executor = ThreadExecutor(2)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(executor.run, blocking, None)
        await until(lambda: running == 2, "two threads running")
        await anyio.wait_all_tasks_blocked()
        assert executor._limiter.statistics().tasks_waiting == 1
        release.set()
    assert peak == 2


async def test_thread_executor_timeout_abandons_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    def stuck(_: object) -> int:
        release.wait(DEADLINE)
        finished.set()
        return 1

    executor = ThreadExecutor(1)
    with pytest.raises(mb.BatchTimeout, match="abandoned"):
        await executor.run(stuck, None, timeout=0.05)
    assert executor.timeouts == 1
    assert not finished.is_set()  # the thread still runs: it cannot be killed
    assert await executor.run(double, 3) == 6
    release.set()
    await anyio.to_thread.run_sync(finished.wait, DEADLINE)


async def test_inline_executor_runs_in_the_loop_thread_in_order() -> None:
    order: list[int] = []

    def record(i: int) -> int:
        order.append(i)
        return threading.get_ident()

    async with InlineExecutor() as executor:
        assert executor.capacity == 1
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(executor.run, record, i)
                await anyio.wait_all_tasks_blocked()
        assert order == [0, 1, 2, 3, 4]
        assert await executor.run(record, 5, timeout=0.001) == threading.get_ident()
        error = KeyError("k")

        def raise_it(_: object) -> None:
            raise error

        with pytest.raises(KeyError) as info:
            await executor.run(raise_it, None)
        assert info.value is error


def test_exports() -> None:
    for name in ("Executor", "ProcessExecutor", "ThreadExecutor", "InlineExecutor"):
        assert name in mb.__all__
        assert getattr(mb, name) is globals()[name]
