"""``DaskExecutor``: run a pipeline's batches on a Dask distributed cluster.

Batches waiting for the cluster leave together: the calls that arrive while every Dask task slot
is busy become one task when a slot frees, up to ``max_bytes`` of arguments (see
:mod:`microbatch.executors.dask_bundles`), their bytes scattered straight to a worker. A file split
is one task of its own, carrying only the path and the byte range. Every task returns each call's
outcome instead of raising (the encoding the process workers use too, see
:mod:`microbatch.executors.remote`), so that the exception of ``fn`` comes back as itself with the
worker's formatted traceback, and so that any *raised* task error is known to come from Dask
rather than from ``fn`` (:mod:`microbatch.executors.dask_tasks`).

``distributed`` is imported only when a ``DaskExecutor`` is created: ``import microbatch`` works
without it. Dask's client runs on asyncio only.

Failures of a call:

- ``fn`` raises: the same exception is raised here with the worker's traceback as a
  ``RemoteTraceback`` in ``__cause__``; an exception that cannot be pickled back (or
  ``SystemExit``) becomes ``RemoteError`` with the same cause.
- the worker running the call dies: Dask's scheduler itself re-runs the task on another worker,
  up to its ``distributed.scheduler.allowed-failures`` setting (default 3); past that, Dask
  gives up (``KilledWorker``) and ``WorkerCrashed`` is raised, and the pipeline's own retries
  apply. Set ``allowed-failures`` to 0 on the scheduler to leave every retry to the pipeline.
  A bundle's data lives on the worker it was scattered to, and is lost with it: each of the
  bundle's batches then runs again as a task of its own, which Dask re-runs as above.
- the call runs past ``timeout`` seconds (a bundle: the sum of its calls' timeouts, then each
  call runs alone with its own): the task is cancelled and ``BatchTimeout`` raised. A
  Python thread cannot be stopped, so with ``restart_on_timeout`` (the default) the worker
  process that ran the task is also killed through its nanny, which starts a new one (other
  tasks on that worker are re-run elsewhere by Dask). A worker without a nanny
  (``dask worker --no-nanny``), or ``restart_on_timeout=False``, keeps the hung thread busy
  until ``fn`` returns. The time counts from submission: with ``max_in_flight`` above the
  worker threads, time a task waits in Dask's queue counts too.
- the connection to the scheduler is lost: ``ExecutorUnavailable`` (a ``WorkerCrashed``); a
  pipeline retries the batch but never dead-letters records for it, and stops after the retries.
- the task is cancelled or lost by Dask (a worker restarted from outside): ``WorkerCrashed``
  naming the reason.
- a Dask error outside ``fn`` (the worker cannot import microbatch or ``fn``'s module, a result
  that cannot be unpickled here): ``ExecutorError`` naming it.
- the caller is cancelled: the task is cancelled on the cluster, the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from .._core.params import callable_name, check_int
from .._core.splits import FileSplit, SourceSplit
from .._exceptions import BackendNotSupported, ExecutorError, PathNotVisible
from . import remote
from .base import FunctionCache, PickledFunction, check_timeout
from .dask_bundles import CLOSED, FALLBACK, Bundler, Failed
from .dask_tasks import task_key, wait_task

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_SPLIT_SIZE", "DaskExecutor", "PathNotVisible", "check_asyncio",
    "check_path_visible", "close_client",
]

A = TypeVar("A")
R = TypeVar("R")

# How many distinct functions ``run`` remembers as already checked for picklability.
_CHECKED_CACHE_SIZE = 32

_INSTALL_HINT = "pip install 'microbatch[dask]'"

#: Bytes of a file per split on Dask, used by a pipeline whose ``split_size`` was not given: a task
#: costs milliseconds on a cluster (against about 0.1 ms in a local pool), so splits are larger.
DEFAULT_SPLIT_SIZE = 16 << 20

#: Bytes of pickled batches per Dask task at most, by default: a task then carries some tens of
#: milliseconds of work or more, against a few milliseconds of Dask's own cost per task.
DEFAULT_MAX_BYTES = 4 << 20

#: Dask tasks in flight per worker thread, by default: one running, the others on their way or
#: waiting on their worker, so that a worker starts its next task without waiting for the round trips
#: of a bundle (scatter its bytes, submit, fetch the result: 0.1-0.3 s each on a loaded machine).
TASKS_PER_THREAD = 4

#: Batches a pipeline keeps on the cluster per task in flight, by default (with ``max_bytes``): the
#: batches that arrive while every task slot is busy make the next bundle.
BATCHES_PER_TASK = 16


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"DaskExecutor needs the 'distributed' package, which is not installed: {_INSTALL_HINT}"
        ) from exc
    return distributed


def _current_library() -> str:
    """The running async library's name ("asyncio", "trio"), or a description when unknown."""
    try:
        import sniffio
    except ImportError:  # pragma: no cover - anyio works without sniffio
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return "an async library other than asyncio"
        return "asyncio"
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return "no async library"


class DaskExecutor:
    """Runs each call as one task on a Dask distributed cluster; asyncio only.

    ``address_or_client`` is one of:

    - a scheduler address (``"tcp://10.0.0.5:8786"``): a client is connected when the executor is
      entered (``async with``) and closed when it is left; ``connect_timeout`` (default 30 s) bounds
      the connection, beyond which ``ConnectionError`` names the address;
    - a ``distributed.Client`` created with ``asynchronous=True`` in the running event loop: used as
      is and left open (a synchronous client is not usable from async code: the executor opens its
      own asynchronous client to the same scheduler instead, and closes it);
    - a cluster object with a ``scheduler_address`` (``LocalCluster``, ``dask_jobqueue`` and
      ``dask_kubernetes`` clusters): a client is connected to it, and closed on exit.

    Tasks in flight: ``max_tasks`` Dask tasks at most, by default 4 per worker thread of the
    cluster when the executor is entered (one running, the others on their way, which hides the
    round trips of the scheduler and the scatter). Counting the threads waits up to
    ``worker_timeout`` (default 60 s) for a first worker, then fails with ``ExecutorError``.
    Workers joining later are used by Dask but do not raise these numbers: pass them for a
    cluster that grows.

    Bundles: batch calls waiting for a task slot leave together as one task when a slot frees, up
    to ``max_bytes`` (default 4 MiB) of pickled arguments; a call never waits for others to
    arrive. The bundle's bytes are scattered straight to a worker, not sent through the
    scheduler's task graph; the task runs ``fn`` on each batch in turn and returns each batch's
    outcome, so ``fn`` raising on one batch fails only that call. A bundle that fails as a whole
    (its worker lost past Dask's re-runs, a timeout, a result that cannot be pickled) runs each of
    its batches again as a task of its own: failures, retries and dead letters are then exactly
    those of batches sent one by one. ``max_bytes=None`` sends every batch as a task of its own.

    ``capacity`` (how many calls run at once: a pipeline keeps that many batches on the cluster,
    read ahead of the fold) is ``max_in_flight`` when given; otherwise ``max_tasks`` times 16
    with bundles, ``max_tasks`` without. With bundles, a pipeline thus holds up to
    ``(queue_size + capacity) * max_size`` records in memory: lower ``max_in_flight`` for batches
    of megabytes.

    ``fn`` travels pickled with cloudpickle (functions of importable modules by reference, so
    every worker needs microbatch and the modules ``fn`` lives in installed; functions from
    ``__main__`` by value), and each worker process unpickles it once for all bundles of all runs.
    ``fn`` that cannot be pickled raises ``UnpicklableFunction`` before its first task is sent.
    Tasks run in the worker's threads: a function holding the GIL needs workers with one thread
    each (``dask worker --nthreads 1 --nworkers N``) to use N cores.

    A file split (a pipeline over a regular file) is one task that reads the file on its worker:
    the path must be the same file on every worker (a shared filesystem). The first split of each
    path checks that once (:func:`check_path_visible`), else ``PathNotVisible`` names the workers.
    ``split_size`` (16 MiB) is the split size a ``Pipeline`` given no ``split_size`` uses.

    Failures (``fn`` raising, lost workers, timeouts, a lost scheduler): see the module docstring.

    On trio, entering raises ``BackendNotSupported``: Dask's client runs on asyncio (uvloop works).
    An executor can be entered again after it was left (a new client is then connected), but not
    twice at once. Counters ``crashes``, ``timeouts``, ``restarts``, ``bundles`` (bundle tasks
    sent) and ``fallbacks`` (bundles that failed as a whole) only grow.
    """

    def __init__(
        self,
        address_or_client: Any,
        *,
        max_in_flight: int | None = None,
        connect_timeout: float = 30.0,
        worker_timeout: float = 60.0,
        restart_on_timeout: bool = True,
        split_size: int | None = DEFAULT_SPLIT_SIZE,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_tasks: int | None = None,
    ) -> None:
        distributed = _import_distributed()
        _check_arguments(max_in_flight, connect_timeout, worker_timeout, split_size, max_bytes, max_tasks)
        self._given_client: Any = None
        self._address: str | None = None
        if isinstance(address_or_client, str):
            if not address_or_client:
                raise ValueError("address_or_client must be a scheduler address such as 'tcp://HOST:8786'")
            self._address = address_or_client
        elif isinstance(address_or_client, distributed.Client):
            self._given_client = address_or_client
        elif isinstance(getattr(address_or_client, "scheduler_address", None), str):
            self._address = address_or_client.scheduler_address
        else:
            raise TypeError(
                f"address_or_client must be a scheduler address ('tcp://HOST:8786'), a distributed.Client "
                f"or a cluster with a scheduler_address (LocalCluster), got {address_or_client!r}"
            )
        self.max_in_flight = max_in_flight
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self.restart_on_timeout = restart_on_timeout
        self.split_size = split_size
        self.max_bytes = max_bytes
        self.max_tasks = max_tasks
        self._paths = _VisiblePaths()
        self.capacity = max_in_flight or 0
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self.bundles = 0  # bundle tasks sent
        self.fallbacks = 0  # bundles that failed as a whole: their batches ran one task each
        self.client: Any = None
        self._owns_client = False
        self._slots: anyio.Semaphore | None = None
        self._tasks: anyio.Semaphore | None = None  # Dask tasks in flight (bundles and splits)
        self._bundler: Bundler | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        # Functions checked for picklability and pickled, once per function.
        self._functions = FunctionCache(_CHECKED_CACHE_SIZE)
        self._distributed = distributed
        self._state = "new"

    def __repr__(self) -> str:
        return (
            f"<DaskExecutor {self.address or 'client'} capacity={self.capacity} {self._state} "
            f"crashes={self.crashes} timeouts={self.timeouts} restarts={self.restarts}>"
        )

    @property
    def waiting(self) -> int:
        """Batches waiting for a Dask task slot (they leave in the next bundle)."""
        return self._bundler.waiting if self._bundler else 0

    @property
    def address(self) -> str | None:
        """The scheduler's address (known before entering unless a client was given)."""
        if self._address is not None:
            return self._address
        if self.client is not None:
            return str(self.client.scheduler.address)
        return None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> DaskExecutor:
        if self._state == "open":
            raise RuntimeError(
                "this DaskExecutor is already in use: one 'async with' at a time (it can be entered "
                "again once left); create one DaskExecutor per concurrent pipeline run"
            )
        check_asyncio()
        self._state = "open"
        try:
            self.client, self._owns_client = await _connect(
                self._distributed, self._given_client, self._address, self.connect_timeout
            )
            tasks = self.max_tasks
            if tasks is None or self.max_in_flight is None:
                threads = await _count_threads(self.client, self.address, self.worker_timeout)
                tasks = tasks or TASKS_PER_THREAD * threads
            per_task = 1 if self.max_bytes is None else BATCHES_PER_TASK
            self.capacity = self.max_in_flight or tasks * per_task
            self._tasks = anyio.Semaphore(tasks)
            if self.max_bytes is not None:
                self._stack = AsyncExitStack()
                tg = self._tg = await self._stack.enter_async_context(anyio.create_task_group())
                self._bundler = Bundler(
                    self._distributed,
                    self.client,
                    self._tasks,
                    max_bytes=self.max_bytes,
                    restart_on_timeout=self.restart_on_timeout,
                    counters=self,
                )
                self._bundler.start(tg)
        except BaseException:
            await self._shutdown()
            raise
        self._slots = anyio.Semaphore(self.capacity)
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
        self._slots = self._tasks = None
        bundler, self._bundler = self._bundler, None
        stack, self._stack = self._stack, None
        if bundler is not None:
            bundler.close()
        if stack is not None:
            assert self._tg is not None
            self._tg.cancel_scope.cancel()  # the sender waits for calls forever
            self._tg = None
            await stack.aclose()
        self._paths = _VisiblePaths()  # workers may differ the next time
        client, self.client = self.client, None
        if client is not None and self._owns_client:
            await close_client(client)

    async def open_client(self) -> tuple[Any, bool]:
        """Another asynchronous client to this executor's cluster (the given client itself when it
        is asynchronous), and whether it is the caller's to close (with :func:`close_client`)."""
        check_asyncio()
        return await _connect(self._distributed, self._given_client, self._address, self.connect_timeout)

    # -- calls --------------------------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` on the cluster and return its result; see the class docstring."""
        check_timeout(timeout)
        if self._state != "open" or self._slots is None or self._tasks is None:
            raise RuntimeError(
                f"DaskExecutor is {self._state}: use it inside 'async with DaskExecutor(...) as executor:'"
            )
        shipped = self._functions.get(fn)
        async with self._slots:
            if isinstance(arg, (FileSplit, SourceSplit)):  # a split: one task of its own
                if isinstance(arg, FileSplit):
                    arg = await self._paths.check(self.client, arg)  # type: ignore[assignment]
                async with self._tasks:
                    return await self._submit(shipped, arg, timeout)  # type: ignore[no-any-return]
            if self._bundler is not None:
                outcome = await self._bundler.call(shipped, arg, timeout)
                if outcome is CLOSED:
                    raise RuntimeError("the DaskExecutor was left while this call waited for its result")
                if isinstance(outcome, Failed):
                    raise outcome.error
                if outcome is not FALLBACK:
                    return remote.unwrap(outcome, fn)  # type: ignore[no-any-return]
            return await self._submit(shipped, arg, timeout)  # type: ignore[no-any-return]

    async def _submit(self, shipped: PickledFunction, arg: Any, time_limit: float | None) -> Any:
        """Run one call as a Dask task of its own; its value, or its exception raised."""
        fn = shipped.fn
        key = task_key(fn)
        future = self.client.submit(remote.call, shipped, arg, key=key, pure=False)
        outcome = await wait_task(
            self._distributed,
            self.client,
            future,
            key=key,
            name=callable_name(fn),
            time_limit=time_limit,
            restart_on_timeout=self.restart_on_timeout,
            counters=self,
        )
        return remote.unwrap(outcome, fn)


def check_asyncio() -> None:
    """``BackendNotSupported`` unless the running async library is asyncio (Dask's client's)."""
    library = _current_library()
    if library != "asyncio":
        raise BackendNotSupported(
            f"DaskExecutor needs asyncio (Dask's client runs on asyncio), but this code runs on "
            f"{library}: run the pipeline with anyio.run(..., backend='asyncio') or asyncio.run(...), "
            f"or use ProcessExecutor"
        )


async def _connect(
    distributed: Any, given: Any, address: str | None, connect_timeout: float
) -> tuple[Any, bool]:
    """The asynchronous client to use, and whether it is ours to close."""
    if given is not None and given.asynchronous:
        if given.status != "running":
            raise ValueError(
                f"the distributed.Client given to DaskExecutor is {given.status!r}, not running: "
                f"create it with 'async with Client(address, asynchronous=True) as client:'"
            )
        return given, False
    if given is not None:
        address = str(given.scheduler.address)
    client = distributed.Client(address, asynchronous=True, timeout=connect_timeout, set_as_default=False)
    try:
        await client
    except (OSError, asyncio.TimeoutError) as exc:  # asyncio's differs from OSError's on 3.10
        await close_client(client)
        raise ConnectionError(
            f"cannot connect to the Dask scheduler at {address} within "
            f"connect_timeout={connect_timeout} s: {exc}; start one there with "
            f"'dask scheduler' and workers with 'dask worker {address}'"
        ) from exc
    except BaseException:
        await close_client(client)
        raise
    return client, True


async def _count_threads(client: Any, address: str | None, worker_timeout: float) -> int:
    """The cluster's worker threads, once at least one worker joined (within ``worker_timeout``)."""
    try:
        await client.wait_for_workers(1, timeout=worker_timeout)
    except TimeoutError as exc:
        raise ExecutorError(
            f"no Dask worker joined the scheduler at {address} within "
            f"worker_timeout={worker_timeout} s: start some with 'dask worker {address}', "
            f"or raise worker_timeout"
        ) from exc
    nthreads: dict[str, int] = await client.nthreads()
    return max(1, sum(nthreads.values()))


async def close_client(client: Any) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await client.close()
        except Exception:  # pragma: no cover - closing a client whose scheduler is gone
            pass


def _check_arguments(
    max_in_flight: int | None,
    connect_timeout: float,
    worker_timeout: float,
    split_size: int | None,
    max_bytes: int | None,
    max_tasks: int | None,
) -> None:
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ValueError(
            f"max_in_flight must be a positive integer or None (the cluster's worker threads), "
            f"got {max_in_flight!r}"
        )
    if not connect_timeout > 0:
        raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
    if not worker_timeout > 0:
        raise ValueError(f"worker_timeout must be a positive number of seconds, got {worker_timeout!r}")
    for name, value in (("split_size", split_size), ("max_bytes", max_bytes), ("max_tasks", max_tasks)):
        if value is not None:
            check_int(name, value, minimum=1)


def _file_size(path: str) -> int | None:
    """Runs on each worker: the size of the regular file at ``path`` there, None when there is none."""
    return os.stat(path).st_size if os.path.isfile(path) else None


async def check_path_visible(client: Any, path: str) -> dict[str, int]:
    """Each worker's address and the size there of the regular file at ``path``, which every
    worker must see; else :class:`PathNotVisible` names ``path`` and the workers that do not."""
    sizes: dict[str, int | None] = await client.run(_file_size, path, on_error="return")
    missing = sorted(worker for worker, size in sizes.items() if not isinstance(size, int))
    if missing:
        raise PathNotVisible(
            f"the file {path} is not visible to Dask worker(s) {', '.join(missing)}: file splits are read "
            f"by the workers, so the file must be at the same path on a filesystem they share (NFS, a "
            f"shared folder); or give the Pipeline split_size=None to send the lines from this process"
        )
    return {worker: size for worker, size in sizes.items() if isinstance(size, int)}


class _VisiblePaths:
    """The paths found visible to the workers: each is checked once, by the first split of it."""

    def __init__(self) -> None:
        self.checked: set[str] = set()
        self.lock = anyio.Lock()

    async def check(self, client: Any, split: FileSplit) -> FileSplit:
        """``split`` with an absolute path (workers may run in another folder), once checked."""
        path = os.path.abspath(split.path)  # noqa: ASYNC240 - no I/O but getcwd
        async with self.lock:
            if path not in self.checked:
                await check_path_visible(client, path)
                self.checked.add(path)
        return split if path == split.path else FileSplit(path, *split._key()[1:])
