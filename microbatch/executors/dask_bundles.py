"""Bundles: the batches waiting for a Dask task go to the cluster together, as one task.

A Dask task costs milliseconds (client, scheduler, worker and back), far more than running ``fn``
on a short batch. So calls waiting for a task slot are bundled: when a slot frees, the calls that
arrived meanwhile leave as one task, up to ``max_bytes`` of pickled arguments. A call never waits
for a bundle to fill: with a free slot it leaves at once, alone if it is alone. Bundles thus grow
with the load and stay small when the source is slow.

A bundle's arguments travel as one ``bytes`` scattered straight to a worker (not through the
scheduler's task graph); the task names it, with the function's pickle and its digest, so that
each worker process unpickles a function once (:func:`remote.call_bundle`). The task returns one
outcome per call, so ``fn`` raising on one batch fails that call alone. A bundle that fails as a
whole (its worker lost past Dask's re-runs, a timeout, a result that does not pickle) is reported
to each of its calls as :data:`FALLBACK`: each then runs as a task of its own, so that its failure,
retries and dead letters are exactly those of a batch sent alone. (The scattered bytes live on one
worker: when it dies, Dask cannot re-run the bundle elsewhere, but it re-runs those tasks.) A
bundle of one call that timed out is that call's timeout (:class:`Failed`): running it alone again
would hang as long.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from .._core.params import callable_name
from .._exceptions import BatchTimeout
from . import remote
from .base import PickledFunction
from .dask_tasks import TaskCounters, task_key, wait_task


class BundleCounters(TaskCounters, Protocol):
    """What a :class:`Bundler` counts, on the executor: they only grow."""

    bundles: int
    fallbacks: int

__all__ = ["CLOSED", "FALLBACK", "TARGET_SECONDS", "Bundler", "Failed"]


class _Fallback:
    __slots__ = ()


#: The outcome of a call whose bundle failed as a whole: run it again on its own.
FALLBACK: Any = _Fallback()
#: The outcome of a call still waiting when the executor was left.
CLOSED: Any = _Fallback()


class Failed:
    """The outcome of a call that was a bundle of its own, which failed outside ``fn``: ``error``
    is the executor's error for it, as if it had been sent without bundles."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Call:
    """One waiting call: its pickled argument, and its outcome once its bundle is done."""

    __slots__ = ("data", "done", "gone", "outcome", "shipped", "timeout", "bundle")

    def __init__(self, shipped: PickledFunction, data: bytes, timeout: float | None) -> None:
        self.shipped = shipped
        self.data = data
        self.timeout = timeout
        self.done = anyio.Event()
        self.outcome: Any = None
        self.gone = False  # its caller stopped waiting (cancelled)
        self.bundle: _Bundle | None = None


class _Bundle:
    __slots__ = ("calls", "scope")

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.scope = anyio.CancelScope()


#: Worker time a bundle carries at most, as measured on the bundles before it: well above Dask's
#: milliseconds per task, and short enough that the last bundles of a run leave no worker idle long.
TARGET_SECONDS = 0.2


class Bundler:
    """Collects calls into bundles and runs each as one Dask task; see the module docstring.

    ``slots`` bounds the Dask tasks in flight (shared with the executor's other tasks); a bundle
    holds calls of one function, up to ``max_bytes`` of pickled arguments (a larger argument goes
    alone). ``start`` runs the sender in the caller's task group, which also runs the bundles.
    """

    def __init__(
        self,
        distributed: Any,
        client: Any,
        slots: anyio.Semaphore,
        *,
        max_bytes: int,
        restart_on_timeout: bool,
        counters: BundleCounters,
    ) -> None:
        self.distributed = distributed
        self.client = client
        self.slots = slots
        self.max_bytes = max_bytes
        self.restart_on_timeout = restart_on_timeout
        self.counters = counters
        # Seconds of worker time per byte of arguments of each function, measured on its bundles.
        self._cost: dict[PickledFunction, float] = {}
        self._pending: deque[_Call] = deque()
        self._running: set[_Bundle] = set()
        self._arrived = anyio.Event()
        self._tg: TaskGroup | None = None

    @property
    def waiting(self) -> int:
        """Calls waiting for a task slot."""
        return len(self._pending)

    def start(self, tg: TaskGroup) -> None:
        self._tg = tg
        tg.start_soon(self._send)

    async def call(self, shipped: PickledFunction, arg: Any, time_limit: float | None) -> Any:
        """The outcome of ``fn(arg)`` run in a bundle (``time_limit``: its timeout), or :data:`FALLBACK`."""
        call = _Call(shipped, remote.dumps(arg), time_limit)
        self._pending.append(call)
        self._arrived.set()
        try:
            await call.done.wait()
        except BaseException:
            call.gone = True
            bundle = call.bundle
            if bundle is None:
                with contextlib.suppress(ValueError):  # close() may have emptied the queue
                    self._pending.remove(call)
            elif all(c.gone for c in bundle.calls):
                bundle.scope.cancel()  # nobody waits for it any more: stop it on the cluster
            raise
        return call.outcome

    async def _send(self) -> None:
        while True:
            while not self._pending:
                self._arrived = anyio.Event()
                await self._arrived.wait()
            await self.slots.acquire()
            calls = self._cut()
            if not calls:
                self.slots.release()
                continue
            bundle = _Bundle(calls)
            for call in calls:
                call.bundle = bundle
            assert self._tg is not None
            self._running.add(bundle)
            self._tg.start_soon(self._run, bundle)

    def close(self) -> None:
        """Wake every call still waiting with :data:`CLOSED` (the executor is being left)."""
        waiting = list(self._pending)
        self._pending.clear()
        for bundle in self._running:
            waiting.extend(bundle.calls)
        for call in waiting:
            if not call.done.is_set():
                call.outcome = CLOSED
                call.done.set()

    def _cut(self) -> list[_Call]:
        """The pending calls of one function, oldest first, up to ``max_bytes`` and to about
        :data:`TARGET_SECONDS` of work as measured on that function's bundles (at least one call)."""
        calls: list[_Call] = []
        size = 0
        limit = self.max_bytes
        pending = self._pending
        cost = self._cost.get(pending[0].shipped) if pending else None
        if cost:
            limit = min(limit, int(TARGET_SECONDS / cost))
        while pending:
            call = pending[0]
            if calls and (call.shipped is not calls[0].shipped or size + len(call.data) > limit):
                break
            pending.popleft()
            calls.append(call)
            size += len(call.data)
        return calls

    async def _run(self, bundle: _Bundle) -> None:
        calls = bundle.calls
        try:
            with bundle.scope:
                outcomes = await self._submit(calls)
            if bundle.scope.cancelled_caught:
                return  # every caller left
        except Exception as exc:
            if len(calls) == 1 and isinstance(exc, BatchTimeout):
                outcomes = [Failed(exc)]  # it was alone: running it again alone would hang as long
            else:
                # The bundle failed as a whole (not fn: its failures are outcomes): each call runs
                # alone, so that its own failure, not its neighbours', decides its retries.
                self.counters.fallbacks += 1
                outcomes = [FALLBACK] * len(calls)
        finally:
            self.slots.release()
            self._running.discard(bundle)
        for call, outcome in zip(calls, outcomes, strict=True):
            call.outcome = outcome
            call.done.set()

    async def _submit(self, calls: list[_Call]) -> list[Any]:
        client = self.client
        shipped = calls[0].shipped
        fn = shipped.fn
        name = callable_name(fn)
        alone = len(calls) == 1
        blob = b"".join(call.data for call in calls)
        function = (hashlib.blake2b(shipped.data, digest_size=16).digest(), shipped.data)
        [data] = await client.scatter([blob], direct=True, hash=False)
        key = task_key(fn)
        future = client.submit(
            remote.call_bundle, function, data, [len(call.data) for call in calls], key=key, pure=False
        )
        self.counters.bundles += 1
        limits = [call.timeout for call in calls]
        time_limit = None if None in limits else sum(limits)  # type: ignore[arg-type]
        seconds, outcomes = await wait_task(
            self.distributed,
            client,
            future,
            key=key,
            name=name if alone else f"a bundle of {len(calls)} batches of {name}",
            time_limit=time_limit,
            restart_on_timeout=self.restart_on_timeout,
            counters=_BundleCounters(self.counters, timeouts=alone),
            also_release=(data,),
        )
        cost = seconds / max(len(blob), 1)
        known = self._cost.get(shipped)
        if known is None and len(self._cost) >= 32:
            self._cost.clear()  # functions of runs long gone
        self._cost[shipped] = cost if known is None else (known + cost) / 2
        return outcomes  # type: ignore[no-any-return]


class _BundleCounters:
    """Counts a bundle's worker restarts on the executor, and the timeout of a bundle of one call
    (its call's timeout). A lost worker counts as a crash when a call, run alone after its bundle
    failed, loses its worker itself."""

    def __init__(self, counters: TaskCounters, *, timeouts: bool) -> None:
        self._counters = counters
        self._count_timeouts = timeouts
        self.crashes = 0
        self._timeouts = 0

    @property
    def restarts(self) -> int:
        return self._counters.restarts

    @restarts.setter
    def restarts(self, value: int) -> None:
        self._counters.restarts = value

    @property
    def timeouts(self) -> int:
        return self._timeouts

    @timeouts.setter
    def timeouts(self, value: int) -> None:
        if self._count_timeouts:
            self._counters.timeouts += value - self._timeouts
        self._timeouts = value
