"""``ProcessExecutor``: a pool of worker processes, each call isolated in one of them.

The protocol every executor follows is in :mod:`microbatch.executors.base`; the worker's side of the
pipes is :mod:`microbatch.executors.worker`. What happens to each call of a worker (answered, sent
again, failed, abandoned) is decided by its call queue, :mod:`microbatch._core.calls`; this module
does the I/O that the queue's steps ask for.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .._core.calls import Call, CallState
from .._core.params import callable_name, check_bytes
from .._exceptions import BatchTimeout, ExecutorError, ResultTooLarge, WorkerCrashed
from . import forkserver, remote
from . import worker as wire
from .base import FunctionCache, check_timeout
from .forkserver import ForkServer, ServerGone
from .pipes import PIPE_ERRORS
from .pool import Slot, WorkerPool, check_open
from .recycling import Recycling
from .spawn import Worker, exit_description, start_worker
from .streaming import STREAM_AT, receive_streamed

__all__ = ["ProcessExecutor"]

A = TypeVar("A")
R = TypeVar("R")

# The script a worker process runs (tests start workers through a wrapper by replacing it).
_WORKER_SCRIPT = wire.__file__
# Workers are forked from a fork server where it is available (tests of spawned workers turn it off).
_FORK_SERVER = True
# Fork servers started for one worker start before it is spawned instead.
_SERVER_STARTS = 3


class ProcessExecutor(WorkerPool):
    """A pool of worker processes; each call runs in one worker, isolated from the others.

    ``workers`` processes (default ``os.cpu_count()``) are started together when the executor is
    entered (``async with ProcessExecutor(2) as executor``), so the first calls do not wait for
    Python to start. ``capacity`` equals ``workers``; further calls wait, first come first served.
    On Linux they are forked from a fork server that the executor starts first and that has
    imported what workers need once (:mod:`microbatch.executors.forkserver`); elsewhere each is a
    fresh interpreter.

    A worker receives ``fn`` once (pickled with cloudpickle, cached per worker, the 32 most recently
    used functions) and then, per call, only ``pickle.dumps(arg, protocol=5)``; the result comes
    back pickled. Workers get the parent's ``sys.path`` so functions from the user's modules import;
    functions from ``__main__`` travel by value. A worker's stdout goes to stderr.

    Failures concern one call only; other calls in flight go on:

    - ``fn`` raises: the same exception is raised here, its ``__cause__`` a ``RemoteTraceback``
      holding the worker's traceback; the worker stays. An exception that cannot be pickled back
      (or ``SystemExit``/``KeyboardInterrupt``) becomes ``RemoteError`` with the same cause.
    - the worker dies (``os._exit``, a signal, a segfault, the OOM killer): ``WorkerCrashed``
      naming the pid and the exit code or signal.
    - the call runs past ``timeout`` seconds: the worker is killed, ``BatchTimeout`` is raised.
    - the result, pickled, is over ``max_result_bytes`` (default 64 MiB; bytes or a string such as
      ``"256MB"``): the worker does not send it and stays, ``ResultTooLarge`` names the size.
    - the caller is cancelled: the worker is killed, the cancellation goes on.
    - ``fn`` cannot be pickled: ``UnpicklableFunction`` before anything is sent.

    A killed or dead worker is replaced by a new one when the next call needs it (counted in
    ``restarts``). A worker killed by a signal while it starts is replaced at once; one that exits
    by itself while starting, or no start within ``start_timeout`` (default 60 s), fails the call
    with ``ExecutorUnavailable``. Counters ``crashes``, ``timeouts`` and ``restarts`` only grow.

    Workers run at a lower scheduling priority than the process that feeds them (``nice``, added
    to their niceness; default 10, Unix only), so that a worker that finished its batch gets its
    next one at once (docs/executors.md has the figures). Pass ``nice=0`` when the machine's other
    work should not outrank the workers.

    Each worker holds up to ``prefetch`` calls (default 1) queued in its pipe behind the one it
    runs, so that it starts the next call as soon as it sent a result, without a round trip through
    the event loop; ``run`` then takes ``workers * (1 + prefetch)`` calls at once, further calls
    wait. A queued call's ``timeout`` counts from when it starts (the answer before it arrived).
    When the running call crashes, times out or is cancelled, the calls queued behind it are sent
    to another worker: they never started, so it counts as no failure of theirs. When the caller of
    a queued call is cancelled, the running call finishes; then the worker is replaced.

    A worker can be replaced while alive and well, to bound what leaks in ``fn`` (or in the
    libraries it calls) can pile up: after ``max_tasks_per_worker`` calls, or after a call that
    left its resident memory above ``max_worker_memory`` (bytes, or a string such as ``"512MB"``
    or ``"1.5GiB"``; measured by the worker itself). Such a worker takes no new call, runs those
    already queued in its pipe, then is stopped (counted in ``recycled``, not in ``restarts``); the
    next call for its place starts a new one. No call is lost, run twice or counted as failed.

    The executor can be entered again after it was left, with a fresh pool of workers, so a
    pipeline holding one can run more than once; it serves one ``async with`` block at a time.

    A result of 1 MiB or more is unpickled while it is read from the pipe (in a thread), so this
    process holds the result and never its pickled bytes besides.

    Each worker leads a process group of its own, which holds the processes ``fn`` starts; killing
    a worker (timeout, crash, cancellation, shutdown) kills its group. Leaving the ``async with``
    block, normally, on an error or on cancellation, kills every worker's group with SIGKILL and
    waits for the worker, shielded from cancellation, also when a worker hangs: no process is left
    behind. Workers also die when the parent process dies, even by SIGKILL (Linux: at once,
    through ``PR_SET_PDEATHSIG``; elsewhere within about 0.2 s, through a thread watching the parent).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_timeout: float = 60.0,
        nice: int = 10,
        prefetch: int = 1,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        max_result_bytes: int | str = 64 << 20,
    ) -> None:
        super().__init__(
            workers,
            start_timeout=start_timeout,
            nice=nice,
            prefetch=prefetch,
            recycling=Recycling(max_tasks_per_worker, max_worker_memory),
        )
        self.max_result_bytes = check_bytes("max_result_bytes", max_result_bytes)
        self._functions = FunctionCache(wire.FN_CACHE_SIZE)
        self._servers = forkserver.ServerHolder()

    def __repr__(self) -> str:
        counts = (
            f"crashes={self.crashes} timeouts={self.timeouts} restarts={self.restarts} "
            f"recycled={self.recycled}"
        )
        return f"<ProcessExecutor workers={self.capacity} {self._state} live={len(self._live)} {counts}>"

    async def _start(self) -> Worker:
        settings = {"measure_rss": self.recycling.measures_memory, "max_result_bytes": self.max_result_bytes}
        # A fork server that dies (killed from outside) is replaced; after a few, workers are spawned.
        for _ in range(_SERVER_STARTS):
            server = await self._fork_server()
            try:
                return await start_worker(_WORKER_SCRIPT, nice=self.nice, start_timeout=self.start_timeout,
                                          live=self._live, settings=settings, server=server)
            except ServerGone:
                continue
        return await start_worker(_WORKER_SCRIPT, nice=self.nice, start_timeout=self.start_timeout,
                                  live=self._live, settings=settings)

    async def _fork_server(self) -> ForkServer | None:
        """The fork server workers start from; None where workers are spawned."""
        if not (_FORK_SERVER and forkserver.available()):
            return None
        return await self._servers.get(_WORKER_SCRIPT, nice=self.nice, start_timeout=self.start_timeout)

    async def _shutdown(self) -> None:
        await super()._shutdown()  # every worker reaped: the fork server has none left
        await self._servers.close()

    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` in a worker process and return its result; see the class docstring."""
        check_timeout(timeout)
        check_open(self._state)
        pickled = self._functions.get(fn)
        payload = pickle.dumps(arg, protocol=5)
        async with self._limit:
            while True:
                check_open(self._state)
                # The fewest calls first; among equals a live worker (starting one takes time).
                # The limit leaves a slot with room: fewer than 1 + prefetch calls.
                slot = min(self._pool, key=lambda s: (s.load, s.worker is None or not s.worker.queue.open))
                slot.load += 1
                try:
                    sent = await self._send(slot, pickled, payload)
                    if sent is not None:
                        result: R = await self._await_answer(slot, *sent, fn, timeout)
                        return result
                finally:
                    slot.load -= 1
                    if self._state != "open" and slot.worker is not None:
                        # The executor was closed while this call ran (or started its worker).
                        await slot.worker.reap()
                # The worker was lost before it started this call: send it again (rule 3).

    async def _await_answer(
        self,
        slot: Slot,
        worker: Worker,
        call: Call,
        loads_fn: bool,
        fn: Callable[..., Any],
        time_limit: float | None,
    ) -> Any:
        """Read the answer of ``call``, the one its worker runs now."""
        answered = False
        loading = loads_fn
        try:
            if loads_fn:
                # Unpickling fn imports its module, which a fresh worker may have to compile: that
                # is bounded by start_timeout, not by the call's own time limit.
                with anyio.move_on_after(self.start_timeout):
                    kind, _ = await worker.receive()
                    if kind != wire.LOADED:  # pragma: no cover - a worker of another version
                        raise ExecutorError(f"worker process {worker.pid} sent frame kind {kind}, not LOADED")
                    loading = False
            if not loading:
                # The time limit counts from when the worker started this call: the previous
                # answer (or LOADED) came in.
                arrived = False
                with anyio.move_on_after(time_limit if time_limit is not None else float("inf")):
                    kind, rss, size = await worker.receive_header()
                    arrived = True
                if arrived:
                    outcome = await self._read_outcome(worker, kind, size, fn)
                    answered = True
        except PIPE_ERRORS:
            self._perform(worker, worker.queue.died())
            await worker.wait_exit()
            if self._state == "open":
                self.crashes += 1
            raise _crash_error(worker, fn, closed=self._state != "open") from None
        finally:
            if not answered and call.state is CallState.RUNNING:  # timed out or cancelled
                self._perform(worker, worker.queue.stopped())
                await worker.reap()
        if not answered:
            self.timeouts += 1
            limit = self.start_timeout if loading else None
            raise _timeout_error(worker, fn, time_limit, loading=limit) from None
        answer, step = worker.queue.answered()
        assert answer is call
        self._perform(worker, step)
        if worker.queue.open and self.recycling.too_big(rss):
            self._retire(slot, worker)
        if step.kill or worker.queue.drained:
            # The worker now runs a call whose caller is gone: it was killed; wait for it. Or it
            # was retired and answered its last call: stop it.
            await worker.reap()
        if isinstance(outcome, BaseException):
            raise outcome
        return remote.unwrap(outcome, fn)

    async def _read_outcome(
        self, worker: Worker, kind: int, size: int, fn: Callable[..., Any]
    ) -> tuple[Any, ...] | BaseException:
        """The outcome in an answer whose header came in, or the error to raise for it; a large
        result is unpickled as it is read (``streaming``), one over ``max_result_bytes`` not read."""
        limit = self.max_result_bytes
        if size > limit:  # the worker checks before it sends: this one is of another version
            raise ResultTooLarge(
                f"worker process {worker.pid} sent an answer of {size} bytes for {callable_name(fn)}, "
                f"over max_result_bytes={limit}; it was killed without reading it",
                size,
                limit,
            )
        if kind == wire.TOO_LARGE:
            refused, _ = pickle.loads(await worker.pipes.receive_exactly(size))
            return ResultTooLarge(
                f"{callable_name(fn)} returned a result of {refused} bytes pickled, over "
                f"max_result_bytes={limit}; worker process {worker.pid} did not send it. Return "
                f"less per batch (smaller batches; large outputs written to files, their names "
                f"returned), or raise max_result_bytes",
                refused,
                limit,
            )
        if kind == remote.RESULT and size >= STREAM_AT:
            return await receive_streamed(worker.pipes, kind, size, fn)
        body = await worker.pipes.receive_exactly(size)
        try:
            return remote.decode(kind, body, fn)
        except ExecutorError as exc:  # raised once the call queue took the answer
            return exc


def _crash_error(worker: Worker, fn: Callable[..., Any], *, closed: bool) -> WorkerCrashed:
    """The error of a call whose worker died, naming the worker, fn and how the process ended."""
    how = exit_description(worker.process.returncode)
    if closed:
        return WorkerCrashed(
            f"worker process {worker.pid} was killed while running {callable_name(fn)} because the "
            f"executor was closed ({how})"
        )
    return WorkerCrashed(
        f"worker process {worker.pid} died while running {callable_name(fn)} ({how}); a signal such "
        f"as SIGSEGV points at a C extension, SIGKILL often at the out-of-memory killer"
    )


def _timeout_error(
    worker: Worker, fn: Callable[..., Any], time_limit: float | None, *, loading: float | None
) -> BatchTimeout:
    """The error of a call whose worker was killed for taking too long (``loading``: to load fn)."""
    if loading is not None:
        return BatchTimeout(
            f"loading {callable_name(fn)} in worker process {worker.pid} (unpickling it, importing its "
            f"module) took longer than start_timeout={loading} s; the worker was killed"
        )
    return BatchTimeout(
        f"{callable_name(fn)} ran longer than timeout={time_limit} s in worker process "
        f"{worker.pid}; the worker was killed (raise the timeout or make the batches smaller)"
    )
