"""One call of a ``Batcher``'s fn on a batch: in the event loop, a thread or an executor, with a timeout."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.to_thread

from .._exceptions import BatchTimeout

__all__ = ["BatchExecutor", "BatchCall", "is_async_callable"]


class BatchExecutor(Protocol):
    """Anything that can run a synchronous ``fn(arg)`` somewhere and await its result.

    microbatch's executors (worker processes, threads, inline, Dask) all fit; a ``Batcher`` given
    one calls ``await executor.run(fn, items)`` once per batch, or
    ``await executor.run(fn, items, timeout=timeout)`` when the batcher has a ``timeout``: the
    executor enforces it (a ``ProcessExecutor`` kills the worker and raises ``BatchTimeout``), and
    its own defaults (retries of a crashed worker) apply. Whatever ``run`` raises reaches every
    caller of that batch.
    """

    def run(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        /,
        *,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """Run ``fn(arg)`` and return its result; past ``timeout`` seconds raise ``BatchTimeout``."""
        ...


def is_async_callable(fn: object) -> bool:
    """Whether ``fn`` is an ``async def`` function or an object with an ``async def __call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    return inspect.iscoroutinefunction(type(fn).__call__)


class BatchCall:
    """How a ``Batcher`` calls its fn on one batch; ``await call(items, where)`` returns fn's result.

    - an async fn is awaited in the event loop; past ``timeout`` it is cancelled;
    - a sync fn with an executor runs through ``executor.run``, which enforces the timeout itself;
    - a sync fn without one runs in a worker thread; past ``timeout`` the thread (which cannot be
      killed) is abandoned: it runs on, its result is discarded.

    Past ``timeout`` the call raises ``BatchTimeout``, naming ``where`` (the batch) and fn.
    """

    __slots__ = ("fn", "name", "is_async", "executor", "timeout")

    def __init__(
        self,
        fn: Callable[[list[Any]], Any],
        name: str,
        is_async: bool,
        executor: BatchExecutor | None,
        timeout: float | None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.is_async = is_async
        self.executor = executor
        self.timeout = timeout

    async def __call__(self, items: list[Any], where: str) -> Any:
        timeout = self.timeout
        if self.executor is not None:
            if timeout is None:  # an executor without a timeout parameter still fits
                return await self.executor.run(self.fn, items)
            return await self.executor.run(self.fn, items, timeout=timeout)
        with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
            if self.is_async:
                return await self.fn(items)
            # Without a timeout a thread is waited for, also at shutdown (nothing runs on unseen);
            # with one, a hung thread must not hold the batch forever.
            return await anyio.to_thread.run_sync(self.fn, items, abandon_on_cancel=timeout is not None)
        assert scope.cancelled_caught
        if self.is_async:
            raise BatchTimeout(
                f"{where}: fn {self.name} ran longer than timeout={timeout} s and was cancelled "
                f"(raise the timeout or lower max_size)"
            )
        raise BatchTimeout(
            f"{where}: fn {self.name} ran longer than timeout={timeout} s in a worker thread; a thread "
            f"cannot be killed and was abandoned (it runs on in the background; pass "
            f"executor=ProcessExecutor(...) to kill hung calls)"
        )
