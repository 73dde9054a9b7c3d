"""Worker processes and the processes their ``fn`` starts: one process group per worker, killed
together; the started processes get default signal handling and none of the worker's pipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
from _procs import alive

import microbatch as mb
from microbatch._exceptions import BatchTimeout, WorkerCrashed

pytestmark = pytest.mark.anyio

# Bits of SIGINT and SIGTERM in /proc/PID/status's SigIgn mask.
_INT_TERM = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
# Far longer than any wait in these tests: a hang shows as a failure, not as a stuck run.
DEADLINE = 60.0


def start_children(folder: str, then: str) -> None:
    """Start ``sleep 1000`` twice (one through a fork without exec), note the pids, then ``then``:
    hang, crash, or return."""
    started = [subprocess.Popen(["sleep", "1000"]).pid]
    forked = os.fork()
    if forked == 0:  # a Python child that only sleeps, as a multiprocessing child could
        time.sleep(1000)
        os._exit(0)
    started.append(forked)
    note = Path(folder) / f"{os.getpid()}.json"
    note.with_suffix(".tmp").write_text(json.dumps(started))
    note.with_suffix(".tmp").rename(note)  # the test reads it whole or not at all
    if then == "hang":
        time.sleep(1000)
    elif then == "crash":
        os._exit(3)


def hang_with_children(folder: str) -> None:
    start_children(folder, "hang")


def crash_with_children(folder: str) -> None:
    start_children(folder, "crash")


def children_then_return(folder: str) -> int:
    start_children(folder, "return")
    return os.getpid()


def children_in_batch(lines: list[str]) -> int:
    """A pipeline's fn: the batch holding ``hang FOLDER`` starts children and hangs."""
    for line in lines:
        if line.startswith("hang "):
            start_children(line[5:], "hang")
    return len(lines)


def worker_pid(_: object) -> int:
    return os.getpid()


def noted(folder: Path) -> dict[int, list[int]]:
    """The pids each worker noted: worker pid -> its children's pids."""
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")}


async def wait_for_note(folder: Path) -> dict[int, list[int]]:
    with anyio.fail_after(DEADLINE):
        while not (found := noted(folder)):
            await anyio.sleep(0.01)
    return found


async def gone(pids: list[int]) -> list[int]:
    """The pids still running once killed processes had time to be reaped by init; [] if none."""
    with anyio.move_on_after(5.0):
        while any(alive(pid) for pid in pids):
            await anyio.sleep(0.02)
    return [pid for pid in pids if alive(pid)]


def ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")  # pragma: no cover


async def test_a_timeout_kills_the_processes_fn_started(tmp_path: Path) -> None:
    async with mb.ProcessExecutor(1) as executor:
        with pytest.raises(BatchTimeout):
            await executor.run(hang_with_children, str(tmp_path), timeout=6.0)
        [children] = noted(tmp_path).values()
        assert await gone(children) == []
        assert executor.timeouts == 1


async def test_a_crash_kills_the_processes_fn_started_and_is_seen_at_once(tmp_path: Path) -> None:
    async with mb.ProcessExecutor(1) as executor:
        # The forked child would keep the worker's pipe open: the crash would never be seen.
        with anyio.fail_after(DEADLINE), pytest.raises(WorkerCrashed, match="exit code 3"):
            await executor.run(crash_with_children, str(tmp_path))
        [children] = noted(tmp_path).values()
        assert await gone(children) == []
        assert await executor.run(worker_pid, None) != 0  # the executor goes on


async def test_cancelling_a_call_kills_the_processes_fn_started(tmp_path: Path) -> None:
    async with mb.ProcessExecutor(1) as executor, anyio.create_task_group() as tg:
        tg.start_soon(executor.run, hang_with_children, str(tmp_path))
        [(worker, children)] = (await wait_for_note(tmp_path)).items()
        tg.cancel_scope.cancel()
    assert await gone([worker, *children]) == []


async def test_leaving_the_executor_kills_the_processes_fn_started(tmp_path: Path) -> None:
    async with mb.ProcessExecutor(1) as executor:
        worker = await executor.run(children_then_return, str(tmp_path))
        [children] = noted(tmp_path).values()
        assert all(alive(pid) for pid in children)
    assert await gone([worker, *children]) == []


async def test_a_cancelled_pipeline_leaves_no_process_fn_started(tmp_path: Path) -> None:
    lines = [str(i) for i in range(40)] + [f"hang {tmp_path}"]
    pipeline = mb.Pipeline(children_in_batch, aggregate=mb.Sum(), max_size=10, workers=2)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.run, lines)
            [(worker, children)] = (await wait_for_note(tmp_path)).items()
            scope.cancel()
    assert await gone([worker, *children]) == []


async def test_processes_fn_starts_get_default_signal_handling_and_the_workers_group(
    tmp_path: Path,
) -> None:
    async with mb.ProcessExecutor(1) as executor:
        worker = await executor.run(children_then_return, str(tmp_path))
        [children] = noted(tmp_path).values()
        for pid in children:
            assert ignored_signals(pid) & _INT_TERM == 0, pid
            assert os.getpgid(pid) == worker  # the worker leads the group
            # no pipe of the worker's (a forked child drops them as it starts: wait for that)
            with anyio.fail_after(DEADLINE):
                while held := shared_pipes(pid, worker):
                    await anyio.sleep(0.01)
            assert held == set()
        assert os.getpgid(worker) == worker != os.getpgid(0)
        # SIGTERM to the child started by exec ends it: its disposition is the default one
        os.kill(children[0], signal.SIGTERM)
        assert await gone(children[:1]) == []


def pipes(pid: int) -> set[str]:
    fds = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return {fd for fd in fds if fd.startswith("pipe:")}


def shared_pipes(child: int, worker: int) -> set[str]:
    """The worker's pipes that ``child`` holds too."""
    return pipes(child) & pipes(worker)


async def test_a_worker_goes_on_after_sigint_and_sigterm() -> None:
    # systemd's stop signals every process of the service; the parent decides what stops.
    async with mb.ProcessExecutor(1) as executor:
        [worker] = executor.pids
        os.kill(worker, signal.SIGINT)
        os.kill(worker, signal.SIGTERM)
        assert await executor.run(worker_pid, None) == worker
        assert (executor.crashes, executor.restarts) == (0, 0)


CTRL_C_PARENT = """
import os, signal, sys, anyio
# A terminal's defaults, whatever the test runner inherited (a background job ignores SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.path.insert(0, {tests!r})
import microbatch as mb
from test_worker_groups import children_in_batch

async def main():
    pipeline = mb.Pipeline(children_in_batch, aggregate=mb.Sum(), max_size=10, workers=2)
    await pipeline.run([str(i) for i in range(40)] + ["hang " + {folder!r}])

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_of_the_pipeline_leaves_no_process_fn_started(tmp_path: Path, backend: str) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(CTRL_C_PARENT.format(tests=str(Path(__file__).parent), folder=str(notes)))
    # A terminal's Ctrl-C: SIGINT to the foreground process group, here the parent's own.
    parent = subprocess.Popen(
        [sys.executable, str(script), backend], start_new_session=True, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not noted(notes) and time.monotonic() < deadline:
            time.sleep(0.01)
        [(worker, children)] = noted(notes).items()
        os.killpg(parent.pid, signal.SIGINT)
        _, err = parent.communicate(timeout=DEADLINE)
        assert b"KeyboardInterrupt" in err
        assert parent.returncode != 0
        left = [pid for pid in [worker, *children] if alive(pid)]
        assert left == [], [psutil.Process(pid).cmdline() for pid in left]
    finally:
        parent.kill()
        parent.wait()
