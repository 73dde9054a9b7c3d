"""``ThreadExecutor``: calls in anyio's worker threads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from .._core.params import callable_name
from .._exceptions import BatchTimeout
from .base import NothingToStart, check_timeout

__all__ = ["ThreadExecutor"]

A = TypeVar("A")
R = TypeVar("R")


class ThreadExecutor(NothingToStart):
    """Runs calls in threads of anyio's thread pool, at most ``workers`` (default 4) at once.

    Use it for ``fn`` that releases the GIL (I/O, NumPy, compression) or cannot be pickled. No
    pickling happens: ``fn`` and ``arg`` are shared with the caller. Exceptions of ``fn`` pass through
    unchanged.

    Limits: a thread cannot be killed. A call past ``timeout``, or whose caller is cancelled, is
    abandoned: ``BatchTimeout`` (or the cancellation) is raised at once, but the thread runs on to
    its end and its result is dropped; while it runs it no longer counts against ``workers``, so
    abandoned calls can make more than ``workers`` threads busy. ``timeouts`` counts such calls.
    Entering the executor (``async with``) is optional; leaving it does not wait for abandoned threads.
    """

    def __init__(self, workers: int = 4) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.capacity = workers
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self._limiter = anyio.CapacityLimiter(workers)
        self._threads = anyio.CapacityLimiter(math.inf)

    def __repr__(self) -> str:
        return f"<ThreadExecutor workers={self.capacity} timeouts={self.timeouts}>"


    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` in a thread and return its result; see the class docstring."""
        check_timeout(timeout)
        with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
            # Our own limiter, held only while the call is awaited: an abandoned thread frees its
            # place at once on every backend (trio's thread limiter would keep it until the thread ends).
            async with self._limiter:
                return await anyio.to_thread.run_sync(fn, arg, limiter=self._threads, abandon_on_cancel=True)
        assert scope.cancelled_caught
        self.timeouts += 1
        raise BatchTimeout(
            f"{callable_name(fn)} ran longer than timeout={timeout} s in a thread; the thread cannot be "
            f"killed and was abandoned (it runs on in the background; use ProcessExecutor to kill hung calls)"
        )
