"""``DaskExecutor``: run a pipeline's batches on a Dask distributed cluster.

The executor submits one Dask task per call, ``remote.call(fn, arg)``: the task carries the callable and
the batch as one payload (a line source's batch is a single ``LineBlock`` of raw bytes, split and
decoded on the worker), so a batch travels once and no per-record objects are created on the machine
running the pipeline. The task, ``remote.call``, returns the call's outcome instead of raising
(the encoding the process workers use too, see :mod:`microbatch.executors.remote`), so that the
exception of ``fn`` comes back as itself with the worker's formatted traceback, and so that any
*raised* task error is known to come from Dask rather than from ``fn``.

``distributed`` is imported only when a ``DaskExecutor`` is created: ``import microbatch`` works
without it. Dask's client runs on asyncio only.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio

from .._core.params import callable_name, check_int
from .._core.splits import FileSplit
from .._exceptions import (
    BackendNotSupported,
    BatchTimeout,
    ExecutorError,
    ExecutorUnavailable,
    PathNotVisible,
    WorkerCrashed,
)
from . import remote
from .base import FunctionCache, PickledFunction, check_timeout

__all__ = ["DEFAULT_SPLIT_SIZE", "DaskExecutor", "PathNotVisible", "check_path_visible"]

A = TypeVar("A")
R = TypeVar("R")

# How many distinct functions ``run`` remembers as already checked for picklability.
_CHECKED_CACHE_SIZE = 32

# After a timeout, how long to wait for the scheduler to release the task before killing its worker.
_RELEASE_WAIT = 5.0

_INSTALL_HINT = "pip install 'microbatch[dask]'"

#: Bytes of a file per split on Dask, used by a pipeline whose ``split_size`` was not given: a task
#: costs milliseconds on a cluster (against about 0.1 ms in a local pool), so splits are larger.
DEFAULT_SPLIT_SIZE = 16 << 20


def _kill_worker_process(dask_worker: Any) -> int | None:
    """Runs in a worker's nanny: SIGKILL the worker process, which the nanny then starts anew.

    A graceful restart waits for the worker's threads, and a hung ``fn`` never ends: only a kill
    frees the thread. Returns the killed pid (None when the process was already gone).
    """
    pid: int | None = dask_worker.pid
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    return pid


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


def _key_prefix(fn: object) -> str:
    # Dask groups tasks by the key's leading words: the dashboard then shows the user's function name.
    name = callable_name(fn).rsplit(".", 1)[-1]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "batch"


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

    ``capacity`` (how many calls run at once; a pipeline keeps that many batches on the cluster) is
    ``max_in_flight`` when given, otherwise the total number of worker threads when the executor is
    entered; then entering waits up to ``worker_timeout`` (default 60 s) for at least one worker
    and fails with ``ExecutorError`` if none arrives. Workers joining later are used by Dask, but do
    not raise ``capacity``: pass ``max_in_flight`` for a cluster that grows.

    Each call is one task with ``pure=False`` whose payload is ``fn`` and ``arg`` together;
    ``fn`` travels pickled with cloudpickle (functions of importable modules by reference, so
    every worker needs microbatch and the modules ``fn`` lives in installed; functions from
    ``__main__`` by value). ``fn`` that cannot be pickled raises ``UnpicklableFunction`` before its
    first task is sent. The task runs in one of the worker's threads: a function holding the GIL
    needs workers with one thread each (``dask worker --nthreads 1 --nworkers N``) to use N cores.

    A file split (a pipeline over a regular file) is one task that reads the file on its worker:
    the path must be the same file on every worker (a shared filesystem). The first split of each
    path checks that once (:func:`check_path_visible`), else ``PathNotVisible`` names the workers.
    ``split_size`` (16 MiB) is the split size a ``Pipeline`` given no ``split_size`` uses.

    Failures:

    - ``fn`` raises: the same exception is raised here with the worker's traceback as a
      ``RemoteTraceback`` in ``__cause__``; an exception that cannot be pickled back (or
      ``SystemExit``) becomes ``RemoteError`` with the same cause.
    - the worker running the call dies: Dask's scheduler itself re-runs the task on another worker,
      up to its ``distributed.scheduler.allowed-failures`` setting (default 3); past that, Dask
      gives up (``KilledWorker``) and ``WorkerCrashed`` is raised, and the pipeline's own retries
      apply. Set ``allowed-failures`` to 0 on the scheduler to leave every retry to the pipeline.
    - the call runs past ``timeout`` seconds: the task is cancelled and ``BatchTimeout`` raised. A
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

    On trio, entering raises ``BackendNotSupported``: Dask's client runs on asyncio (uvloop works).
    An executor can be entered again after it was left (a new client is then connected), but not
    twice at once. Counters ``crashes``, ``timeouts`` and ``restarts`` only grow.
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
    ) -> None:
        distributed = _import_distributed()
        _check_arguments(max_in_flight, connect_timeout, worker_timeout, split_size)
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
        self._paths = _VisiblePaths()
        self.capacity = max_in_flight or 0
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self.client: Any = None
        self._owns_client = False
        self._slots: anyio.Semaphore | None = None
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
        library = _current_library()
        if library != "asyncio":
            raise BackendNotSupported(
                f"DaskExecutor needs asyncio (Dask's client runs on asyncio), but this code runs on "
                f"{library}: run the pipeline with anyio.run(..., backend='asyncio') or asyncio.run(...), "
                f"or use ProcessExecutor"
            )
        self._state = "open"
        try:
            await self._connect()
            if self.max_in_flight is None:
                self.capacity = await _count_threads(self.client, self.address, self.worker_timeout)
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

    async def _connect(self) -> None:
        given = self._given_client
        if given is not None and given.asynchronous:
            if given.status != "running":
                raise ValueError(
                    f"the distributed.Client given to DaskExecutor is {given.status!r}, not running: "
                    f"create it with 'async with Client(address, asynchronous=True) as client:'"
                )
            self.client = given
            return
        address = self._address if given is None else str(given.scheduler.address)
        client = self._distributed.Client(
            address, asynchronous=True, timeout=self.connect_timeout, set_as_default=False
        )
        try:
            await client
        except (OSError, asyncio.TimeoutError) as exc:  # asyncio's differs from OSError's on 3.10
            await _close_client(client)
            raise ConnectionError(
                f"cannot connect to the Dask scheduler at {address} within "
                f"connect_timeout={self.connect_timeout} s: {exc}; start one there with "
                f"'dask scheduler' and workers with 'dask worker {address}'"
            ) from exc
        except BaseException:
            await _close_client(client)
            raise
        self.client = client
        self._owns_client = True

    async def _shutdown(self) -> None:
        self._state = "closed"
        self._slots = None
        self._paths = _VisiblePaths()  # workers may differ the next time
        client, self.client = self.client, None
        if client is not None and self._owns_client:
            await _close_client(client)

    # -- calls --------------------------------------------------------------------------------------

    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` as one Dask task and return its result; see the class docstring."""
        check_timeout(timeout)
        if self._state != "open" or self._slots is None:
            raise RuntimeError(
                f"DaskExecutor is {self._state}: use it inside 'async with DaskExecutor(...) as executor:'"
            )
        shipped = self._functions.get(fn)
        if isinstance(arg, FileSplit):
            arg = await self._paths.check(self.client, arg)  # type: ignore[assignment]
        async with self._slots:
            return await self._submit(shipped, arg, timeout)  # type: ignore[no-any-return]

    async def _submit(self, shipped: PickledFunction, arg: Any, time_limit: float | None) -> Any:
        client = self.client
        fn = shipped.fn
        name = callable_name(fn)
        key = f"{_key_prefix(fn)}-{uuid.uuid4().hex}"
        future = client.submit(remote.call, shipped, arg, key=key, pure=False)
        finished = restarted = False
        try:
            with anyio.move_on_after(math.inf if time_limit is None else time_limit) as scope:
                try:
                    outcome = await future
                except Exception as exc:
                    finished = True
                    error = _task_error(self._distributed, exc, key, name, self.address)
                    if isinstance(error, WorkerCrashed):
                        self.crashes += 1
                    raise error from exc
                finished = True
        finally:
            if not finished:
                # Timed out or the caller was cancelled: stop the task on the cluster.
                restart = scope.cancelled_caught and self.restart_on_timeout
                if await _abandon(self.client, future, key, restart=restart):
                    self.restarts += 1
                    restarted = True
            else:
                future.release()
        if scope.cancelled_caught:
            self.timeouts += 1
            killed = " and its worker process killed (its nanny starts a new one)" if restarted else ""
            raise BatchTimeout(
                f"{name} ran longer than timeout={time_limit} s as Dask task {key}; the task was "
                f"cancelled{killed} (raise the timeout or make the batches smaller)"
            )
        return remote.unwrap(outcome, fn)


def _task_error(distributed: Any, exc: Exception, key: str, name: str, address: str | None) -> ExecutorError:
    """The executor's error for Dask task ``key`` (running ``name``) that failed outside ``fn``."""
    if isinstance(exc, distributed.CancelledError):
        # distributed's CancelledError is concurrent.futures', not a cancellation of ours.
        return WorkerCrashed(
            f"Dask cancelled the task {key} running {name} on {address}: {exc} "
            f"(the scheduler connection was lost or the task was cancelled from outside)"
        )
    if isinstance(exc, distributed.scheduler.KilledWorker):
        return WorkerCrashed(
            f"the Dask workers running task {key} ({name}) died every time it ran: {exc}. "
            f"A signal such as SIGSEGV points at a C extension, SIGKILL often at the "
            f"out-of-memory killer; the scheduler's distributed.scheduler.allowed-failures "
            f"sets how often Dask re-runs such a task"
        )
    if isinstance(exc, (distributed.comm.CommClosedError, OSError)):
        return ExecutorUnavailable(
            f"lost the connection to the Dask scheduler at {address} while task "
            f"{key} ({name}) ran: {type(exc).__name__}: {exc}"
        )
    return ExecutorError(
        f"Dask task {key} failed outside {name}: {type(exc).__name__}: {exc}. "
        f"Every worker needs microbatch and the module defining {name} installed, "
        f"and the result must unpickle here"
    )


async def _abandon(client: Any, future: Any, key: str, *, restart: bool) -> bool:
    """Cancel ``future`` on the cluster; with ``restart`` also kill its worker; never cancelled.

    Returns whether a worker process was killed.
    """
    with anyio.CancelScope(shield=True):
        worker = None
        if restart:
            try:
                processing: dict[str, list[Any]] = await client.processing()
            except Exception:  # pragma: no cover - scheduler gone; cancelling below fails too
                processing = {}
            worker = next((w for w, keys in processing.items() if key in keys), None)
        try:
            await client.cancel([future], reason="microbatch: timeout or caller cancelled")
        except Exception:  # pragma: no cover - scheduler gone: the task dies with it
            pass
        if worker is not None:
            # The cancel message travels on the client's batched stream: wait until the scheduler
            # has released the task, or killing the worker would make Dask re-run it elsewhere.
            await _wait_released(client, key, worker)
            try:
                killed = await client.run(_kill_worker_process, workers=[worker], nanny=True)
            except Exception:  # pragma: no cover - the nanny is gone too
                killed = {}
            return bool(killed)
    return False


async def _wait_released(client: Any, key: str, worker: str) -> None:
    with anyio.move_on_after(_RELEASE_WAIT):
        while True:
            try:
                processing: dict[str, list[Any]] = await client.processing([worker])
            except Exception:  # the worker left the cluster: nothing runs there any more
                return
            if key not in processing.get(worker, ()):
                return
            await anyio.sleep(0.01)


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


async def _close_client(client: Any) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await client.close()
        except Exception:  # pragma: no cover - closing a client whose scheduler is gone
            pass


def _check_arguments(
    max_in_flight: int | None, connect_timeout: float, worker_timeout: float, split_size: int | None
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
    if split_size is not None:
        check_int("split_size", split_size, minimum=1)


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
