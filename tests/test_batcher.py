"""Tests of ``microbatch.service.Batcher``: results, bounds, errors, cancellation, backpressure, close.

Every async test runs on asyncio, uvloop and trio (``anyio_backend`` fixture). Orderings are made
with events and ``wait_all_tasks_blocked``; time bounds are checked on trio's ``MockClock``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from trio.testing import MockClock

from microbatch import BatcherClosed, BatcherFull
from microbatch._core.results import BatchResultMismatch
from microbatch.executors import InlineExecutor, ProcessExecutor, ThreadExecutor
from microbatch.service import Batcher, PendingResult

pytestmark = pytest.mark.anyio


def run_on_mock_clock(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` on trio with a virtual clock that jumps ahead whenever every task is blocked."""
    anyio.run(fn, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


class Recorder:
    """An async fn that records each batch and returns ``(item * 10, batch number)`` per item."""

    def __init__(self, gate: anyio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.times: list[float] = []
        self.gate = gate
        self.started = anyio.Event()

    async def __call__(self, items: list[int]) -> list[tuple[int, int]]:
        self.batches.append(list(items))
        self.times.append(anyio.current_time())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        number = len(self.batches)
        return [(item * 10, number) for item in items]


async def start_in_order(
    tg: anyio.abc.TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any
) -> None:
    """Start ``fn(arg)`` for each arg, one at a time, so that they submit in this order.

    trio runs newly started tasks in a random order; waiting until each one is blocked fixes it.
    """
    for arg in args:
        tg.start_soon(fn, arg)
        await wait_all_tasks_blocked()


def square_sync(items: list[int]) -> list[int]:
    """Module level, so that worker processes can import it."""
    return [item * item for item in items]


def fail_on_negative(items: list[int]) -> list[int]:
    if any(item < 0 for item in items):
        raise ArithmeticError(f"negative item in {items}")
    return [item + 1 for item in items]


# -- results and bounds ---------------------------------------------------------------------------


async def test_1000_concurrent_submitters_each_get_their_own_result() -> None:
    fn = Recorder()
    results: dict[int, tuple[int, int]] = {}

    async with Batcher(fn, max_size=32, max_wait=0.01) as batcher:

        async def caller(i: int) -> None:
            results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(caller, i)

    assert sorted(results) == list(range(1000))
    for i, (value, number) in results.items():
        assert value == i * 10
        assert i in fn.batches[number - 1]  # the batch that carried i is the one that answered it
    assert sorted(i for batch in fn.batches for i in batch) == list(range(1000))
    assert all(1 <= len(batch) <= 32 for batch in fn.batches)
    stats = batcher.stats
    assert stats.items == 1000
    assert stats.batches == len(fn.batches)
    assert stats.flushed_by_size + stats.flushed_by_time + stats.flushed_by_close == stats.batches
    assert stats.max_batch_size == 32  # 1000 submitters queue up far faster than one batch runs
    assert stats.pending == stats.running == stats.blocked == 0


async def test_full_batches_have_exactly_max_size_and_close_flushes_the_rest() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=7, max_wait=None, max_pending=100) as batcher:
        handles = [batcher.submit_nowait(i) for i in range(73)]
        # ten full batches are cut at once; the last 3 wait for more items or the close
        await wait_all_tasks_blocked()
        assert [len(batch) for batch in fn.batches] == [7] * 10
        assert batcher.stats.pending == 3
    assert [len(batch) for batch in fn.batches] == [7] * 10 + [3]
    assert [await handle for handle in handles] == [(i * 10, i // 7 + 1) for i in range(73)]
    stats = batcher.stats
    assert (stats.flushed_by_size, stats.flushed_by_time, stats.flushed_by_close) == (10, 0, 1)
    assert stats.batch_sizes == {7: 10, 3: 1}


def test_partial_batch_flushes_exactly_max_wait_after_its_first_item() -> None:
    async def main() -> None:
        fn = Recorder()
        async with Batcher(fn, max_size=10, max_wait=0.5) as batcher:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.submit, 1)
                await anyio.sleep(0.3)  # virtual time: a later item does not restart the clock
                tg.start_soon(batcher.submit, 2)
            assert fn.batches == [[1, 2]]
            assert fn.times == [0.5]
            await anyio.sleep(1.5)  # t = 2.0: the batcher is idle in between
            assert await batcher.submit(3) == (30, 2)
            assert fn.times == [0.5, 2.5]
        stats = batcher.stats
        assert (stats.flushed_by_time, stats.batches, stats.items) == (2, 2, 3)
        assert stats.wait_total == pytest.approx(0.5 + 0.2 + 0.5)
        assert stats.wait_max == pytest.approx(0.5)

    run_on_mock_clock(main)


def test_max_wait_zero_dispatches_at_once() -> None:
    async def main() -> None:
        fn = Recorder()
        async with Batcher(fn, max_size=10, max_wait=0) as batcher:
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(batcher.submit, i)
        # Every item leaves at once (virtual time 0); how many share a batch depends on the order
        # in which the scheduler runs the submitters and the flusher, which trio randomizes.
        assert sorted(item for batch in fn.batches for item in batch) == [0, 1, 2, 3]
        assert fn.times == [0.0] * len(fn.batches)

    run_on_mock_clock(main)


async def test_time_bound_flushes_a_lone_item() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=100, max_wait=0.001) as batcher:
        assert await batcher.submit(4) == (40, 1)  # would hang if only size could flush
    assert batcher.stats.flushed_by_time == 1


# -- errors -----------------------------------------------------------------------------------------


async def test_exception_from_fn_reaches_every_caller_of_the_batch_and_the_batcher_goes_on() -> None:
    boom = KeyError("model unavailable")
    calls = 0

    async def fn(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise boom
        return [-item for item in items]

    errors: list[BaseException] = []

    async def caller(batcher: Batcher[int, int], i: int) -> None:
        try:
            await batcher.submit(i)
        except KeyError as exc:
            errors.append(exc)

    async with Batcher(fn, max_size=5, max_wait=None) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(caller, batcher, i)
        assert errors == [boom] * 5
        assert all(error is boom for error in errors)
        after = batcher.submit_nowait(3)
    assert await after == -3  # the next batch (flushed at close) works
    assert batcher.stats.batch_errors == 1


async def test_wrong_number_of_results_is_an_error_for_every_caller() -> None:
    async def fn(items: list[int]) -> list[int]:
        return items[:-1] if len(items) == 3 else items

    messages: list[str] = []

    async def caller(batcher: Batcher[int, int], i: int) -> None:
        with pytest.raises(ValueError) as info:  # BatchResultMismatch is a ValueError too
            await batcher.submit(i)
        assert isinstance(info.value, BatchResultMismatch)
        messages.append(str(info.value))

    async with Batcher(fn, max_size=3, max_wait=None) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(caller, batcher, i)
        assert len(messages) == 3
        assert "batch 1 " in messages[0]
        assert "returned 2 results for 3 items" in messages[0]
        assert "fn" in messages[0] and "one result per item" in messages[0]
        after = batcher.submit_nowait(9)
    assert await after == 9
    assert batcher.stats.batch_errors == 1


async def test_result_that_is_not_a_list_is_a_type_error_naming_the_batch() -> None:
    async def fn(items: list[int]) -> Any:
        return None

    async with Batcher(fn, max_size=1, max_wait=0) as batcher:
        with pytest.raises(TypeError, match=r"batch 1 .* returned NoneType"):
            await batcher.submit(1)


async def test_exception_instance_in_a_slot_fails_only_that_item() -> None:
    def fn(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"item {item} is odd") if item % 2 else item * 2 for item in items]

    outcomes: dict[int, object] = {}

    async def caller(batcher: Batcher[int, int], i: int) -> None:
        try:
            outcomes[i] = await batcher.submit(i)
        except ValueError as exc:
            outcomes[i] = str(exc)

    async with Batcher(fn, max_size=6, max_wait=None) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(caller, batcher, i)
    assert outcomes == {0: 0, 1: "item 1 is odd", 2: 4, 3: "item 3 is odd", 4: 8, 5: "item 5 is odd"}
    assert batcher.stats.item_errors == 3
    assert batcher.stats.batch_errors == 0


# -- cancellation -----------------------------------------------------------------------------------


async def test_caller_cancelled_before_dispatch_withdraws_its_item() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=3, max_wait=None) as batcher:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.submit, 100)
                await wait_all_tasks_blocked()
                assert batcher.stats.pending == 1
                scope.cancel()
        assert batcher.stats.pending == 0
        async with anyio.create_task_group() as tg:
            await start_in_order(tg, batcher.submit, 0, 1, 2)
    assert fn.batches == [[0, 1, 2]]
    assert batcher.stats.cancelled == 1


async def test_cancelling_one_of_many_queued_callers_keeps_the_others_in_order() -> None:
    fn = Recorder()
    results: dict[int, tuple[int, int]] = {}
    scopes = {i: anyio.CancelScope() for i in range(5)}

    async with Batcher(fn, max_size=4, max_wait=None) as batcher:

        async def caller(i: int) -> None:
            with scopes[i]:
                results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            await start_in_order(tg, caller, 0, 1, 2)
            scopes[1].cancel()
            await wait_all_tasks_blocked()
            await start_in_order(tg, caller, 3, 4)
    assert fn.batches == [[0, 2, 3, 4]]
    assert results == {0: (0, 1), 2: (20, 1), 3: (30, 1), 4: (40, 1)}


async def test_caller_cancelled_after_dispatch_does_not_stop_the_batch() -> None:
    fn = Recorder(gate=anyio.Event())
    results: dict[int, tuple[int, int]] = {}

    async def caller(batcher: Batcher[int, tuple[int, int]], i: int) -> None:
        results[i] = await batcher.submit(i)

    async with Batcher(fn, max_size=2, max_wait=None) as batcher:
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as doomed:
                    doomed.start_soon(caller, batcher, 1)
                    await wait_all_tasks_blocked()
                    tg.start_soon(caller, batcher, 2)
                    await fn.started.wait()  # the batch [1, 2] is inside fn
                    scope.cancel()
            assert fn.gate is not None
            fn.gate.set()
        after = batcher.submit_nowait(3)
    assert await after == (30, 2)
    assert fn.batches == [[1, 2], [3]]
    assert results == {2: (20, 1)}
    assert batcher.stats.dropped == 1
    assert batcher.stats.cancelled == 0


async def test_pending_result_cancel_withdraws_only_before_dispatch() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=2, max_wait=None) as batcher:
        first = batcher.submit_nowait(1)
        assert first.cancel() is True
        with pytest.raises(BatcherClosed, match="withdrawn"):
            await first
        second, third = batcher.submit_nowait(2), batcher.submit_nowait(3)
        assert await second == (20, 1)
        assert third.done() and third.cancel() is False
    assert fn.batches == [[2, 3]]


# -- bounds -----------------------------------------------------------------------------------------


async def test_max_pending_blocks_submit_until_there_is_room_and_submit_nowait_raises() -> None:
    fn = Recorder(gate=anyio.Event())
    results: dict[int, tuple[int, int]] = {}

    async with Batcher(fn, max_size=2, max_wait=None, max_pending=4) as batcher:

        async def caller(i: int) -> None:
            results[i] = await batcher.submit(i)

        async with anyio.create_task_group() as tg:
            # [0, 1] runs (gated); [2, 3] and [4, 5] wait for the one slot
            await start_in_order(tg, caller, *range(6))
            assert fn.batches == [[0, 1]]
            assert (batcher.stats.pending, batcher.stats.blocked) == (4, 0)
            await start_in_order(tg, caller, 6)
            assert (batcher.stats.pending, batcher.stats.blocked) == (4, 1)
            assert 6 not in results
            with pytest.raises(BatcherFull, match="max_pending=4"):
                batcher.submit_nowait(7)
            assert fn.gate is not None
            fn.gate.set()
            batcher.close()  # flushes the partial [6]; blocked callers were already admitted
    assert sorted(results) == list(range(7))
    assert fn.batches == [[0, 1], [2, 3], [4, 5], [6]]
    assert batcher.stats.blocked == 0


async def test_blocked_caller_cancelled_leaves_without_reaching_fn() -> None:
    fn = Recorder(gate=anyio.Event())
    async with Batcher(fn, max_size=1, max_wait=None, max_pending=1) as batcher:
        async with anyio.create_task_group() as tg:
            await start_in_order(tg, batcher.submit, 0, 1)  # 0 runs (gated), 1 is queued
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as blocked:
                    blocked.start_soon(batcher.submit, 2)
                    await wait_all_tasks_blocked()
                    assert batcher.stats.blocked == 1
                    scope.cancel()
            assert batcher.stats.blocked == 0
            assert fn.gate is not None
            fn.gate.set()
    assert fn.batches == [[0], [1]]
    assert batcher.stats.cancelled == 1


async def test_max_concurrent_batches_is_respected() -> None:
    gate = anyio.Event()
    active = peak = 0

    async def fn(items: list[int]) -> list[int]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        return items

    async with Batcher(fn, max_size=1, max_wait=None, max_concurrent_batches=3) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(batcher.submit, i)
            await wait_all_tasks_blocked()
            assert active == 3
            assert batcher.stats.running == 3
            assert batcher.stats.pending == 7
            gate.set()
    assert peak == 3
    assert batcher.stats.batches == 10


async def test_busy_slot_lets_the_next_batch_grow_to_max_size() -> None:
    fn = Recorder(gate=anyio.Event())
    async with Batcher(fn, max_size=4, max_wait=0) as batcher:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 0)
            await fn.started.wait()
            await start_in_order(tg, batcher.submit, 1, 2, 3)
            assert fn.gate is not None
            fn.gate.set()
    # max_wait=0 made [0] due at once; while it ran, 1..3 gathered into one batch instead of three
    assert fn.batches == [[0], [1, 2, 3]]


# -- closing ----------------------------------------------------------------------------------------


async def test_submit_after_close_raises_batcher_closed() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=2, max_wait=None) as batcher:
        handle = batcher.submit_nowait(1)
        batcher.close()
        assert batcher.closed
        with pytest.raises(BatcherClosed, match="closed"):
            await batcher.submit(2)
        with pytest.raises(BatcherClosed):
            batcher.submit_nowait(3)
    assert await handle == (10, 1)  # submitted before close: flushed at close
    with pytest.raises(BatcherClosed, match="async with"):
        await batcher.submit(4)


async def test_close_flushes_queued_and_blocked_items() -> None:
    fn = Recorder(gate=anyio.Event())
    results: dict[int, tuple[int, int]] = {}

    async with anyio.create_task_group() as tg:
        async with Batcher(fn, max_size=3, max_wait=None, max_pending=3) as batcher:

            async def caller(i: int) -> None:
                results[i] = await batcher.submit(i)

            # [0, 1, 2] runs, [3, 4, 5] queued, 6 and 7 blocked
            await start_in_order(tg, caller, *range(8))
            assert (batcher.stats.pending, batcher.stats.blocked) == (3, 2)
            assert fn.gate is not None
            fn.gate.set()
    assert results == {i: (i * 10, i // 3 + 1) for i in range(8)}
    assert fn.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batcher.stats.flushed_by_close == 1


async def test_error_in_the_block_fails_waiting_items_and_propagates_unwrapped() -> None:
    fn = Recorder()
    with pytest.raises(ZeroDivisionError):
        async with Batcher(fn, max_size=5, max_wait=None) as batcher:
            handle = batcher.submit_nowait(1)
            1 / 0  # noqa: B018
    with pytest.raises(BatcherClosed, match="ZeroDivisionError"):
        await handle
    assert fn.batches == []


async def test_misuse_of_the_lifecycle_is_reported() -> None:
    batcher = Batcher(Recorder(), max_size=2, max_wait=0.1)
    with pytest.raises(RuntimeError, match="async with"):
        await batcher.submit(1)
    async with batcher:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        async with batcher:
            pass


# -- where fn runs ----------------------------------------------------------------------------------


async def test_sync_fn_runs_in_a_worker_thread() -> None:
    threads: list[int] = []

    def fn(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        return square_sync(items)

    async with Batcher(fn, max_size=4, max_wait=0.001) as batcher:
        assert await batcher.submit(7) == 49
    assert threads and threading.get_ident() not in threads


async def test_async_callable_object_is_awaited_in_the_event_loop() -> None:
    fn = Recorder()
    async with Batcher(fn, max_size=2, max_wait=0) as batcher:
        assert await batcher.submit(5) == (50, 1)


async def test_sync_fn_on_worker_processes() -> None:
    async with ProcessExecutor(1) as executor:
        async with Batcher(square_sync, max_size=8, max_wait=0.001, executor=executor) as batcher:
            async with anyio.create_task_group() as tg:
                results: dict[int, int] = {}

                async def caller(i: int) -> None:
                    results[i] = await batcher.submit(i)

                for i in range(20):
                    tg.start_soon(caller, i)
        async with Batcher(fail_on_negative, max_size=2, max_wait=None, executor=executor) as failing:
            errors: list[str] = []

            async def failing_caller(i: int) -> None:
                try:
                    await failing.submit(i)
                except ArithmeticError as exc:  # raised in the worker, re-raised in every caller
                    errors.append(str(exc))

            async with anyio.create_task_group() as tg:
                tg.start_soon(failing_caller, 1)
                tg.start_soon(failing_caller, -1)
            assert len(errors) == 2 and all("negative item" in error for error in errors)
            after = failing.submit_nowait(5)
        assert await after == 6
    assert results == {i: i * i for i in range(20)}


@pytest.mark.parametrize("make_executor", [ThreadExecutor, InlineExecutor])
async def test_sync_fn_on_thread_and_inline_executors(make_executor: Callable[[], Any]) -> None:
    pid_of_fn: list[int] = []

    def fn(items: list[int]) -> list[int]:
        pid_of_fn.append(os.getpid())
        return square_sync(items)

    async with make_executor() as executor:
        async with Batcher(fn, max_size=3, max_wait=0.001, executor=executor) as batcher:
            assert await batcher.submit(3) == 9
    assert pid_of_fn == [os.getpid()]


# -- arguments --------------------------------------------------------------------------------------


async def _echo(items: list[int]) -> list[int]:
    return items


@pytest.mark.parametrize(
    ("kwargs", "error", "parameter"),
    [
        ({"max_size": 0, "max_wait": 1.0}, ValueError, "max_size"),
        ({"max_size": 2.5, "max_wait": 1.0}, TypeError, "max_size"),
        ({"max_size": 4, "max_wait": -1.0}, ValueError, "max_wait"),
        ({"max_size": 4, "max_wait": float("nan")}, ValueError, "max_wait"),
        ({"max_size": 4, "max_wait": 1.0, "max_concurrent_batches": 0}, ValueError, "max_concurrent_batches"),
        ({"max_size": 4, "max_wait": 1.0, "max_concurrent_batches": True}, TypeError, "max_concurrent"),
        ({"max_size": 4, "max_wait": 1.0, "max_pending": 3}, ValueError, "max_pending"),
        ({"max_size": 4, "max_wait": 1.0, "executor": object()}, TypeError, "executor"),
        ({"max_size": 4, "max_wait": 1.0, "executor": InlineExecutor()}, ValueError, "executor"),
    ],
)
def test_invalid_arguments_name_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], parameter: str
) -> None:
    with pytest.raises(error, match=parameter):
        Batcher(_echo, **kwargs)


def test_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        Batcher(42, max_size=1, max_wait=0)  # type: ignore[arg-type]


def test_default_max_pending_is_ten_batches() -> None:
    batcher = Batcher(_echo, max_size=32, max_wait=0.01)
    assert batcher.max_pending == 320
    assert "max_pending=320" in repr(batcher)


async def test_submit_nowait_handle_type() -> None:
    async with Batcher(_echo, max_size=2, max_wait=0) as batcher:
        handle = batcher.submit_nowait(8)
        assert isinstance(handle, PendingResult)
        assert await handle == 8
        assert handle.done()
        assert await handle == 8  # awaiting again returns the same result
        await anyio.lowlevel.checkpoint()
