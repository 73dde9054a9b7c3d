"""Worker processes of ``ProcessExecutor``: starting one, killing it, waiting for it.

A worker is ``python WORKER_SCRIPT PARENT_PID NICE`` with two pipes as its stdin and stdout (see
:mod:`microbatch.executors.worker` for its side). Nothing here decides what happens to calls: the
call queue (:mod:`microbatch._core.calls`) does, the executor performs it.

Each worker leads a session and process group of its own (``start_new_session``): a Ctrl-C in the
terminal reaches the pipeline process, not the workers, and killing a worker kills its whole group,
so the processes ``fn`` started die with the worker that ran it (after a timeout, a crash, a
cancellation or the executor's shutdown). A process that ``fn`` started and that left the group on
purpose (``setsid``, ``start_new_session=True``) is its own business.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from .._core.calls import CallQueue
from .._exceptions import ExecutorUnavailable, WorkerCrashed
from . import worker as wire
from .pipes import PIPE_ERRORS, _Pipes

if TYPE_CHECKING:
    from .forkserver import ForkServer

__all__ = ["Launch", "ProcessLike", "Worker", "exit_description", "start_process", "start_worker"]


class ProcessLike(Protocol):
    """What a worker's process is: an ``anyio.abc.Process``, or a ``forkserver.ForkedProcess``."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int | None: ...


#: Starts one process that speaks the worker protocol: the process and the parent's ends of its pipes.
Launch = Callable[[], Awaitable[tuple[ProcessLike, _Pipes]]]

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

    def __init__(self, process: ProcessLike, pipes: _Pipes, live: set[Worker]) -> None:
        self.process = process
        # The executor's workers not reaped yet; this one leaves it once reaped.
        self.live = live
        live.add(self)
        self.pid = process.pid
        self.pipes = pipes
        # Tokens of the functions this worker holds, least recently used first (mirrors the worker).
        self.functions: OrderedDict[int, None] = OrderedDict()
        self.queue = CallQueue()
        # Sent SIGKILL to the group already: a second kill is useless.
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
        """The next frame, a small one (READY, LOADED): its kind and its body."""
        kind, _, size = await self.receive_header()
        return kind, await self.pipes.receive_exactly(size)

    async def receive_header(self) -> tuple[int, int, int]:
        """The next frame's kind, token (for an answer: the worker's RSS) and body size."""
        kind, token, size = wire.HEADER.unpack(await self.pipes.receive_exactly(wire.HEADER.size))
        return kind, token, size

    def kill(self) -> None:
        """Send SIGKILL, once, to the worker's process group: the worker and what ``fn`` started.

        Also after the worker exited by itself (a crash): the processes it left in its group die
        too. The group's id is the worker's pid, which the system gives no other process while any
        member of the group is alive; once the group is empty the kill finds nothing (``ESRCH``).
        ``os.killpg`` rather than ``Popen.send_signal()``, which on asyncio polls first and may reap
        the process behind the event loop's child watcher.
        """
        if self.killed:
            return
        self.killed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is empty (macOS: only zombies)
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
# out-of-memory killer, a service manager's stop that arrived before the worker could catch it. A
# worker that exits on its own while starting (a broken interpreter, a missing module) is not
# retried: starting another one would fail the same way.
_KILLED_FROM_OUTSIDE = frozenset(
    -sig for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
)


async def start_worker(
    script: str,
    *,
    nice: int,
    start_timeout: float,
    live: set[Worker],
    settings: dict[str, Any],
    server: ForkServer | None = None,
) -> Worker:
    """Start one worker process and wait until it answered INIT; it is in ``live`` until reaped.

    ``server``: fork it from that fork server (``ServerGone`` when the server died); else run
    ``script`` in a fresh interpreter. ``settings`` go with INIT (see :func:`start_process`).
    """

    async def launch() -> tuple[ProcessLike, _Pipes]:
        return await _launch(script, nice, server)

    return await start_process(launch, start_timeout=start_timeout, live=live, settings=settings,
                               what=f"worker process ({sys.executable} {script})")


async def start_process(
    launch: Launch, *, start_timeout: float, live: set[Worker], settings: dict[str, Any], what: str
) -> Worker:
    """Start a process with ``launch`` and wait until it answered INIT (``settings``, besides the
    parent's ``sys.path``, see ``worker.py``); it is in ``live`` until reaped. ``what`` names it.

    A process killed by a signal while starting (SIGKILL, SIGTERM, SIGINT, SIGHUP, SIGQUIT) is
    replaced by a new one at once, as often as it takes within ``start_timeout``.
    ``ExecutorUnavailable`` when one exits by itself while starting, or when none started within
    ``start_timeout`` seconds.
    """
    attempts = 0
    noun, _, command = what.partition(" (")
    with anyio.move_on_after(start_timeout) as scope:
        while True:
            attempts += 1
            started = await _start_once(launch, live, settings)
            if isinstance(started, Worker):
                return started
            pid, returncode = started
            if returncode not in _KILLED_FROM_OUTSIDE:
                raise ExecutorUnavailable(
                    f"{noun} {pid} died while starting ({exit_description(returncode)}); its "
                    f"stderr says why ({command}"
                )
    assert scope.cancelled_caught
    raise ExecutorUnavailable(
        f"no {noun} started within start_timeout={start_timeout} s ({attempts} attempt(s), "
        f"{command}; the machine may be overloaded: raise start_timeout"
    )


async def _launch(script: str, nice: int, server: ForkServer | None) -> tuple[ProcessLike, _Pipes]:
    """A worker process, forked by ``server`` or running ``script``, and the parent's pipe ends."""
    # The worker's stdin and stdout; os.pipe() gives descriptors that no other child inherits.
    to_worker, to_worker_w = os.pipe()
    from_worker_r, from_worker = os.pipe()
    process: ProcessLike
    try:
        # Shielded: a process started by a call that was then cancelled would be nobody's to kill.
        with anyio.CancelScope(shield=True):
            if server is not None:
                try:
                    process = await server.fork(to_worker, from_worker)
                except OSError as exc:  # no fork (a full process table, no memory): as no spawn
                    raise ExecutorUnavailable(str(exc)) from exc
            else:
                process = await anyio.open_process(
                    [sys.executable, script, str(os.getpid()), str(nice)],
                    stdin=to_worker,
                    stdout=from_worker,
                    stderr=None,
                    start_new_session=True,
                )
    except BaseException:
        for fd in (to_worker_w, from_worker_r):
            os.close(fd)
        raise
    finally:
        os.close(to_worker)
        os.close(from_worker)
    return process, _Pipes(from_worker_r, to_worker_w)


async def _start_once(
    launch: Launch, live: set[Worker], settings: dict[str, Any]
) -> Worker | tuple[int, int | None]:
    """A started process, or the pid and exit code of one that died while starting."""
    process, pipes = await launch()
    worker = Worker(process, pipes, live)
    ok = False
    try:
        init = pickle.dumps({**settings, "path": list(sys.path)}, protocol=5)
        await worker.send([wire.HEADER.pack(wire.INIT, 0, len(init)), init])
        kind, _ = await worker.receive()
        if kind != wire.READY:  # pragma: no cover - a worker of another version
            raise WorkerCrashed(f"process {worker.pid} answered INIT with frame kind {kind}")
        ok = True
    except PIPE_ERRORS:
        await worker.wait_exit()
        return worker.pid, worker.process.returncode
    finally:
        if not ok:
            await worker.reap()
    return worker
