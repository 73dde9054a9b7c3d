"""A fork server: one process that has imported what workers need, and forks each worker.

A fresh worker interpreter pays its start and its imports (microbatch's line code, ``cloudpickle``
for a function from ``__main__``) before its first batch; with ``PYTHONDONTWRITEBYTECODE`` it also
compiles them. The fork server pays that once: it is the worker script run with ``fork-server``
(:func:`microbatch.executors.worker.serve_forks`), started as a worker is (its own session,
niced, dying with this process), and each worker is then a ``fork()`` of it: a copy of a process
that never ran an event loop nor a thread, never of this (threaded, event-loop) process.

Here is the parent's side: :class:`ForkServer` sends FORK with the new worker's two pipe ends
(``SCM_RIGHTS`` on a Unix socket) and reads what the server reports: the pid of each worker it
forked, and the exit code of each worker that ended (which this process, not their parent, could
not learn otherwise). :class:`ForkedProcess` is a worker's stand-in for ``anyio.abc.Process``:
``pid``, ``returncode`` and ``wait()``.

A forked worker leads its own session and process group, dies with the server (which dies with
this process), catches SIGINT and SIGTERM as a spawned one does, and closes the server's
descriptors: every guarantee of :mod:`microbatch.executors.spawn` holds. If the server dies
(killed from outside), its workers die with it (``PR_SET_PDEATHSIG``): each counts as killed by
SIGKILL as soon as the server's end of file is seen, so that no call is sent to one of them, and
the executor starts a new server for the next worker.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

import anyio

from . import worker as wire
from .pipes import PIPE_ERRORS, _Pipes
from .spawn import ProcessLike, start_process

__all__ = [
    "PRELOAD", "ForkServer", "ForkedProcess", "ServerGone", "ServerHolder", "available", "start_fork_server",
]

#: What the server imports before it forks: what unpickling a pipeline's task needs in a worker
#: (the task of a run with shard owners too), and ``cloudpickle`` (functions defined in
#: ``__main__`` travel by value).
PRELOAD = (
    "microbatch._core.splittask", "microbatch._core.owners", "microbatch.executors.remote", "cloudpickle",
)


#: Seconds the server may take to answer a FORK (it forks at once) before it counts as gone.
FORK_ANSWER_TIMEOUT = 30.0


class ServerGone(Exception):
    """The fork server died (killed from outside): start another one."""


class ForkedProcess:
    """A worker forked by the server: ``pid``, ``returncode`` (None while it runs) and ``wait()``."""

    __slots__ = ("server", "pid", "ended", "_code")

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.ended = False  # waited for: the server may reap it
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        """The exit code once the server reported it (what it sent is taken without waiting);
        ``-SIGKILL`` once the server is gone without reporting it: the worker died with it."""
        if self.ended:
            return self._code
        server = self.server
        server.poll()
        code = server.exit_code(self.pid)
        return -signal.SIGKILL if code is None and server.gone else code

    async def wait(self) -> int | None:
        """Wait until the process ended; its exit code (``-SIGKILL``: it died with its server).
        Several tasks may wait at once."""
        await self.server.wait_exit(self)
        if not self.ended:
            self.ended = True
            code = self.server.release(self.pid)
            self._code = -signal.SIGKILL if code is None else code
        return self._code


class ForkServer:
    """The parent's side of a running fork server, ``process`` (see the module docstring).

    ``sock`` is this process's end of the server's socket; the frames it reads are
    ``worker.FORK_FRAME``s (whole ones only: a cancelled read loses nothing). One task reads at a
    time; what it reads for another is kept for it.
    """

    def __init__(self, process: ProcessLike, sock: socket.socket, pipes: _Pipes) -> None:
        self.process = process
        self.pid: int = process.pid
        self.sock = sock
        self.pipes = pipes
        self.gone = False
        self._exits: dict[int, int | None] = {}
        self._forked: list[int] = []  # pids, or -errno, in the order of the FORK requests
        self._reading = anyio.Lock()
        self._forking = anyio.Lock()

    async def fork(self, to_worker: int, from_worker: int) -> ForkedProcess:
        """A new worker reading ``to_worker`` and writing ``from_worker`` (sent, not closed here).

        ``ServerGone`` when the server died; ``OSError`` when it could not fork.
        """
        async with self._forking:
            await self._send(wire.FORK_FRAME.pack(wire.FORK, 0, 0), [to_worker, from_worker])
            # The server answers each FORK in order, at once: the answer to this one is taken even
            # when the start is cancelled meanwhile, else the next FORK would take it as its own.
            with anyio.CancelScope(shield=True), anyio.move_on_after(FORK_ANSWER_TIMEOUT):
                await self._read_until(lambda: bool(self._forked))
            if not self._forked:
                self.gone = True  # no answer: a server that does not answer is as good as gone
                raise ServerGone
            pid = self._forked.pop(0)
        if pid < 0:
            raise OSError(-pid, f"the fork server {self.pid} could not fork a worker: {os.strerror(-pid)}")
        return ForkedProcess(self, pid)

    async def wait_exit(self, process: ForkedProcess) -> None:
        """Return once ``process`` ended (or the server died)."""
        await self._read_until(lambda: process.ended or process.pid in self._exits or self.gone)

    def exit_code(self, pid: int) -> int | None:
        """The exit code the server reported for ``pid`` (None: not yet)."""
        return self._exits.get(pid)

    def poll(self) -> None:
        """Take the frames the server has sent, without waiting; nothing while a task reads (it
        takes them, and would not see them taken)."""
        while not self.gone and not self._reading.locked():
            try:
                data = os.read(self.pipes.read_fd, 1 << 12)
            except BlockingIOError:
                return
            except OSError:
                self.gone = True
                return
            if not data:  # end of file: the server died (its workers with it)
                self.gone = True
                return
            self.pipes.feed(data)
            while (frame := self.pipes.take_frame(wire.FORK_FRAME.size)) is not None:
                self._take(frame)

    def release(self, pid: int) -> int | None:
        """The exit code of ``pid``, which ended (None: the server died, it is unknown); the server
        may reap it now (its pid may then be given to another process)."""
        code = self._exits.pop(pid, None)
        if not self.gone:
            try:
                self.sock.send(wire.FORK_FRAME.pack(wire.RELEASE, pid, 0))
            except OSError:  # full (never with frames this small) or gone: it is reaped at its end
                pass
        return code

    async def _send(self, frame: bytes, fds: list[int]) -> None:
        while True:
            if self.gone:
                raise ServerGone
            try:
                socket.send_fds(self.sock, [frame], fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
            except OSError as exc:
                self.gone = True
                raise ServerGone from exc

    async def _read_until(self, done: Any) -> None:
        while not done():
            async with self._reading:
                if done():
                    return
                if self.gone:
                    raise ServerGone
                try:
                    frame = await self.pipes.receive_exactly(wire.FORK_FRAME.size)
                except PIPE_ERRORS:
                    self.gone = True
                    continue
                self._take(frame)

    def _take(self, frame: bytes) -> None:
        kind, pid, value = wire.FORK_FRAME.unpack(frame)
        if kind == wire.EXITED:
            self._exits[pid] = value
        elif kind == wire.FORKED:
            self._forked.append(pid)
        else:
            self._forked.append(-value or -1)

    async def close(self) -> None:
        """Stop the server (its workers were reaped); never cancelled."""
        with anyio.CancelScope(shield=True):
            self.gone = True
            self.pipes.close()
            self.sock.close()  # end of file for the server: it exits
            with anyio.move_on_after(2.0):
                await self.process.wait()
            if self.process.returncode is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                await self.process.wait()


class ServerHolder:
    """The fork server of an executor's ``async with`` block: started when first needed, again
    after it died, stopped when the block is left."""

    def __init__(self) -> None:
        self.server: ForkServer | None = None
        self._lock: anyio.Lock | None = None

    async def get(self, script: str, *, nice: int, start_timeout: float) -> ForkServer:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            server = self.server
            if server is None or server.gone:
                self.server = None
                if server is not None:
                    await server.close()
                server = self.server = await start_fork_server(script, nice=nice, start_timeout=start_timeout)
            return server

    async def close(self) -> None:
        server, self.server, self._lock = self.server, None, None
        if server is not None:
            await server.close()


async def start_fork_server(script: str, *, nice: int, start_timeout: float) -> ForkServer:
    """Start a fork server running ``script`` (the worker script) and wait until it has imported
    ``PRELOAD``; as a worker starts (``spawn.start_process``: retried when killed while starting,
    ``ExecutorUnavailable`` when it exits by itself or does not start within ``start_timeout``)."""
    socks: list[socket.socket] = []

    async def launch() -> tuple[ProcessLike, _Pipes]:
        for old in socks:  # of an attempt that did not start
            old.close()
        ours, theirs = socket.socketpair()
        socks[:] = [ours]
        try:
            with anyio.CancelScope(shield=True):  # a started process is always reaped
                process = await anyio.open_process(
                    [sys.executable, script, str(os.getpid()), str(nice), wire.FORK_SERVER],
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=None,
                    start_new_session=True,
                )
        finally:
            theirs.close()
        return process, _Pipes(os.dup(ours.fileno()), os.dup(ours.fileno()))

    try:
        server = await start_process(
            launch, start_timeout=start_timeout, live=set(), settings={"preload": PRELOAD},
            what=f"fork server process ({sys.executable} {script} {wire.FORK_SERVER})",
        )
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return ForkServer(server.process, socks[0], server.pipes)


def available() -> bool:
    """Whether workers are forked from a server here: Linux (``fork`` after imports is safe there;
    on macOS libraries may not survive it)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")
