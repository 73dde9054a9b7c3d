"""The pool under ``ProcessExecutor``: a slot per worker process, started, sent calls, replaced,
and all killed when the executor is left.

:class:`WorkerPool` holds what the executor's calls share: the slots, the live workers, the callers
waiting for their turn, the counters. It sends a call to a slot's worker (starting one first when
the slot has none, or a dead one) and performs what the worker's call queue
(:mod:`microbatch._core.calls`) decides; :class:`~microbatch.executors.process.ProcessExecutor`
reads the answers.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import anyio

from .._core.calls import Call, CallState, Step
from . import worker as wire
from .base import PickledFunction
from .pipes import PIPE_ERRORS
from .recycling import Recycling
from .spawn import Worker

__all__ = ["Slot", "WorkerPool", "check_open"]

P = TypeVar("P", bound="WorkerPool")


class Slot:
    """A place in the pool for one worker process, started when first needed and after a failure."""

    __slots__ = ("worker", "load", "lock")

    def __init__(self) -> None:
        self.worker: Worker | None = None
        # Calls assigned to this slot: sent, or about to be.
        self.load = 0
        # Held while starting the slot's worker and while sending to it, so calls reach the pipe
        # in the order of the worker's call queue.
        self.lock = anyio.Lock(fast_acquire=True)


async def _start_all(slots: list[Slot], start: Callable[[], Awaitable[Worker]]) -> None:
    """Start every slot's worker at once; the first error once all starts ended."""
    errors: list[Exception] = []

    async def start_one(slot: Slot) -> None:
        try:
            slot.worker = await start()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for slot in slots:
            tg.start_soon(start_one, slot)
    if errors:
        raise errors[0]


def _check_settings(workers: int | None, start_timeout: float, nice: int, prefetch: int) -> int:
    """Refuse bad settings with a ``ValueError`` naming the parameter; the number of workers."""
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
    return workers


def check_open(state: str) -> None:
    if state != "open":
        raise RuntimeError(
            f"ProcessExecutor is {state}: use it inside 'async with ProcessExecutor(...) as executor:'"
        )


class WorkerPool:
    """Worker processes in ``capacity`` slots; see the module docstring."""

    def __init__(
        self, workers: int | None, *, start_timeout: float, nice: int, prefetch: int, recycling: Recycling
    ) -> None:
        workers = _check_settings(workers, start_timeout, nice, prefetch)
        self.recycling = recycling
        self.capacity = workers
        self.prefetch = prefetch
        self.start_timeout = start_timeout
        self.nice = nice
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self.recycled = 0
        self._pool: list[Slot] = []
        self._live: set[Worker] = set()
        # Callers waiting for their queued call's turn (or to send it again), by call.
        self._turns: dict[Call, anyio.Event] = {}
        self._limit = anyio.Semaphore(workers * (1 + prefetch), fast_acquire=True)
        self._state = "new"

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes alive now (for monitoring and tests)."""
        return sorted(worker.pid for worker in self._live)

    async def __aenter__(self: P) -> P:
        if self._state == "open":
            raise RuntimeError(
                "this ProcessExecutor is already running: it serves one 'async with' block at a time"
            )
        # Entered again after it was left (a pipeline run more than once): a fresh pool.
        self._state = "open"
        self._pool = [Slot() for _ in range(self.capacity)]
        self._limit = anyio.Semaphore(self.capacity * (1 + self.prefetch), fast_acquire=True)
        try:
            await _start_all(self._pool, self._start)
        except BaseException:
            await self._shutdown()
            raise
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
                worker.kill()
            for worker in workers:
                await worker.reap()
        self._pool = []

    async def _start(self) -> Worker:
        """Start one worker process (the executor knows which script it runs)."""
        raise NotImplementedError

    def _retire(self, slot: Slot, worker: Worker) -> None:
        """Replace a worker that is alive and well: it runs what it holds, the slot starts another."""
        worker.queue.retire()
        self.recycled += 1
        if slot.worker is worker:
            slot.worker = None

    def _perform(self, worker: Worker, step: Step) -> None:
        """Wake the callers a call-queue step names; kill the worker if it says so."""
        for call in (*step.running, *step.resend):
            turn = self._turns.pop(call, None)
            if turn is not None:
                turn.set()
        if step.kill:
            worker.kill()

    async def _send(
        self, slot: Slot, pickled: PickledFunction, payload: bytes
    ) -> tuple[Worker, Call, bool] | None:
        """Send a call to the slot's worker (started first if needed) and wait for its turn: the
        worker, the call, whether fn travelled with it (then LOADED comes first); ``None``: resend."""
        async with slot.lock:
            worker = slot.worker
            if worker is not None and worker.queue.open and worker.process.returncode is not None:
                # Died while idle: do not write a call into a pipe the event loop may still hold.
                self._perform(worker, worker.queue.died())
            if worker is None or not worker.queue.open:
                if worker is not None:
                    await worker.reap()  # killed or dead already: no zombie, no stale pid
                    self.restarts += 1
                worker = slot.worker = await self._start()
            frames = worker.fn_frames(pickled.token, pickled.data)
            loads_fn = bool(frames)
            frames.append(wire.HEADER.pack(wire.CALL, pickled.token, len(payload)))
            frames.append(payload)
            call = worker.queue.send()
            if self.recycling.full(worker.queue):
                self._retire(slot, worker)
            if call.state is CallState.SENT:
                turn = self._turns[call] = anyio.Event()
            try:
                await worker.send(frames)
            except PIPE_ERRORS:
                # The worker died before it read this call: send it elsewhere, no failure of its
                # own (rule 3); the caller of a running call learns of the death from the pipe.
                self._perform(worker, worker.queue.lost(call))
                if slot.worker is not worker:  # retired already: no later call will reap it
                    await worker.wait_exit()
            except BaseException:
                # Cancelled while sending: the pipe may hold part of a frame.
                self._cancel(worker, call)
                raise
        if call.state is CallState.SENT:
            try:
                await turn.wait()
            except BaseException:
                self._cancel(worker, call)
                raise
        return None if call.state is CallState.RESEND else (worker, call, loads_fn)

    def _cancel(self, worker: Worker, call: Call) -> None:
        self._turns.pop(call, None)
        self._perform(worker, worker.queue.cancel(call))

