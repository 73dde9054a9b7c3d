"""``InlineExecutor``: calls in the event loop's own thread, for tests and debugging."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

from .base import NothingToStart, check_timeout

__all__ = ["InlineExecutor"]

A = TypeVar("A")
R = TypeVar("R")


class InlineExecutor(NothingToStart):
    """Runs each call directly in the event loop's thread, one at a time: for tests and debugging.

    Breakpoints, profilers and coverage see ``fn`` as ordinary code, and exceptions pass through
    unchanged. ``capacity`` is 1; concurrent calls wait their turn, first come first served.

    Limits: while ``fn`` runs the event loop is blocked (no other task, timer or I/O progresses), and
    ``timeout`` cannot be enforced: it is checked for validity and otherwise ignored. Cancellation
    takes effect before ``fn`` starts, never during it.
    """

    def __init__(self) -> None:
        self.capacity = 1
        self.crashes = 0
        self.timeouts = 0
        self.restarts = 0
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return "<InlineExecutor>"


    async def run(
        self,
        fn: Callable[[A], R],
        arg: A,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per call, part of the Executor protocol
    ) -> R:
        """Run ``fn(arg)`` now, in this thread, and return its result; ``timeout`` is not enforced."""
        check_timeout(timeout)
        async with self._lock:
            await anyio.lowlevel.checkpoint()
            return fn(arg)
