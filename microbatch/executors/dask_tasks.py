"""One Dask task, waited for: its failures as the executor's errors, its timeout, its cancellation.

``DaskExecutor`` runs three kinds of task (a batch, a bundle of batches, a file split); each is
waited for by :func:`wait_task`, which maps what can go wrong outside ``fn`` to the executor's
errors and stops the task on the cluster when its caller gives up on it.
"""

from __future__ import annotations

import math
import os
import signal
import uuid
from typing import Any, Protocol

import anyio

from .._core.params import callable_name
from .._exceptions import BatchTimeout, ExecutorError, ExecutorUnavailable, WorkerCrashed

__all__ = ["TaskCounters", "abandon", "task_error", "task_key", "wait_task"]

# After a timeout, how long to wait for the scheduler to release the task before killing its worker.
_RELEASE_WAIT = 5.0


class TaskCounters(Protocol):
    """What :func:`wait_task` counts, on the executor: they only grow."""

    crashes: int
    timeouts: int
    restarts: int


def task_key(fn: object) -> str:
    """A new task key that starts with ``fn``'s name: Dask's dashboard groups tasks by it."""
    name = callable_name(fn).rsplit(".", 1)[-1]
    prefix = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "batch"
    return f"{prefix}-{uuid.uuid4().hex}"


def _kill_worker_process(dask_worker: Any) -> int | None:
    """Runs in a worker's nanny: SIGKILL the worker process, which the nanny then starts anew.

    A graceful restart waits for the worker's threads, and a hung ``fn`` never ends: only a kill
    frees the thread. Returns the killed pid (None when the process was already gone).
    """
    pid: int | None = dask_worker.pid
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    return pid


async def wait_task(
    distributed: Any,
    client: Any,
    future: Any,
    *,
    key: str,
    name: str,
    time_limit: float | None,
    restart_on_timeout: bool,
    counters: TaskCounters,
    also_release: tuple[Any, ...] = (),
) -> Any:
    """The result of Dask task ``key`` (running ``name``), released once read.

    A Dask error becomes the executor's error (:func:`task_error`; a lost worker counts as a crash).
    Past ``time_limit`` the task is cancelled (its worker process killed with ``restart_on_timeout``)
    and ``BatchTimeout`` raised; a cancelled caller cancels the task. ``also_release``: futures the
    task needs (scattered data), released or cancelled with it.
    """
    finished = restarted = False
    try:
        with anyio.move_on_after(math.inf if time_limit is None else time_limit) as scope:
            try:
                outcome = await future
            except Exception as exc:
                finished = True
                error = task_error(distributed, exc, key, name, str(client.scheduler.address))
                if isinstance(error, WorkerCrashed):
                    counters.crashes += 1
                raise error from exc
            finished = True
    finally:
        if not finished:
            # Timed out or the caller was cancelled: stop the task on the cluster.
            restart = scope.cancelled_caught and restart_on_timeout
            if await abandon(client, future, key, restart=restart, also=also_release):
                counters.restarts += 1
                restarted = True
        else:
            for other in (future, *also_release):
                other.release()
    if scope.cancelled_caught:
        counters.timeouts += 1
        killed = " and its worker process killed (its nanny starts a new one)" if restarted else ""
        raise BatchTimeout(
            f"{name} ran longer than timeout={time_limit} s as Dask task {key}; the task was "
            f"cancelled{killed} (raise the timeout or make the batches smaller)"
        )
    return outcome


def task_error(distributed: Any, exc: Exception, key: str, name: str, address: str | None) -> ExecutorError:
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


async def abandon(client: Any, future: Any, key: str, *, restart: bool, also: tuple[Any, ...] = ()) -> bool:
    """Cancel ``future`` (and ``also``) on the cluster; with ``restart`` also kill its worker; never
    cancelled. Returns whether a worker process was killed.
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
            await client.cancel([future, *also], reason="microbatch: timeout or caller cancelled")
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
