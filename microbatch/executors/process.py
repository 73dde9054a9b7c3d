"""``ProcessExecutor``: a pool of worker processes, each call isolated in one of them.

The protocol every executor follows is in :mod:`microbatch.executors.base`; the worker's side of the
pipes is :mod:`microbatch.executors.worker`.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections import OrderedDict, deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc

from .._exceptions import (
    BatchTimeout,
    ExecutorError,
    ExecutorUnavailable,
    RemoteError,
    RemoteTraceback,
    WorkerCrashed,
)
from . import worker as wire
from .base import Executor, FunctionCache, _name, check_picklable, check_timeout
from .inline import InlineExecutor
from .pipes import PIPE_ERRORS as _PIPE_ERRORS
from .pipes import _Pipes
from .thread import ThreadExecutor

# Executor, InlineExecutor, ThreadExecutor and check_picklable are re-exported for older imports.
__all__ = ["Executor", "InlineExecutor", "ProcessExecutor", "ThreadExecutor", "check_picklable"]

A = TypeVar("A")
R = TypeVar("R")

_WORKER_SCRIPT = wire.__file__
# After a worker's pipe reached end of file, how long to wait for its exit code before killing it.
_EXIT_GRACE = 2.0


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {returncode})"
    return f"exit code {returncode}"


class _Call:
    """A call sent to a worker. Answers come in the order calls were sent, so a call is answered
    only after every call ahead of it in its worker's ``calls``."""

    __slots__ = ("turn", "resend", "abandoned")

    def __init__(self, first: bool) -> None:
        # For a call sent behind others: set when its answer is the next one on the pipe, or when
        # it must be sent again. A call sent to an idle worker is first from the start.
        self.turn = None if first else anyio.Event()
        # Its worker died before starting it: it goes to another worker, not counted as a failure.
        self.resend = False
        # Its caller was cancelled while it waited behind another call.
        self.abandoned = False


class _Worker:
    """One worker process: runs one call at a time, and may hold more sent calls queued behind it."""

    __slots__ = ("process", "pid", "pipes", "functions", "calls", "failed", "killed")

    def __init__(self, process: anyio.abc.Process, pipes: _Pipes) -> None:
        self.process = process
        self.pid = process.pid
        self.pipes = pipes
        # Tokens of the functions this worker holds, least recently used first (mirrors the worker).
        self.functions: OrderedDict[int, None] = OrderedDict()
        # Calls sent and not answered yet, in the order they were sent; calls[0] runs now.
        self.calls: deque[_Call] = deque()
        # Dead, killed, or its pipe is out of step: never sent another call.
        self.failed = False
        # Sent SIGKILL already. A second kill is not only useless: on asyncio, Popen.send_signal()
        # polls first and may reap the process behind the event loop's child watcher.
        self.killed = False

    def retire(self) -> None:
        """Take no more calls; the calls queued behind the running one are sent again elsewhere."""
        self.failed = True
        calls = list(self.calls)
        self.calls.clear()
        for call in calls[1:]:
            call.resend = True
            assert call.turn is not None
            call.turn.set()

    async def send(self, buffers: list[bytes]) -> None:
        await self.pipes.send(buffers)

    async def receive(self) -> tuple[int, bytes]:
        kind, _token, size = wire.HEADER.unpack(await self.pipes.receive_exactly(wire.HEADER.size))
        return kind, await self.pipes.receive_exactly(size)


class _Slot:
    """A place in the pool for one worker process, started when first needed and after a failure."""

    __slots__ = ("worker", "load", "lock")

    def __init__(self) -> None:
        self.worker: _Worker | None = None
        # Calls assigned to this slot: sent, or about to be.
        self.load = 0
        # Held while starting the slot's worker and while sending to it, so calls reach the pipe
        # in the order of ``worker.calls``.
        self.lock = anyio.Lock(fast_acquire=True)


class ProcessExecutor:
    """A pool of worker processes; each call runs in one worker, isolated from the others.

    ``workers`` processes (default ``os.cpu_count()``) are started together when the executor is
    entered (``async with ProcessExecutor(2) as executor``), so the first calls do not wait for
    Python to start. ``capacity`` equals ``workers``; further calls wait, first come first served.

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
    - the caller is cancelled: the worker is killed, the cancellation goes on.
    - ``fn`` cannot be pickled: ``UnpicklableFunction`` before anything is sent.

    A killed or dead worker is replaced by a new one when the next call needs it (counted in
    ``restarts``); ``start_timeout`` (default 60 s) bounds how long a start may take, beyond which
    the call fails with ``WorkerCrashed``. Counters ``crashes``, ``timeouts`` and ``restarts`` only
    grow.

    Workers run at a lower scheduling priority than the process that feeds them (``nice``, added
    to their niceness; default 10, Unix only): when workers and the event loop share the CPUs, a
    worker that finished its batch gets its next one at once instead of waiting for the event loop
    to be scheduled (1.22x -> 1.38x the one-process loop on the 2-core sum benchmark). On a machine
    whose other work should not outrank the workers, pass ``nice=0``.

    Each worker holds up to ``prefetch`` calls (default 1) queued in its pipe behind the one it
    runs, so that it starts the next call as soon as it sent a result, without a round trip through
    the event loop; ``run`` then takes ``workers * (1 + prefetch)`` calls at once, further calls
    wait. A queued call's ``timeout`` counts from when it starts (the answer before it arrived).
    When the running call crashes, times out or is cancelled, the calls queued behind it are sent
    to another worker: they never started, so it counts as no failure of theirs. When the caller of
    a queued call is cancelled, the running call finishes; then the worker is replaced.

    The executor can be entered again after it was left, with a fresh pool of workers, so a
    pipeline holding one can run more than once; it serves one ``async with`` block at a time.

    Leaving the ``async with`` block, normally, on an error or on cancellation, kills every worker
    with SIGKILL and waits for it, shielded from cancellation, also when a worker hangs: no process
    is left behind. Workers also die when the parent process dies, even by SIGKILL (Linux: at once,
    through ``PR_SET_PDEATHSIG``; elsewhere within about 0.2 s, through a thread watching the parent).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_timeout: float = 60.0,
        nice: int = 10,
        prefetch: int = 1,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer or None (one per CPU), got {workers!r}")
        if not start_timeout > 0:
            raise ValueError(f"start_timeout must be a positive number of seconds, got {start_timeout!r}")
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(
                f"nice must be an int from 0 to 19 (added to the workers' niceness), got {nice!r}"
            )
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(
                f"prefetch must be an int >= 0 (calls queued in each worker behind the one it runs), "
                f"got {prefetch!r}"
            )
        self.capacity = workers
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self.nice = nice
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self._pool: list[_Slot] = []
        self._live: set[_Worker] = set()
        self._limit = anyio.Semaphore(workers * (1 + prefetch), fast_acquire=True)
        self._functions = FunctionCache(wire.FN_CACHE_SIZE)
        self._state = "new"

    def __repr__(self) -> str:
        return (
            f"<ProcessExecutor workers={self.capacity} {self._state} live={len(self._live)} "
            f"crashes={self.crashes} timeouts={self.timeouts} restarts={self.restarts}>"
        )

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes alive now (for monitoring and tests)."""
        return sorted(worker.pid for worker in self._live)

    async def __aenter__(self) -> ProcessExecutor:
        if self._state == "open":
            raise RuntimeError(
                "this ProcessExecutor is already running: it serves one 'async with' block at a time"
            )
        # Entered again after it was left (a pipeline run more than once): a fresh pool.
        self._state = "open"
        self._pool = [_Slot() for _ in range(self.capacity)]
        self._limit = anyio.Semaphore(self.capacity * (1 + self.prefetch), fast_acquire=True)
        errors: list[Exception] = []

        async def start(slot: _Slot) -> None:
            try:
                slot.worker = await self._start_worker()
            except Exception as exc:
                errors.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                for slot in self._pool:
                    tg.start_soon(start, slot)
        except BaseException:
            await self._shutdown()
            raise
        if errors:
            await self._shutdown()
            raise errors[0]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._state = "closed"
        with anyio.CancelScope(shield=True):
            workers = list(self._live)
            for worker in workers:
                self._signal_kill(worker)
            for worker in workers:
                await self._reap(worker)
        self._pool = []

    @staticmethod
    def _signal_kill(worker: _Worker) -> None:
        if not worker.killed and worker.process.returncode is None:
            worker.killed = True
            try:
                worker.process.kill()
            except ProcessLookupError:  # pragma: no cover - exited between the check and the kill
                pass

    async def _reap(self, worker: _Worker) -> None:
        """Kill ``worker`` (if still running), close its pipes and wait for it; never cancelled."""
        if worker not in self._live:
            return
        with anyio.CancelScope(shield=True):
            self._signal_kill(worker)
            worker.pipes.close()
            await worker.process.wait()
        self._live.discard(worker)

    async def _start_worker(self) -> _Worker:
        # The worker's stdin and stdout; os.pipe() gives descriptors that no other child inherits.
        to_worker, to_worker_w = os.pipe()
        from_worker_r, from_worker = os.pipe()
        try:
            process = await anyio.open_process(
                [sys.executable, _WORKER_SCRIPT, str(os.getpid()), str(self.nice)],
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
        worker = _Worker(process, _Pipes(from_worker_r, to_worker_w))
        self._live.add(worker)
        ok = False
        try:
            with anyio.move_on_after(self.start_timeout) as scope:
                init = pickle.dumps(list(sys.path), protocol=5)
                await worker.send([wire.HEADER.pack(wire.INIT, 0, len(init)), init])
                kind, _ = await worker.receive()
                if kind != wire.READY:  # pragma: no cover - a worker of another version
                    raise WorkerCrashed(f"worker process {worker.pid} answered INIT with frame kind {kind}")
                ok = True
            if scope.cancelled_caught:
                raise ExecutorUnavailable(
                    f"worker process {worker.pid} did not start within start_timeout={self.start_timeout} s "
                    f"({sys.executable} {_WORKER_SCRIPT}); the machine may be overloaded: raise start_timeout"
                )
        except _PIPE_ERRORS as exc:
            await self._wait_exit(worker)
            raise ExecutorUnavailable(
                f"worker process {worker.pid} died while starting "
                f"({_exit_description(worker.process.returncode)}); its stderr says why"
            ) from exc
        finally:
            if not ok:
                await self._reap(worker)
        return worker

    async def _wait_exit(self, worker: _Worker) -> None:
        with anyio.move_on_after(_EXIT_GRACE, shield=True):
            await worker.process.wait()
        await self._reap(worker)

    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` in a worker process and return its result; see the class docstring."""
        check_timeout(timeout)
        self._check_open()
        pickled = self._functions.get(fn)
        token, fn_data = pickled.token, pickled.data
        payload = pickle.dumps(arg, protocol=5)
        async with self._limit:
            while True:
                self._check_open()
                # The fewest calls first; among equals a live worker (starting one takes time).
                # The limit leaves a slot with room: fewer than 1 + prefetch calls.
                slot = min(self._pool, key=lambda s: (s.load, s.worker is None or s.worker.failed))
                slot.load += 1
                try:
                    call = await self._send(slot, fn, token, fn_data, payload)
                    if call is not None:
                        result: R = await self._await_answer(slot, call, fn, timeout)
                        return result
                finally:
                    slot.load -= 1
                    if self._state != "open" and slot.worker is not None:
                        # The executor was closed while this call ran (or started its worker).
                        await self._reap(slot.worker)
                # The worker died before starting this call: send it again.

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                f"ProcessExecutor is {self._state}: "
                f"use it inside 'async with ProcessExecutor(...) as executor:'"
            )

    async def _send(
        self, slot: _Slot, fn: Callable[..., Any], token: int, fn_data: bytes, payload: bytes
    ) -> _Call | None:
        """Send a call to the slot's worker (started first if needed); ``None``: send it elsewhere."""
        async with slot.lock:
            worker = slot.worker
            if worker is None or worker.failed:
                worker = slot.worker = await self._start_worker()
                self.restarts += 1
            frames = []
            if token in worker.functions:
                worker.functions.move_to_end(token)
            else:
                frames.append(wire.HEADER.pack(wire.FN, token, len(fn_data)) + fn_data)
                worker.functions[token] = None
                if len(worker.functions) > wire.FN_CACHE_SIZE:
                    worker.functions.popitem(last=False)
            frames.append(wire.HEADER.pack(wire.CALL, token, len(payload)))
            frames.append(payload)
            call = _Call(first=not worker.calls)
            worker.calls.append(call)
            try:
                await worker.send(frames)
            except _PIPE_ERRORS:
                # The worker died: whichever call is running learns it from the pipe and sends
                # the queued calls (this one too) elsewhere; a call that was to run first fails.
                pass
            except BaseException:
                # Cancelled while sending: the pipe may hold part of a frame.
                self._drop(worker, call)
                raise
        if call.turn is not None:
            try:
                await call.turn.wait()
            except BaseException:
                self._drop(worker, call)
                raise
        return None if call.resend else call

    def _drop(self, worker: _Worker, call: _Call) -> None:
        """``call``'s caller was cancelled before its answer: nobody will read that answer."""
        if call.resend:
            return
        if worker.calls and worker.calls[0] is call:
            # Running (or about to): kill the worker, as for any cancelled call.
            worker.retire()
            self._signal_kill(worker)
        else:
            # Queued behind a running call: the worker is retired when that call's answer is in.
            call.abandoned = True

    async def _await_answer(
        self, slot: _Slot, call: _Call, fn: Callable[..., Any], time_limit: float | None
    ) -> Any:
        """Read the answer of ``call``, now at the head of its worker's queue."""
        worker = slot.worker
        assert worker is not None and worker.calls[0] is call
        answered = False
        try:
            if time_limit is None:
                kind, body = await worker.receive()
                answered = True
            else:
                # The time limit counts from the previous answer, when the worker started this call.
                with anyio.move_on_after(time_limit):
                    kind, body = await worker.receive()
                    answered = True
        except _PIPE_ERRORS as exc:
            worker.retire()
            await self._wait_exit(worker)
            if self._state != "open":
                raise WorkerCrashed(
                    f"worker process {worker.pid} was killed while running {_name(fn)} because the "
                    f"executor was closed ({_exit_description(worker.process.returncode)})"
                ) from exc
            self.crashes += 1
            raise WorkerCrashed(
                f"worker process {worker.pid} died while running {_name(fn)} "
                f"({_exit_description(worker.process.returncode)}); a signal such as SIGSEGV points "
                f"at a C extension, SIGKILL often at the out-of-memory killer"
            ) from exc
        finally:
            if not answered:  # timed out, cancelled or crashed
                worker.retire()
                await self._reap(worker)
        if not answered:
            self.timeouts += 1
            raise BatchTimeout(
                f"{_name(fn)} ran longer than timeout={time_limit} s in worker process {worker.pid}; the "
                f"worker was killed (raise the timeout or make the batches smaller)"
            )
        worker.calls.popleft()
        if worker.calls:
            following = worker.calls[0]
            if following.abandoned:
                # The worker now runs a call whose caller is gone: stop it there.
                worker.retire()
                await self._reap(worker)
            else:
                assert following.turn is not None
                following.turn.set()
        return self._decode(fn, kind, body)

    @staticmethod
    def _decode(fn: Callable[..., Any], kind: int, body: bytes) -> Any:
        if kind == wire.RESULT:
            try:
                return pickle.loads(body)
            except Exception as exc:
                raise ExecutorError(
                    f"the result of {_name(fn)} was pickled in the worker but cannot be unpickled "
                    f"here: {type(exc).__name__}: {exc}"
                ) from exc
        if kind == wire.RAISED:
            try:
                error, tb = pickle.loads(body)
            except Exception as exc:
                raise RemoteError(
                    "<unknown>", f"{_name(fn)} raised an exception that cannot be unpickled here: {exc}"
                ) from exc
            raise error from RemoteTraceback(tb)
        if kind == wire.REMOTE_ERROR:
            type_name, message, tb = pickle.loads(body)
            raise RemoteError(type_name, message) from RemoteTraceback(tb)
        raise ExecutorError(f"unexpected frame kind {kind} from a worker")  # pragma: no cover
