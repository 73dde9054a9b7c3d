"""When ``ProcessExecutor`` replaces a worker that is alive and well: after so many calls, or once it
grew past a memory limit (a leak in ``fn`` or in a library it calls stays bounded).

A worker to replace is retired (:meth:`microbatch._core.calls.CallQueue.retire`): it takes no new
call, the calls already sent to it run to their answers, then it is stopped. So no call is lost or
run twice, and none counts as failed; the next call for its place starts a new worker.
"""

from __future__ import annotations

from .._core.calls import CallQueue
from .._core.params import check_bytes, check_int

__all__ = ["Recycling"]


class Recycling:
    """The limits after which a worker is replaced; ``None``: no such limit.

    ``max_tasks_per_worker``: a worker is sent at most this many calls, then replaced.
    ``max_worker_memory``: bytes, or a string such as ``"512MB"`` or ``"1.5GiB"``; a worker whose
    resident memory (RSS, measured by the worker itself after each call) is above it is replaced.
    The calls already queued in its pipe (``prefetch``) still run on it.
    """

    __slots__ = ("max_tasks", "max_memory")

    def __init__(self, max_tasks_per_worker: int | None, max_worker_memory: int | str | None) -> None:
        tasks, memory = max_tasks_per_worker, max_worker_memory
        self.max_tasks = None if tasks is None else check_int("max_tasks_per_worker", tasks, minimum=1)
        self.max_memory = None if memory is None else check_bytes("max_worker_memory", memory)

    def __repr__(self) -> str:
        return f"Recycling(max_tasks_per_worker={self.max_tasks}, max_worker_memory={self.max_memory})"

    @property
    def measures_memory(self) -> bool:
        """Whether workers must report their RSS with each answer."""
        return self.max_memory is not None

    def full(self, queue: CallQueue) -> bool:
        """After a call was sent: whether the worker was sent as many calls as it may run."""
        return self.max_tasks is not None and queue.sent >= self.max_tasks

    def too_big(self, rss: int) -> bool:
        """After an answer: whether the worker's RSS (bytes, as it reported) passed the limit."""
        return self.max_memory is not None and rss > self.max_memory
