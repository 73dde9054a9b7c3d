"""The one way microbatch waits for a deadline: until something arrives or the time passes.

Below the batching layer, the sources and the service, so that each of them waits the same way
without importing the others (``lint-imports`` checks the layers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ._core.deadline import wait_deadline

__all__ = ["wait_until"]


async def wait_until(deadline: float | None, wait: Callable[[], Awaitable[object]]) -> bool:
    """Await ``wait()`` until the absolute ``deadline`` (``anyio.current_time()``; None: no limit).

    Returns True when ``wait()`` returned, False when the deadline came first (``wait()`` is then
    cancelled, so it must be safe to cancel: an event's ``wait()``, a memory stream's
    ``receive()``). Exceptions of ``wait()`` propagate. The one way microbatch waits for a
    partial batch's deadline, a connection's idle time or a free connection slot.
    """
    with anyio.CancelScope(deadline=wait_deadline(deadline)):
        await wait()
        return True
    return False
