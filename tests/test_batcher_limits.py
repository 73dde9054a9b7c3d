"""``Batcher``: the per-call ``timeout``, ``BatchResultMismatch``, and running in the caller's task group.

Every async test runs on asyncio, uvloop and trio. A timeout's outcome never depends on the
machine's speed here: the calls that must time out hang until they are stopped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from _procs import alive
from anyio import wait_all_tasks_blocked
from trio.testing import MockClock

from microbatch import BatcherClosed, BatchTimeout, MicrobatchError
from microbatch._core.results import BatchResultMismatch
from microbatch.executors import ProcessExecutor
from microbatch.service import Batcher

pytestmark = pytest.mark.anyio


def run_on_mock_clock(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


def pid_or_hang(items: list[int]) -> list[int]:
    """Module level, so that worker processes can import it: hangs on a negative item."""
    if any(item < 0 for item in items):
        time.sleep(3600)
    return [os.getpid()] * len(items)


async def _collect(batcher: Batcher[int, Any], items: list[int]) -> dict[int, object]:
    """Submit each item from its own task; return each item's result or exception."""
    outcomes: dict[int, object] = {}

    async def caller(i: int) -> None:
        try:
            outcomes[i] = await batcher.submit(i)
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in items:
            tg.start_soon(caller, i)
    return outcomes


# -- timeout ----------------------------------------------------------------------------------------


async def test_async_fn_past_timeout_fails_its_batch_with_batch_timeout_and_the_batcher_goes_on() -> None:
    never = anyio.Event()

    async def fn(items: list[int]) -> list[int]:
        if 0 in items:
            await never.wait()
        return [item * 2 for item in items]

    async with Batcher(fn, max_size=3, max_wait=None, timeout=0.05) as batcher:
        outcomes = await _collect(batcher, [0, 1, 2])
        assert sorted(outcomes) == [0, 1, 2]
        errors = list(outcomes.values())
        assert all(isinstance(error, BatchTimeout) for error in errors)
        assert errors[0] is errors[1] is errors[2]
        message = str(errors[0])
        assert "batch 1 of Batcher(" in message and "timeout=0.05" in message and ".fn " in message
        assert await _collect(batcher, [4, 5, 6]) == {4: 8, 5: 10, 6: 12}
    assert batcher.stats.batch_errors == 1
    assert "timeout=0.05" in repr(batcher)


def test_timeout_is_measured_from_the_start_of_the_call() -> None:
    async def main() -> None:
        async def fn(items: list[float]) -> list[float]:
            await anyio.sleep(items[0])
            return items

        async with Batcher(fn, max_size=1, max_wait=0, timeout=1.0) as batcher:
            assert await batcher.submit(0.999) == 0.999
            start = anyio.current_time()
            with pytest.raises(BatchTimeout):
                await batcher.submit(1.001)
            assert anyio.current_time() - start == pytest.approx(1.0)

    run_on_mock_clock(main)


async def test_timeout_kills_the_hung_worker_process_of_a_process_executor() -> None:
    async with ProcessExecutor(1) as executor:
        async with Batcher(pid_or_hang, max_size=1, max_wait=0, executor=executor) as plain:
            worker = await plain.submit(1)
            assert alive(worker)
            limited = Batcher(pid_or_hang, max_size=2, max_wait=None, executor=executor, timeout=0.5)
            async with limited:
                outcomes = await _collect(limited, [-1, 2])
            assert all(isinstance(error, BatchTimeout) for error in outcomes.values())
            assert "timeout=0.5" in str(outcomes[-1]) and str(worker) in str(outcomes[-1])
            assert not alive(worker)
            assert executor.timeouts == 1
            replacement = await plain.submit(3)  # a new worker runs the next call
            assert replacement != worker
    assert limited.stats.batch_errors == 1


async def test_sync_fn_past_timeout_in_a_thread_is_abandoned() -> None:
    release = threading.Event()

    def fn(items: list[int]) -> list[int]:
        release.wait(60)
        return items

    try:
        async with Batcher(fn, max_size=1, max_wait=0, timeout=0.05) as batcher:
            with pytest.raises(BatchTimeout, match="abandoned"):
                await batcher.submit(1)
    finally:
        release.set()


async def test_an_executor_gets_the_timeout_and_one_without_that_parameter_still_fits() -> None:
    calls: list[dict[str, Any]] = []

    class Recording:
        async def run(self, fn: Callable[[Any], Any], arg: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return fn(arg)

    class Plain:
        async def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
            return fn(arg)

    def double(items: list[int]) -> list[int]:
        return [item * 2 for item in items]

    async with Batcher(double, max_size=1, max_wait=0, executor=Recording(), timeout=2.5) as batcher:
        assert await batcher.submit(1) == 2
    async with Batcher(double, max_size=1, max_wait=0, executor=Plain()) as batcher:
        assert await batcher.submit(2) == 4
    assert calls == [{"timeout": 2.5}]


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)],
)
def test_invalid_timeout_names_the_parameter(timeout: object, error: type[Exception]) -> None:
    async def fn(items: list[int]) -> list[int]:
        return items

    with pytest.raises(error, match="timeout"):
        Batcher(fn, max_size=1, max_wait=0, timeout=timeout)  # type: ignore[arg-type]


# -- wrong number of results ------------------------------------------------------------------------


async def test_wrong_number_of_results_is_batch_result_mismatch_for_every_caller() -> None:
    def drop_last(items: list[int]) -> list[int]:
        return items[:-1]

    async with Batcher(drop_last, max_size=3, max_wait=None) as batcher:
        outcomes = await _collect(batcher, [0, 1, 2])
    errors = list(outcomes.values())
    assert len(errors) == 3 and all(isinstance(error, BatchResultMismatch) for error in errors)
    error = errors[0]
    assert isinstance(error, BatchResultMismatch) and isinstance(error, MicrobatchError)
    assert (error.batch, error.size, error.results) == (1, 3, 2)
    assert error.fn.endswith("drop_last") and "drop_last returned 2 results for 3 items" in str(error)


# -- the caller's task group ------------------------------------------------------------------------


async def test_start_in_the_callers_task_group_and_aclose_drains_the_pending_items() -> None:
    batches: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        batches.append(items)
        return [-item for item in items]

    async with anyio.create_task_group() as tg:
        batcher = await Batcher(fn, max_size=4, max_wait=None).start(tg)
        handles = [batcher.submit_nowait(i) for i in range(6)]
        await batcher.aclose()  # the last 2 are flushed at close; aclose returns once all are done
        assert all(handle.done() for handle in handles)
        assert batcher.closed and batcher.stats.running == 0
        with pytest.raises(BatcherClosed):
            await batcher.submit(9)
        await batcher.aclose()  # idempotent
    assert [await handle for handle in handles] == [0, -1, -2, -3, -4, -5]
    assert batches == [[0, 1, 2, 3], [4, 5]]
    assert batcher.stats.flushed_by_close == 1
    with pytest.raises(RuntimeError, match="runs once"):
        async with batcher:
            pass


async def test_cancelling_the_callers_task_group_fails_running_and_pending_items() -> None:
    started, never = anyio.Event(), anyio.Event()

    async def fn(items: list[int]) -> list[int]:
        started.set()
        await never.wait()
        return items

    outcomes: dict[int, BaseException] = {}

    async def caller(batcher: Batcher[int, int], i: int) -> None:
        try:
            await batcher.submit(i)
        except BatcherClosed as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as callers:
        async with anyio.create_task_group() as tg:
            batcher = await Batcher(fn, max_size=2, max_wait=None).start(tg)
            callers.start_soon(caller, batcher, 1)
            callers.start_soon(caller, batcher, 2)
            await started.wait()  # [1, 2] runs
            callers.start_soon(caller, batcher, 3)
            await wait_all_tasks_blocked()
            assert batcher.stats.pending == 1
            tg.cancel_scope.cancel()
    assert sorted(outcomes) == [1, 2, 3]
    assert "while batch 1 was running" in str(outcomes[1]) and "while batch 1" in str(outcomes[2])
    assert "never given to fn" in str(outcomes[3])
    assert batcher.closed


async def test_a_started_batcher_cannot_start_again_and_submit_before_start_says_how() -> None:
    async def fn(items: list[int]) -> list[int]:
        return items

    batcher = Batcher(fn, max_size=1, max_wait=0)
    with pytest.raises(RuntimeError, match=r"batcher\.start\(task_group\)"):
        await batcher.submit(1)
    await batcher.aclose()  # never started: nothing to wait for
    assert batcher.closed
    async with anyio.create_task_group() as tg:
        fresh = await Batcher(fn, max_size=1, max_wait=0).start(tg)
        assert await fresh.submit(7) == 7
        with pytest.raises(RuntimeError, match="runs once"):
            await fresh.start(tg)
        await fresh.aclose()
