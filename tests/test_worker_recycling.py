"""Workers replaced while alive and well: after ``max_tasks_per_worker`` calls, or once their memory
passed ``max_worker_memory``; no call lost, run twice or failed."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import anyio
import pytest
from _procs import alive, new_children

import microbatch as mb
from microbatch._core.calls import CallQueue, CallState
from microbatch._core.params import check_bytes

pytestmark = pytest.mark.anyio

_LEAK: list[bytes] = []


def pid_of(arg: Any) -> tuple[Any, int]:
    return arg, os.getpid()


def leak(arg: Any) -> tuple[Any, int]:
    """Keeps 30 MB more after each call, as a leaking library would."""
    _LEAK.append(os.urandom(1 << 20) * 30)
    return arg, os.getpid()


def sum_lines(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


async def run_all(executor: mb.ProcessExecutor, fn: Any, args: list[Any]) -> list[tuple[Any, int]]:
    """Every call at once; the answers in the order of ``args``."""
    answers: dict[int, tuple[Any, int]] = {}

    async def one(i: int) -> None:
        answers[i] = await executor.run(fn, args[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(args)):
            tg.start_soon(one, i)
    return [answers[i] for i in range(len(args))]


async def test_a_worker_is_replaced_after_max_tasks_per_worker_calls() -> None:
    async with mb.ProcessExecutor(1, max_tasks_per_worker=3) as executor:
        pids = [(await executor.run(pid_of, i))[1] for i in range(10)]
        assert [len(set(pids[i : i + 3])) for i in range(0, 9, 3)] == [1, 1, 1]
        assert len(set(pids)) == 4  # 3 + 3 + 3 + 1
        assert (executor.recycled, executor.restarts, executor.crashes) == (3, 0, 0)
        assert not any(alive(pid) for pid in set(pids) - set(executor.pids))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
async def test_no_call_is_lost_or_run_twice_when_workers_are_replaced(prefetch: int) -> None:
    async with mb.ProcessExecutor(2, prefetch=prefetch, max_tasks_per_worker=2) as executor:
        answers = await run_all(executor, pid_of, list(range(40)))
        assert [arg for arg, _ in answers] == list(range(40))
        per_worker = Counter(pid for _, pid in answers)
        assert max(per_worker.values()) <= 2 and len(per_worker) >= 20
        assert (executor.crashes, executor.timeouts, executor.restarts) == (0, 0, 0)
        assert len(executor.pids) <= 2 * (1 + prefetch)
    assert new_children(zombies=False) == []


async def test_each_worker_runs_one_call_with_max_tasks_per_worker_1() -> None:
    async with mb.ProcessExecutor(1, prefetch=1, max_tasks_per_worker=1) as executor:
        answers = await run_all(executor, pid_of, list(range(6)))
        assert [arg for arg, _ in answers] == list(range(6))
        assert len({pid for _, pid in answers}) == 6


async def test_a_worker_is_replaced_once_its_memory_passed_max_worker_memory() -> None:
    async with mb.ProcessExecutor(1, prefetch=0, max_worker_memory="100MB") as executor:
        answers = [await executor.run(leak, i) for i in range(8)]
        assert [arg for arg, _ in answers] == list(range(8))
        per_worker = Counter(pid for _, pid in answers)
        # an interpreter holds well under 40 MB: 3 leaks of 30 MB pass 100 MB, 1 does not
        assert 2 <= max(per_worker.values()) <= 3, per_worker
        assert len(per_worker) >= 3 and executor.recycled >= 2
        assert (executor.crashes, executor.restarts) == (0, 0)


async def test_a_pipeline_with_recycled_workers_folds_every_batch_once() -> None:
    lines = [str(i) for i in range(2_000)]
    executor = mb.ProcessExecutor(2, max_tasks_per_worker=3)
    pipeline = mb.Pipeline(sum_lines, aggregate=mb.Sum(), max_size=50, executor=executor)
    assert await pipeline.run(lines) == sum(range(2_000))
    assert executor.recycled >= 40 // 3 - 1
    assert new_children(zombies=False) == []


def test_invalid_recycling_settings_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        mb.ProcessExecutor(1, max_tasks_per_worker=0)
    with pytest.raises(TypeError, match="max_tasks_per_worker"):
        mb.ProcessExecutor(1, max_tasks_per_worker=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_worker_memory.*'512M'"):
        mb.ProcessExecutor(1, max_worker_memory="512M")
    with pytest.raises(ValueError, match="max_worker_memory"):
        mb.ProcessExecutor(1, max_worker_memory=0)
    assert mb.ProcessExecutor(1, max_worker_memory="1.5GiB").recycling.max_memory == 3 << 29


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MB", 512_000_000), ("1.5GiB", 3 << 29), ("64 MiB", 64 << 20), ("100", 100), ("2kb", 2000),
     ("1TiB", 1 << 40), (".5KiB", 512), (4096, 4096)],
)  # fmt: skip
def test_sizes_in_bytes(text: str | int, size: int) -> None:
    assert check_bytes("limit", text) == size


@pytest.mark.parametrize("text", ["512M", "MB", "1.5.2MB", "-1MB", "12 parsecs", ""])
def test_bad_sizes_name_the_parameter_and_the_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"limit must be a number of bytes.*units: B, kB"):
        check_bytes("limit", text)


def test_a_retired_call_queue_runs_what_it_holds_and_takes_nothing_new() -> None:
    queue = CallQueue()
    first, second = queue.send(), queue.send()
    queue.retire()
    assert not queue.open and not queue.drained
    answered, step = queue.answered()
    assert answered is first and step.running == [second] and not step.kill
    assert not queue.drained
    answered, step = queue.answered()
    assert answered is second and step.running == [] and not step.kill
    assert queue.drained and queue.sent == 2
    assert (first.state, second.state) == (CallState.ANSWERED, CallState.ANSWERED)
    # a retired worker that dies fails its running call and sends the queued ones elsewhere
    queue = CallQueue()
    running, queued = queue.send(), queue.send()
    queue.retire()
    step = queue.died()
    assert (running.state, queued.state, step.resend) == (CallState.FAILED, CallState.RESEND, [queued])
