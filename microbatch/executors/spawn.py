"""Worker processes of ``ProcessExecutor``: starting one, killing it, waiting for it.

A worker is ``python WORKER_SCRIPT PARENT_PID NICE`` with two pipes as its stdin and stdout (see
:mod:`microbatch.executors.worker` for its side). Nothing here decides what happens to calls: the
call queue (:mod:`microbatch._core.calls`) does, the executor performs it.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections import OrderedDict

import anyio
import anyio.abc

from .._core.calls import CallQueue
from .._exceptions import ExecutorUnavailable, WorkerCrashed
from . import worker as wire
from .pipes import PIPE_ERRORS, _Pipes

__all__ = ["Worker", "exit_description", "start_worker"]

# After a worker's pipe reached end of file, how long to wait for its exit code before killing it.
EXIT_GRACE = 2.0


def exit_description(returncode: int | None) -> str:
    """How a process ended, for messages: ``exit code 3``, ``killed by SIGKILL (exit code -9)``."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {returncode})"
    return f"exit code {returncode}"


class Worker:
    """One worker process, its pipes, the functions it holds and its call queue."""

    __slots__ = ("process", "pid", "pipes", "live", "functions", "queue", "killed")

    def __init__(self, process: anyio.abc.Process, pipes: _Pipes, live: set[Worker]) -> None:
        self.process = process
        # The executor's workers not reaped yet; this one leaves it once reaped.
        self.live = live
        live.add(self)
        self.pid = process.pid
        self.pipes = pipes
        # Tokens of the functions this worker holds, least recently used first (mirrors the worker).
        self.functions: OrderedDict[int, None] = OrderedDict()
        self.queue = CallQueue()
        # Sent SIGKILL already. A second kill is not only useless: on asyncio, Popen.send_signal()
        # polls first and may reap the process behind the event loop's child watcher.
        self.killed = False

    def __repr__(self) -> str:
        return f"<worker process {self.pid} calls={len(self.queue)} open={self.queue.open}>"

    def fn_frames(self, token: int, data: bytes) -> list[bytes]:
        """The FN frame for function ``token`` unless this worker holds it already."""
        if token in self.functions:
            self.functions.move_to_end(token)
            return []
        self.functions[token] = None
        if len(self.functions) > wire.FN_CACHE_SIZE:
            self.functions.popitem(last=False)
        return [wire.HEADER.pack(wire.FN, token, len(data)) + data]

    async def send(self, buffers: list[bytes]) -> None:
        await self.pipes.send(buffers)

    async def receive(self) -> tuple[int, bytes]:
        kind, _token, size = wire.HEADER.unpack(await self.pipes.receive_exactly(wire.HEADER.size))
        return kind, await self.pipes.receive_exactly(size)

    def kill(self) -> None:
        """Send SIGKILL once, unless the process has exited."""
        if not self.killed and self.process.returncode is None:
            self.killed = True
            try:
                self.process.kill()
            except ProcessLookupError:  # pragma: no cover - exited between the check and the kill
                pass

    async def reap(self) -> None:
        """Kill the process (if still running), close its pipes and wait for it; never cancelled."""
        if self not in self.live:
            return
        with anyio.CancelScope(shield=True):
            self.kill()
            self.pipes.close()
            await self.process.wait()
        self.live.discard(self)

    async def wait_exit(self) -> None:
        """After end of file on its pipe: give the process ``EXIT_GRACE`` s to exit, then reap it."""
        with anyio.move_on_after(EXIT_GRACE, shield=True):
            await self.process.wait()
        await self.reap()


# Signals by which something outside kills a starting worker: an operator, a fault injector, the
# out-of-memory killer, a signal meant for the whole process group that arrived before the worker
# could ignore it. A worker that exits on its own while starting (a broken interpreter, a missing
# module) is not retried: starting another one would fail the same way.
_KILLED_FROM_OUTSIDE = frozenset(
    -sig for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
)


async def start_worker(script: str, *, nice: int, start_timeout: float, live: set[Worker]) -> Worker:
    """Start one worker process and wait until it answered INIT; it is in ``live`` until reaped.

    A worker killed by a signal while starting (SIGKILL, SIGTERM, SIGINT, SIGHUP, SIGQUIT) is
    replaced by a new one at once, as often as it takes within ``start_timeout``.
    ``ExecutorUnavailable`` when a worker exits by itself while starting, or when no worker
    started within ``start_timeout`` seconds.
    """
    attempts = 0
    with anyio.move_on_after(start_timeout) as scope:
        while True:
            attempts += 1
            started = await _start_once(script, nice, live)
            if isinstance(started, Worker):
                return started
            pid, returncode = started
            if returncode not in _KILLED_FROM_OUTSIDE:
                raise ExecutorUnavailable(
                    f"worker process {pid} died while starting ({exit_description(returncode)}); its "
                    f"stderr says why ({sys.executable} {script})"
                )
    assert scope.cancelled_caught
    raise ExecutorUnavailable(
        f"no worker process started within start_timeout={start_timeout} s ({attempts} attempt(s), "
        f"{sys.executable} {script}); the machine may be overloaded: raise start_timeout"
    )


async def _start_once(script: str, nice: int, live: set[Worker]) -> Worker | tuple[int, int | None]:
    """A started worker, or the pid and exit code of one that died while starting."""
    # The worker's stdin and stdout; os.pipe() gives descriptors that no other child inherits.
    to_worker, to_worker_w = os.pipe()
    from_worker_r, from_worker = os.pipe()
    try:
        # Shielded: a process spawned by a start that is cancelled meanwhile would be nobody's to
        # reap (it becomes a Worker, in ``live``, only once open_process returns).
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                [sys.executable, script, str(os.getpid()), str(nice)],
                stdin=to_worker,
                stdout=from_worker,
                stderr=None,
            )
    except BaseException:
        for fd in (to_worker_w, from_worker_r):
            os.close(fd)
        raise
    finally:
        os.close(to_worker)
        os.close(from_worker)
    worker = Worker(process, _Pipes(from_worker_r, to_worker_w), live)
    ok = False
    try:
        init = pickle.dumps(list(sys.path), protocol=5)
        await worker.send([wire.HEADER.pack(wire.INIT, 0, len(init)), init])
        kind, _ = await worker.receive()
        if kind != wire.READY:  # pragma: no cover - a worker of another version
            raise WorkerCrashed(f"worker process {worker.pid} answered INIT with frame kind {kind}")
        ok = True
    except PIPE_ERRORS:
        await worker.wait_exit()
        return worker.pid, worker.process.returncode
    finally:
        if not ok:
            await worker.reap()
    return worker
