"""Pipeline behaviour with real worker processes, real files, on asyncio, uvloop and trio."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from _procs import new_children, workers_stop_starting_after

import microbatch as mb

pytestmark = pytest.mark.anyio


def sum_ints(lines: list[str]) -> int:
    return sum(int(x) for x in lines)


def crash_once(lines: list[str]) -> int:
    """Kills its worker the first time it sees a batch (a marker file records the attempt)."""
    marker = Path(os.environ["MB_TEST_DIR"]) / f"seen-{lines[0]}"
    if not marker.exists():
        marker.touch()
        os._exit(7)
    return sum(int(x) for x in lines)


def hang_once(lines: list[str]) -> int:
    """Hangs the first time it sees the batch starting with 0."""
    marker = Path(os.environ["MB_TEST_DIR"]) / f"hung-{lines[0]}"
    if lines[0] == "0" and not marker.exists():
        marker.touch()
        threading.Event().wait()
    return sum(int(x) for x in lines)


def poison(lines: list[str]) -> int:
    """Fails on any batch holding the line 'bad'."""
    if "bad" in lines:
        raise ValueError("cannot parse 'bad'")
    return sum(int(x) for x in lines)


def hang_forever(lines: list[str]) -> int:
    threading.Event().wait()
    return 0


def children() -> list[psutil.Process]:
    return new_children()


@pytest.fixture(autouse=True)
def _test_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MB_TEST_DIR", str(tmp_path))


def write_numbers(path: Path, n: int, extra: dict[int, str] | None = None) -> Path:
    extra = extra or {}
    path.write_text("".join(f"{extra.get(i, i)}\n" for i in range(n)))
    return path


async def test_sum_over_file_matches_sequential_fold(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 25_000)
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=1_000, workers=2)
    assert await pipeline.run(mb.read_lines(path)) == sum(range(25_000))
    assert children() == []


async def test_updates_arrive_in_batch_order_with_running_value(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 10_000)
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=700, workers=2)
    seqs, values, records = [], [], []
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            seqs.append(update.seq)
            values.append(update.value)
            records.append(update.records)
    assert seqs == list(range(len(seqs)))
    # Each value is the fold of exactly the prefix of records seen so far.
    assert values == [sum(range(r)) for r in records]
    assert records[-1] == 10_000
    assert updates.value == sum(range(10_000))


@pytest.mark.parametrize("executor", ["thread", "inline"])
async def test_iterable_source_on_other_executors(executor: Any) -> None:
    pipeline = mb.Pipeline(
        lambda xs: sum(xs), aggregate=mb.Sum(), max_size=37, executor=executor
    )
    assert await pipeline.run(range(1_000)) == sum(range(1_000))


async def test_async_iterable_source() -> None:
    async def numbers() -> Any:
        for i in range(500):
            yield i

    pipeline = mb.Pipeline(sum, aggregate=mb.Sum(), max_size=64, executor="inline")
    assert await pipeline.run(numbers()) == sum(range(500))


async def test_transient_crash_is_retried_and_result_exact(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 3_000)
    pipeline = mb.Pipeline(
        crash_once, aggregate=mb.Sum(), max_size=1_000, workers=2, retries=2, backoff=0.0
    )
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            stats = update.stats
    assert updates.value == sum(range(3_000))
    assert stats.crashes == 3
    assert stats.retries == 3
    assert children() == []


async def test_transient_hang_is_timed_out_retried_and_result_exact(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 2_000)
    pipeline = mb.Pipeline(
        hang_once, aggregate=mb.Sum(), max_size=1_000, workers=2, timeout=3.0, backoff=0.0
    )
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            stats = update.stats
    assert updates.value == sum(range(2_000))
    assert stats.timeouts == 1
    assert children() == []


async def test_poison_record_goes_to_dead_letters_and_the_rest_counts(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 1_000, extra={123: "bad"})
    dead = tmp_path / "dead.jsonl"
    pipeline = mb.Pipeline(
        poison, aggregate=mb.Sum(), max_size=200, workers=2, retries=1, backoff=0.0, dead_letter=dead
    )
    total = await pipeline.run(mb.read_lines(path))
    assert total == sum(range(1_000)) - 123
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert len(letters) == 1
    letter = letters[0]
    assert letter["record"] == "bad"
    assert letter["error"] == "ValueError"
    assert "cannot parse" in letter["message"]
    assert "poison" in letter["traceback"]
    assert letter["batch"] == 0
    # The byte offset of the poison line in the file.
    assert letter["position"] == len("".join(f"{i}\n" for i in range(123)))


async def test_poison_record_in_an_iterable_source_names_its_index(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"

    def fussy(xs: list[int]) -> int:
        if 77 in xs:
            raise KeyError(77)
        return sum(xs)

    pipeline = mb.Pipeline(
        fussy, aggregate=mb.Sum(), max_size=50, executor="inline", retries=0, dead_letter=dead
    )
    assert await pipeline.run(range(200)) == sum(range(200)) - 77
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (letter["record"], letter["position"], letter["batch"]) == (77, 77, 1)


async def test_on_error_raise_stops_with_batch_failed(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 1_000, extra={450: "bad"})
    pipeline = mb.Pipeline(
        poison, aggregate=mb.Sum(), max_size=100, workers=2, retries=1, backoff=0.0, on_error="raise"
    )
    with pytest.raises(mb.BatchFailed) as info:
        await pipeline.run(mb.read_lines(path))
    assert info.value.seq == 4
    assert isinstance(info.value.cause, ValueError)
    assert children() == []


def crash_at_500(lines: list[str]) -> int:
    """Kills its worker on the batch starting with 500 (once), and new workers fail to start."""
    here = Path(os.environ["MB_TEST_DIR"])
    if lines[0] == "500" and not (here / "crashed").exists():
        (here / "crashed").touch()
        (here / "no-more-workers").touch()
        os._exit(7)
    return sum(int(x) for x in lines)


async def test_an_executor_that_cannot_start_workers_stops_the_run_without_dead_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "no-more-workers"  # crash_at_500 creates it
    workers_stop_starting_after(marker, tmp_path, monkeypatch)
    path = write_numbers(tmp_path / "n.txt", 1_000)
    dead, checkpoint = tmp_path / "dead.jsonl", tmp_path / "ck"
    pipeline = mb.Pipeline(
        crash_at_500, aggregate=mb.Sum(), max_size=100, workers=1, retries=2, backoff=0.0,
        dead_letter=dead,
    )
    with pytest.raises(mb.BatchFailed) as info:
        await pipeline.run(mb.read_lines(path), checkpoint=checkpoint)
    assert info.value.seq == 5
    assert isinstance(info.value.cause, mb.ExecutorUnavailable)
    assert "died while starting" in str(info.value.cause)
    assert not dead.exists() or dead.read_text() == ""
    assert children() == []
    # The checkpoint holds the batches before it; once workers start again the run completes.
    marker.unlink()
    assert await pipeline.run(mb.read_lines(path), checkpoint=checkpoint) == sum(range(1_000))
    assert not dead.exists() or dead.read_text() == ""


async def test_a_run_stopped_by_batch_failed_resumes_instead_of_counting_as_finished(
    tmp_path: Path,
) -> None:
    path = write_numbers(tmp_path / "n.txt", 1_000, extra={450: "bad"})
    checkpoint, dead = tmp_path / "ck", tmp_path / "dead.jsonl"
    strict = mb.Pipeline(
        poison, aggregate=mb.Sum(), max_size=100, workers=2, retries=0, on_error="raise",
        dead_letter=dead,
    )
    with pytest.raises(mb.BatchFailed):
        await strict.run(mb.read_lines(path), checkpoint=checkpoint)
    lenient = mb.Pipeline(
        poison, aggregate=mb.Sum(), max_size=100, workers=2, retries=0, dead_letter=dead
    )
    # Same fn, aggregate and source: the checkpoint is accepted, and the run goes on from it.
    assert await lenient.run(mb.read_lines(path), checkpoint=checkpoint) == sum(range(1_000)) - 450


async def test_source_error_reaches_caller_and_no_worker_is_left(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), workers=2)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        await pipeline.run(mb.read_lines(missing))
    assert children() == []


async def test_cancellation_with_hung_worker_leaves_no_process(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 100)
    pipeline = mb.Pipeline(hang_forever, aggregate=mb.Sum(), max_size=10, workers=2, timeout=None)
    with anyio.move_on_after(1.0) as scope:
        await pipeline.run(mb.read_lines(path))
    assert scope.cancelled_caught
    assert children() == []


async def test_breaking_out_stops_everything(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 50_000)
    pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=100, workers=2)
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            if update.seq == 3:
                break
    # Whatever was folded before the break is a prefix of the source, folded exactly once.
    assert updates.stats.records >= 400
    assert updates.value == sum(range(updates.stats.records))
    assert children() == []


class GatedExecutor:
    """An executor whose calls wait until the test opens the gate: makes fn 'slow' on demand."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.gate = anyio.Event()
        self.running = 0

    async def __aenter__(self) -> GatedExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def run(self, fn: Callable[[Any], Any], arg: Any, *, timeout: float | None = None) -> Any:
        self.running += 1
        await self.gate.wait()
        self.running -= 1
        return fn(arg)


async def test_reader_lead_is_bounded_while_fn_is_slow() -> None:
    pulled = 0

    def source() -> Any:
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield i

    executor = GatedExecutor(capacity=2)
    pipeline = mb.Pipeline(sum, aggregate=mb.Sum(), max_size=10, queue_size=3, executor=executor)
    async with anyio.create_task_group() as tg:
        result: list[int] = []

        async def run() -> None:
            result.append(await pipeline.run(source()))

        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert executor.running == 2
        # queue_size + workers batches unfolded, one batch being assembled, one slice read ahead.
        assert pulled <= (3 + 2 + 2) * 10 + 10
        executor.gate.set()
    assert result == [sum(range(100_000))]


async def test_unpicklable_fn_is_refused_before_any_batch(tmp_path: Path) -> None:
    lock = threading.Lock()

    def uses_lock(lines: list[str]) -> int:
        with lock:
            return len(lines)

    path = write_numbers(tmp_path / "n.txt", 10)
    pipeline = mb.Pipeline(uses_lock, aggregate=mb.Sum(), workers=1)
    with pytest.raises(mb.UnpicklableFunction, match="uses_lock"):
        await pipeline.run(mb.read_lines(path))


def test_invalid_settings_name_the_parameter() -> None:
    for kwargs, name in [
        ({"max_size": 0}, "max_size"),
        ({"max_wait": -1}, "max_wait"),
        ({"workers": 0}, "workers"),
        ({"queue_size": 0}, "queue_size"),
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"on_error": "ignore"}, "on_error"),
        ({"executor": "gpu"}, "executor"),
    ]:
        with pytest.raises(ValueError, match=name):
            mb.Pipeline(sum, aggregate=mb.Sum(), **kwargs)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_worker_killed_by_signal_mid_batch_is_retried(tmp_path: Path) -> None:
    def kill_self_once(lines: list[str]) -> int:
        marker = Path(os.environ["MB_TEST_DIR"]) / "killed"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return sum(int(x) for x in lines)

    path = write_numbers(tmp_path / "n.txt", 500)
    pipeline = mb.Pipeline(kill_self_once, aggregate=mb.Sum(), max_size=100, workers=2, backoff=0.0)
    assert await pipeline.run(mb.read_lines(path)) == sum(range(500))


async def test_a_pipeline_with_an_executor_instance_runs_twice(tmp_path: Path) -> None:
    path = write_numbers(tmp_path / "n.txt", 3_000)
    pipeline = mb.Pipeline(
        sum_ints, aggregate=mb.Sum(), max_size=500, executor=mb.ProcessExecutor(2)
    )
    assert await pipeline.run(mb.read_lines(path)) == sum(range(3_000))
    assert await pipeline.run(mb.read_lines(path)) == sum(range(3_000))
    assert children() == []
