"""DaskExecutor on a real cluster: a scheduler and two worker processes (with nannies) on 127.0.0.1.

The cluster is started once for the module with the ``dask`` command (``tests/_dask_cluster.py``
says why not as a ``LocalCluster``); each test connects its own asynchronous client to it through
``DaskExecutor``. Tests run on asyncio and uvloop (Dask's client needs asyncio); one test checks the
error on trio.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _procs import alive, own_io

pytest.importorskip("distributed")

from _dask_cluster import DaskCluster
from _dask_fixtures import dask_backend, dask_cluster_of_module, module_cluster  # noqa: F401 - fixtures
from distributed import Client

import microbatch as mb
from microbatch.executors.dask import DaskExecutor


def _set_allowed_failures(value: int, dask_scheduler: Any = None) -> int:
    previous: int = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = value
    return previous


@pytest.fixture
def no_dask_reruns(_cluster: tuple[DaskCluster, Client]) -> Iterator[None]:
    """The scheduler gives up on a task at its first lost worker (allowed-failures = 0)."""
    _, client = _cluster
    previous = client.run_on_scheduler(_set_allowed_failures, 0)
    yield
    client.run_on_scheduler(_set_allowed_failures, previous)


# -- functions the workers run (module level: workers import this module by name) -------------------


def total(numbers: list[int]) -> int:
    return sum(numbers)


def sum_ints(lines: list[str]) -> int:
    return sum(int(line) for line in lines)


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")  # args == ("a/b",): unpickling calls __init__ with one arg


def fail(numbers: list[int]) -> int:
    if numbers == [13]:
        raise ValueError(f"unlucky record {numbers[0]}")
    raise Unpicklable(1, 2)


def crash(numbers: list[int]) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0  # pragma: no cover


def _write_marker(marker: Path) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(marker)


def block_once(marker: Path, numbers: list[int]) -> int:
    """The first call writes its worker's pid to ``marker`` and then blocks; later calls compute."""
    if not marker.exists():
        _write_marker(marker)
        time.sleep(600)
    return sum(numbers)


def sum_ints_blocking_once(marker: Path, trigger: str, lines: list[str]) -> int:
    """``sum_ints``, except that the first batch holding ``trigger`` blocks after writing ``marker``."""
    if trigger in lines and not marker.exists():
        _write_marker(marker)
        time.sleep(600)
    return sum(int(line) for line in lines)


async def wait_for_pid(marker: Path) -> int:
    """The pid a blocked call wrote to ``marker`` (polls the file system; no ordering depends on it)."""
    with anyio.fail_after(30):
        while not marker.exists():
            await anyio.sleep(0.02)
    return int(marker.read_text())


async def wait_gone(pid: int) -> None:
    with anyio.fail_after(30):
        while alive(pid):
            await anyio.sleep(0.02)


# -- the executor on its own --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_results_exact_and_capacity_follows_worker_threads(cluster: DaskCluster) -> None:
    # Four tasks in flight per worker thread; with bundles, 16 batches per task.
    async with DaskExecutor(cluster, max_bytes=None) as executor:
        assert executor.capacity == 8
    chunks = [list(range(i * 1000, (i + 1) * 1000)) for i in range(20)]
    results: dict[int, int] = {}
    async with DaskExecutor(cluster) as executor:
        assert executor.capacity == 128
        assert executor.address == cluster.scheduler_address

        async def one(i: int) -> None:
            results[i] = await executor.run(total, chunks[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(chunks)):
                tg.start_soon(one, i)
    assert results == {i: sum(chunk) for i, chunk in enumerate(chunks)}
    assert executor.crashes == executor.timeouts == 0


@pytest.mark.anyio
async def test_address_string_and_max_in_flight(cluster: DaskCluster) -> None:
    async with DaskExecutor(cluster.scheduler_address, max_in_flight=5) as executor:
        assert executor.capacity == 5
        assert await executor.run(total, [1, 2, 3]) == 6
    assert executor.client is None
    # Left executors can be entered again; a new client connects.
    async with executor:
        assert await executor.run(total, [4]) == 4


@pytest.mark.anyio
async def test_given_async_client_is_used_and_left_open(cluster: DaskCluster) -> None:
    async with Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
        async with DaskExecutor(client) as executor:
            assert executor.client is client
            assert await executor.run(total, [5, 6]) == 11
        assert client.status == "running"
        assert await client.submit(total, [1], pure=False) == 1


@pytest.mark.anyio
async def test_entering_twice_at_once_is_refused(cluster: DaskCluster) -> None:
    executor = DaskExecutor(cluster)
    async with executor:
        with pytest.raises(RuntimeError, match="already in use"):
            await executor.__aenter__()


@pytest.mark.anyio
async def test_run_outside_async_with_is_refused(cluster: DaskCluster) -> None:
    with pytest.raises(RuntimeError, match="async with DaskExecutor"):
        await DaskExecutor(cluster).run(total, [1])


@pytest.mark.anyio
async def test_exception_of_fn_comes_back_with_worker_traceback(cluster: DaskCluster) -> None:
    async with DaskExecutor(cluster) as executor:
        with pytest.raises(ValueError, match="unlucky record 13") as info:
            await executor.run(fail, [13])
        cause = info.value.__cause__
        assert isinstance(cause, mb.RemoteTraceback)
        assert "in fail" in cause.tb and "ValueError: unlucky record 13" in cause.tb

        with pytest.raises(mb.RemoteError, match=r"Unpicklable: 1/2") as remote:
            await executor.run(fail, [1])
        assert remote.value.type_name == f"{Unpicklable.__module__}.Unpicklable"  # as processes name it
        assert isinstance(remote.value.__cause__, mb.RemoteTraceback)
        # The executor goes on after a failed call.
        assert await executor.run(total, [1, 1]) == 2
    assert executor.crashes == 0


@pytest.mark.anyio
async def test_unpicklable_function_is_refused_before_submitting(cluster: DaskCluster) -> None:
    lock = threading.Lock()

    def holds_a_lock(numbers: list[int]) -> int:
        with lock:
            return sum(numbers)

    async with DaskExecutor(cluster) as executor:
        with pytest.raises(mb.UnpicklableFunction, match="holds_a_lock"):
            await executor.run(holds_a_lock, [1])


@pytest.mark.anyio
async def test_worker_killed_mid_call_is_rerun_elsewhere(cluster: DaskCluster, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    fn = functools.partial(block_once, marker)
    result: list[int] = []
    async with DaskExecutor(cluster) as executor:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                result.append(await executor.run(fn, list(range(1000)), timeout=120))

            tg.start_soon(call)
            pid = await wait_for_pid(marker)
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
        await wait_gone(pid)
    # Dask's scheduler re-ran the task on another worker (allowed-failures); the value is exact.
    assert result == [sum(range(1000))]


@pytest.mark.anyio
async def test_worker_lost_past_allowed_failures_is_worker_crashed(
    cluster: DaskCluster, no_dask_reruns: None
) -> None:
    async with DaskExecutor(cluster) as executor:
        with pytest.raises(mb.WorkerCrashed, match=r"task crash-\w+ \(test_dask\.crash\) died") as info:
            await executor.run(crash, [1])
        assert type(info.value.__cause__).__name__ == "KilledWorker"
        assert executor.crashes == 1
        # The other worker still serves while the nanny restarts the lost one.
        assert await executor.run(total, [2, 3]) == 5


@pytest.mark.anyio
async def test_timeout_cancels_the_task_and_restarts_its_worker(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    fn = functools.partial(block_once, marker)
    async with DaskExecutor(cluster) as executor:
        with pytest.raises(
            mb.BatchTimeout, match=r"block_once ran longer than timeout=2\.0 s.*worker process killed"
        ) as info:
            await executor.run(fn, [1, 2], timeout=2.0)
        assert isinstance(info.value, TimeoutError)
        assert executor.timeouts == 1
        assert executor.restarts == 1
        # The worker thread that hung was killed with its process, and the task is gone.
        await wait_gone(int(marker.read_text()))
        processing = await executor.client.processing()
        assert all(not keys for keys in processing.values()), processing
        # Both workers serve again: two calls at once both complete.
        async with anyio.create_task_group() as tg:
            for n in (1, 2):
                tg.start_soon(executor.run, total, [n])


@pytest.mark.anyio
async def test_cancelling_the_caller_cancels_the_task(cluster: DaskCluster, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    fn = functools.partial(block_once, marker)
    async with DaskExecutor(cluster, restart_on_timeout=False) as executor:
        async with anyio.create_task_group() as tg:
            tg.start_soon(executor.run, fn, [1])
            pid = await wait_for_pid(marker)
            tg.cancel_scope.cancel()
        # The cancellation reached the scheduler: it forgets the task.
        with anyio.fail_after(30):
            while any((await executor.client.processing()).values()):
                await anyio.sleep(0.02)
        assert executor.timeouts == 0
        assert executor.restarts == 0
    # The hung thread still occupies its worker (a thread cannot be stopped): kill it here, its nanny
    # starts a new one for the next tests.
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_trio_is_refused_with_a_clear_error(cluster: DaskCluster) -> None:
    executor = DaskExecutor(cluster)
    with pytest.raises(mb.BackendNotSupported, match=r"needs asyncio.*runs on trio"):
        async with executor:
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_unreachable_scheduler_names_the_address() -> None:
    with socket_closed_port() as port:
        address = f"tcp://127.0.0.1:{port}"
        with pytest.raises(ConnectionError, match=rf"Dask scheduler at {address}.*dask scheduler"):
            async with DaskExecutor(address, connect_timeout=0.5):
                pass  # pragma: no cover


def socket_closed_port() -> Any:
    """A context manager giving a port on 127.0.0.1 that nothing listens on."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed() -> Iterator[int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield port

    return closed()


def test_invalid_arguments_name_the_parameter(cluster: DaskCluster) -> None:
    with pytest.raises(TypeError, match="address_or_client must be a scheduler address"):
        DaskExecutor(8786)
    with pytest.raises(ValueError, match="max_in_flight must be a positive integer"):
        DaskExecutor(cluster, max_in_flight=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        DaskExecutor(cluster, connect_timeout=0)
    with pytest.raises(ValueError, match="max_bytes"):
        DaskExecutor(cluster, max_bytes=0)
    with pytest.raises(ValueError, match="max_tasks"):
        DaskExecutor(cluster, max_tasks=0)


def test_missing_distributed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'microbatch\[dask\]'"):
        DaskExecutor("tcp://127.0.0.1:8786")


def test_import_microbatch_does_not_import_distributed() -> None:
    code = "import sys, microbatch; assert 'distributed' not in sys.modules; print(microbatch.DaskExecutor)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "DaskExecutor" in out.stdout


# -- a pipeline on the cluster ------------------------------------------------------------------------


def write_numbers(path: Path, n: int) -> int:
    """Write 0..n-1 scrambled, one per line; return their sum."""
    numbers = [(i * 7919) % 100_003 for i in range(n)]
    path.write_text("".join(f"{x}\n" for x in numbers))
    return sum(numbers)


@pytest.mark.anyio
async def test_pipeline_sum_is_exact(cluster: DaskCluster, tmp_path: Path) -> None:
    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 50_000)
    executor = DaskExecutor(cluster)
    pipeline = mb.Pipeline(
        sum_ints, aggregate=mb.Sum(), max_size=1_000, executor=executor, dead_letter=tmp_path / "dead.jsonl"
    )
    async with pipeline.updates(mb.read_lines(path)) as updates:
        seqs = [update.seq async for update in updates]
    assert updates.value == expected
    assert seqs == list(range(50))
    assert executor.crashes == executor.timeouts == 0


@pytest.mark.anyio
async def test_pipeline_survives_a_worker_killed_mid_batch(cluster: DaskCluster, tmp_path: Path) -> None:
    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 20_000)
    trigger = str((10_000 * 7919) % 100_003)  # a record of batch 10
    marker = tmp_path / "started"
    fn = functools.partial(sum_ints_blocking_once, marker, trigger)
    pipeline = mb.Pipeline(
        fn,
        aggregate=mb.Sum(),
        max_size=1_000,
        executor=DaskExecutor(cluster),
        dead_letter=tmp_path / "dead.jsonl",
    )
    result: list[int] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await pipeline.run(mb.read_lines(path)))

        tg.start_soon(run)
        pid = await wait_for_pid(marker)
        os.kill(pid, signal.SIGKILL)
    await wait_gone(pid)
    assert result == [expected]
    assert not (tmp_path / "dead.jsonl").exists() or (tmp_path / "dead.jsonl").read_text() == ""


@pytest.mark.anyio
async def test_pipeline_checkpointed_run_resumes_on_the_cluster(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 30_000)
    state = tmp_path / "state"
    pipeline = mb.Pipeline(
        sum_ints,
        aggregate=mb.Sum(),
        max_size=1_000,
        executor=DaskExecutor(cluster),
        checkpoint_every=None,
        checkpoint_every_batches=1,
    )
    async with pipeline.updates(mb.read_lines(path), checkpoint=state) as updates:
        async for update in updates:
            if update.seq == 4:
                break
    folded = updates.stats.batches
    assert 5 <= folded < 30

    # The same pipeline (its executor can be entered again) resumes from the checkpoint, which
    # covers every folded batch, delivered or not: the next update is the first batch not folded.
    async with pipeline.updates(mb.read_lines(path), checkpoint=state) as resumed:
        seqs = [update.seq async for update in resumed]
    assert seqs == list(range(folded, 30))
    assert resumed.value == expected
    assert resumed.stats.records == 30_000


@pytest.mark.anyio
async def test_pipeline_retries_a_batch_dask_gave_up_on(
    cluster: DaskCluster, tmp_path: Path, no_dask_reruns: None
) -> None:
    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 5_000)
    marker = tmp_path / "started"
    fn = functools.partial(sum_ints_blocking_once, marker, str((2_500 * 7919) % 100_003))
    pipeline = mb.Pipeline(
        fn,
        aggregate=mb.Sum(),
        max_size=1_000,
        # One task per batch and per worker: the killed worker held only the blocked batch.
        executor=DaskExecutor(cluster, max_bytes=None, max_in_flight=2),
        backoff=0.01,
        dead_letter=tmp_path / "dead.jsonl",
    )
    async with pipeline.updates(mb.read_lines(path)) as updates:
        # The reader and the workers go on while nobody consumes updates: batch 2 starts and blocks.
        pid = await wait_for_pid(marker)
        os.kill(pid, signal.SIGKILL)
        last = [update async for update in updates][-1]
    assert updates.value == expected
    # Dask gave up at once (KilledWorker): the pipeline's own retry ran the batch again.
    assert last.stats.crashes == 1 and last.stats.retries == 1


# -- file splits on the cluster ------------------------------------------------------------------------


def sum_with_pid(lines: list[str]) -> tuple[int, int]:
    """The batch's sum and the pid of the process that ran it."""
    return os.getpid(), sum(int(line) for line in lines)


class RecordingDaskExecutor(DaskExecutor):
    """A ``DaskExecutor`` that keeps the argument of every call the pipeline makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.args: list[Any] = []

    async def run(self, fn: Any, arg: Any, *, timeout: float | None = None) -> Any:
        self.args.append(arg)
        return await super().run(fn, arg, timeout=timeout)


def _worker_pids(dask_worker: Any = None) -> int:
    return os.getpid()


@pytest.mark.anyio
async def test_file_splits_run_as_tasks_that_read_the_file_on_the_workers(
    cluster: DaskCluster, tmp_path: Path, _cluster: tuple[DaskCluster, Client]
) -> None:
    from microbatch._core.splits import FileSplit

    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 100_000)
    size = path.stat().st_size
    split_size = 64 << 10
    assert size > 5 * split_size
    executor = RecordingDaskExecutor(cluster)
    pipeline = mb.Pipeline(
        sum_with_pid,
        max_size=1_000,
        executor=executor,
        split_size=split_size,
        dead_letter=tmp_path / "dead.jsonl",
    )
    pids: set[int] = set()
    totals = 0
    read, written = own_io()
    async with pipeline.map(mb.read_lines(path)) as results:
        async for pid, batch_total in results:
            pids.add(pid)
            totals += batch_total
    read_after, written_after = own_io()
    assert totals == expected
    # The pipeline's process (its own threads; the scheduler and the workers run elsewhere) moved
    # under 5 % of the file's bytes.
    assert read_after - read < size / 20
    assert written_after - written < size / 20
    # Every call was one split: a path and a byte range, never the file's bytes. Together the
    # splits cover the file once, in order.
    assert len(executor.args) >= 5
    assert all(isinstance(arg, FileSplit) for arg in executor.args)
    assert all(arg.path == str(path) for arg in executor.args)
    ranges = sorted((arg.start, arg.end) for arg in executor.args)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # fn ran in the worker processes, not in this one.
    workers = set(_cluster[1].run(_worker_pids).values())
    assert pids and pids <= workers and os.getpid() not in pids
    assert executor.crashes == executor.timeouts == 0


@pytest.mark.anyio
async def test_path_check_names_every_worker_and_the_path(
    cluster: DaskCluster, tmp_path: Path, _cluster: tuple[DaskCluster, Client]
) -> None:
    from microbatch._core.splits import FileSplit
    from microbatch._core.splittask import SplitTask
    from microbatch._core.task import BatchTask
    from microbatch.executors.dask import PathNotVisible, check_path_visible

    workers = sorted(_cluster[1].scheduler_info()["workers"])
    assert len(workers) == 2
    present = tmp_path / "numbers.txt"
    write_numbers(present, 100)
    missing = str(tmp_path / "nowhere" / "numbers.txt")
    async with DaskExecutor(cluster) as executor:
        sizes = await check_path_visible(executor.client, str(present))
        assert sizes == {worker: present.stat().st_size for worker in workers}

        with pytest.raises(PathNotVisible) as raised:
            await check_path_visible(executor.client, missing)
        assert missing in str(raised.value)
        assert all(worker in str(raised.value) for worker in workers)

        # A split of that path fails the same way before any task runs, and as an executor that
        # cannot run it (a pipeline stops instead of reading the file itself).
        task = SplitTask(BatchTask(sum_ints))
        with pytest.raises(PathNotVisible, match="not visible to Dask worker"):
            await executor.run(task, FileSplit(missing, 0, 100, 10, 1 << 20))
        assert isinstance(raised.value, mb.ExecutorUnavailable)
        outcomes = await executor.run(task, FileSplit(str(present), 0, 50, 10, 1 << 20))
        assert sum(count for count, *_ in outcomes) > 0


@pytest.mark.anyio
async def test_a_relative_path_is_read_by_workers_running_in_another_folder(
    cluster: DaskCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = write_numbers(tmp_path / "numbers.txt", 50_000)
    monkeypatch.chdir(tmp_path)  # the workers keep the folder they started in
    pipeline = mb.Pipeline(
        sum_ints, aggregate=mb.Sum(), max_size=1_000, executor=DaskExecutor(cluster), split_size=64 << 10
    )
    async with pipeline.updates(mb.read_lines("numbers.txt")) as updates:
        async for _ in updates:
            pass
    assert updates.value == expected
    # Run on the workers, not batch by batch from here after a failure to find the file.
    assert updates.stats.splits >= 5 and updates.stats.split_fallbacks == 0


@pytest.mark.anyio
async def test_the_executor_split_size_applies_when_the_pipeline_gives_none(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    from microbatch._core.splits import FileSplit
    from microbatch.executors.dask import DEFAULT_SPLIT_SIZE

    assert DaskExecutor(cluster).split_size == DEFAULT_SPLIT_SIZE >= 16 << 20
    path = tmp_path / "numbers.txt"
    expected = write_numbers(path, 100_000)
    size = path.stat().st_size

    async def calls(executor: RecordingDaskExecutor, **settings: Any) -> list[Any]:
        pipeline = mb.Pipeline(sum_ints, aggregate=mb.Sum(), max_size=1_000, executor=executor, **settings)
        assert await pipeline.replace(max_size=2_000).run(mb.read_lines(path)) == expected
        return executor.args

    # No split_size given: the executor's (128 KiB here) plans the splits.
    split_calls = await calls(RecordingDaskExecutor(cluster, split_size=128 << 10))
    assert all(isinstance(arg, FileSplit) for arg in split_calls)
    assert max(arg.end - arg.start for arg in split_calls) == 128 << 10
    # The pipeline's own split_size wins over the executor's.
    split_calls = await calls(RecordingDaskExecutor(cluster, split_size=128 << 10), split_size=64 << 10)
    assert max(arg.end - arg.start for arg in split_calls) == 64 << 10
    # split_size=None: no splits; and the default 32 MiB is more than this file holds.
    for executor, settings in [
        (RecordingDaskExecutor(cluster, split_size=128 << 10), {"split_size": None}),
        (RecordingDaskExecutor(cluster), {}),
    ]:
        batch_calls = await calls(executor, **settings)
        assert not any(isinstance(arg, FileSplit) for arg in batch_calls)
        assert len(batch_calls) == 50 and size < DEFAULT_SPLIT_SIZE


@pytest.mark.anyio
async def test_a_file_only_this_process_sees_stops_the_run_naming_it_and_the_workers(
    cluster: DaskCluster, tmp_path: Path, _cluster: tuple[DaskCluster, Client]
) -> None:
    from microbatch.executors.dask import PathNotVisible

    write_numbers(tmp_path / "numbers.txt", 50_000)
    # /proc/self/fd/N names this process's open file: the workers have no such descriptor.
    fd = os.open(tmp_path / "numbers.txt", os.O_RDONLY)
    private = 900
    os.dup2(fd, private)
    os.close(fd)
    path = f"/proc/self/fd/{private}"
    try:
        pipeline = mb.Pipeline(
            sum_ints,
            aggregate=mb.Sum(),
            max_size=1_000,
            executor=DaskExecutor(cluster),
            split_size=64 << 10,
            dead_letter=tmp_path / "dead.jsonl",
        )
        with pytest.raises(mb.BatchFailed) as raised:
            await pipeline.run(mb.read_lines(path))
    finally:
        os.close(private)
    cause = raised.value.cause
    assert isinstance(cause, PathNotVisible)
    assert path in str(cause)
    assert all(worker in str(cause) for worker in _cluster[1].scheduler_info()["workers"])
    # It stopped instead of reading the file here batch by batch.
    assert not (tmp_path / "dead.jsonl").exists() or (tmp_path / "dead.jsonl").read_text() == ""


# -- bundles: batches waiting for a task slot leave together -----------------------------------------


def sum_after_gate(gate: Path, numbers: list[int]) -> int:
    """Sums once ``gate`` exists: holds the executor's only task slot while other calls queue."""
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return sum(numbers)


def total_unless_13(numbers: list[int]) -> int:
    if 13 in numbers:
        raise ValueError(f"unlucky batch {numbers}")
    return sum(numbers)


def total_blocking_once_on(marker: Path, trigger: int, numbers: list[int]) -> int:
    """``total``, except that the first batch holding ``trigger`` blocks after writing ``marker``."""
    if trigger in numbers and not marker.exists():
        _write_marker(marker)
        time.sleep(600)
    return sum(numbers)


async def until(condition: Any) -> None:
    """Wait until ``condition()`` holds (polls; no ordering depends on the polling's pace)."""
    with anyio.fail_after(30):
        while not condition():
            await anyio.sleep(0.01)


async def queued_behind_a_gate(
    executor: DaskExecutor, gate: Path, fn: Any, args: list[list[int]]
) -> tuple[dict[int, int], dict[int, Exception]]:
    """Run ``fn`` on each of ``args`` while a first call holds the executor's only task slot, so that
    they all wait for it; then open the gate. Returns the results and the errors by index."""
    results: dict[int, int] = {}
    errors: dict[int, Exception] = {}

    async def one(i: int, fn: Any, arg: list[int]) -> None:
        try:
            results[i] = await executor.run(fn, arg)
        except Exception as exc:
            errors[i] = exc

    sent = executor.bundles
    async with anyio.create_task_group() as tg:
        tg.start_soon(one, -1, functools.partial(sum_after_gate, gate), [1, 2])
        await until(lambda: executor.bundles == sent + 1)  # the first call left alone
        for i, arg in enumerate(args):
            tg.start_soon(one, i, fn, arg)
        await until(lambda: executor.waiting == len(args))
        gate.touch()
    assert results.pop(-1) == 3
    return results, errors


@pytest.mark.anyio
async def test_calls_waiting_for_a_slot_leave_as_one_bundle_with_their_own_outcomes(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    args = [[i, 13] if i == 4 else [i, 100] for i in range(10)]
    async with DaskExecutor(cluster, max_tasks=1) as executor:
        assert executor.capacity == 16
        results, errors = await queued_behind_a_gate(executor, tmp_path / "gate", total_unless_13, args)
        # The ten calls left as one task; fn raising on one batch failed that call alone.
        assert executor.bundles == 2
        assert results == {i: i + 100 for i in range(10) if i != 4}
        assert list(errors) == [4]
        assert isinstance(errors[4], ValueError) and "unlucky batch [4, 13]" in str(errors[4])
        assert "in total_unless_13" in errors[4].__cause__.tb  # type: ignore[union-attr]
    assert executor.fallbacks == executor.crashes == 0


@pytest.mark.anyio
async def test_a_bundle_holds_at_most_max_bytes_of_arguments(cluster: DaskCluster, tmp_path: Path) -> None:
    from microbatch.executors import remote

    args = [[i, 100] for i in range(10)]
    size = len(remote.dumps(args[0]))
    assert all(len(remote.dumps(arg)) == size for arg in args)
    async with DaskExecutor(cluster, max_tasks=1, max_bytes=3 * size) as executor:
        results, errors = await queued_behind_a_gate(executor, tmp_path / "gate", total, args)
        assert results == {i: i + 100 for i in range(10)} and not errors
        assert executor.bundles == 1 + 4  # the first call, then 3 + 3 + 3 + 1


@pytest.mark.anyio
async def test_a_bundle_lost_with_its_worker_runs_its_batches_one_by_one(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    fn = functools.partial(total_blocking_once_on, marker, 999)
    args = [[i, 999 if i == 5 else i] for i in range(8)]
    async with DaskExecutor(cluster, max_tasks=1) as executor:
        async with anyio.create_task_group() as tg:

            async def kill_when_blocked() -> None:
                pid = await wait_for_pid(marker)
                os.kill(pid, signal.SIGKILL)

            tg.start_soon(kill_when_blocked)
            results, errors = await queued_behind_a_gate(executor, tmp_path / "gate", fn, args)
        # The bundle's data died with its worker: each batch ran again alone (batch 5 no longer
        # blocks), and every result is exact.
        assert not errors
        assert results == {i: sum(arg) for i, arg in enumerate(args)}
        assert executor.bundles == 2 and executor.fallbacks == 1
    await wait_gone(int(marker.read_text()))


def sum_ints_unless_x(lines: list[str]) -> int:
    bad = [line for line in lines if line.startswith("x")]
    if bad:
        raise ValueError(f"not a number: {bad[0]}")
    return sum(int(line) for line in lines)


@pytest.mark.anyio
async def test_bundled_and_unbundled_runs_fold_the_same_value_and_dead_letters(
    cluster: DaskCluster, tmp_path: Path
) -> None:
    path = tmp_path / "numbers.txt"
    lines = [f"x{i}" if i % 997 == 5 else str(i) for i in range(20_000)]
    path.write_text("".join(f"{line}\n" for line in lines))
    expected = sum(int(line) for line in lines if not line.startswith("x"))
    dead: dict[str, list[dict[str, Any]]] = {}
    for name, settings in (("bundles", {}), ("one task per batch", {"max_bytes": None})):
        executor = DaskExecutor(cluster, **settings)
        pipeline = mb.Pipeline(
            sum_ints_unless_x,
            aggregate=mb.Sum(),
            max_size=100,
            executor=executor,
            split_size=None,  # batches sent from here, as from a source that cannot be split
            backoff=0.01,
            dead_letter=tmp_path / f"{name}.jsonl",
        )
        assert await pipeline.run(mb.read_lines(path)) == expected
        dead[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert (executor.bundles > 0) == (name == "bundles")
    assert [d["record"] for d in dead["bundles"]] == [line for line in lines if line.startswith("x")]
    assert dead["bundles"] == dead["one task per batch"]


def same_batch(records: list[int]) -> list[int]:
    return records


@pytest.mark.anyio
async def test_bundled_map_results_come_in_batch_order(cluster: DaskCluster) -> None:
    records = list(range(30_000))
    pipeline = mb.Pipeline(same_batch, max_size=250, executor=DaskExecutor(cluster))
    out: list[int] = []
    async with pipeline.map(records) as results:
        async for batch in results:
            out.extend(batch)
    assert out == records


def test_a_worker_loads_a_bundles_function_once() -> None:
    import pickle

    from microbatch.executors import remote

    function = (b"digest-of-total", pickle.dumps(total))
    args = [[1, 2], [3], []]
    blob = b"".join(pickle.dumps(arg) for arg in args)
    sizes = [len(pickle.dumps(arg)) for arg in args]
    seconds, outcomes = remote.call_bundle(function, blob, sizes)
    assert outcomes == [(remote.RESULT, 3), (remote.RESULT, 3), (remote.RESULT, 0)]
    assert seconds >= 0
    # Known by its digest from then on: the pickle sent along is not read again.
    _, outcomes = remote.call_bundle((b"digest-of-total", b"not a pickle"), blob, sizes)
    assert outcomes[0] == (remote.RESULT, 3)


def slow_sum(lines: list[str]) -> int:
    time.sleep(0.05)
    return sum(int(line) for line in lines)


def _scheduler_tasks(dask_scheduler: Any = None) -> int:
    return len(dask_scheduler.tasks)


@pytest.mark.anyio
async def test_leaving_a_bundled_run_early_leaves_no_task_on_the_cluster(
    cluster: DaskCluster, tmp_path: Path, _cluster: tuple[DaskCluster, Client]
) -> None:
    path = tmp_path / "numbers.txt"
    write_numbers(path, 50_000)
    executor = DaskExecutor(cluster)
    pipeline = mb.Pipeline(slow_sum, aggregate=mb.Sum(), max_size=100, executor=executor, split_size=None)
    async with pipeline.updates(mb.read_lines(path)) as updates:
        async for update in updates:
            if update.seq == 3:
                break  # leaving the block cancels the run: calls waiting and bundles in flight
    assert executor.bundles > 0 and executor.client is None
    # The scheduler forgets every task and every scattered bundle of the run.
    with anyio.fail_after(30):
        while _cluster[1].run_on_scheduler(_scheduler_tasks):
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_nats_splits_run_as_tasks_that_fetch_their_range_on_the_workers(
    cluster: DaskCluster, tmp_path: Path, _cluster: tuple[DaskCluster, Client]
) -> None:
    from _nats import publish, running_server

    from microbatch.sources.natssplit import NatsSplit

    with running_server(tmp_path / "jetstream") as server:
        payloads = [str(i).encode() for i in range(20_000)]
        await anyio.to_thread.run_sync(lambda: publish(server.url, "DASK", payloads, create=True))
        executor = RecordingDaskExecutor(cluster)
        pipeline = mb.Pipeline(sum_with_pid, max_size=500, executor=executor, split_size=8_000)
        pids: set[int] = set()
        totals = 0
        async with pipeline.map(mb.nats_stream(server.url, "DASK", until="end")) as results:
            async for pid, batch_total in results:
                pids.add(pid)
                totals += batch_total
    assert totals == sum(range(20_000))
    # Every call was a range of sequences, never a message; together they cover the stream once.
    assert len(executor.args) >= 5 and all(isinstance(arg, NatsSplit) for arg in executor.args)
    ranges = sorted((arg.start, arg.end) for arg in executor.args)
    assert ranges[0][0] == 1 and ranges[-1][1] == 20_001
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    workers = set(_cluster[1].run(_worker_pids).values())
    assert pids and pids <= workers and os.getpid() not in pids
