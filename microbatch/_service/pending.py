"""``PendingResult``: the handle ``Batcher.submit_nowait`` returns."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._core.intake import BLOCKED, DONE, QUEUED, Slot
from .._exceptions import BatcherClosed

if TYPE_CHECKING:
    from .batcher import Batcher

__all__ = ["PendingResult"]

R = TypeVar("R")


class PendingResult(Generic[R]):
    """The handle ``Batcher.submit_nowait`` returns: ``await`` it for the item's result.

    The item is queued whether or not the handle is ever awaited; a result nobody awaits is
    discarded. Awaiting it behaves exactly like ``await batcher.submit(item)`` from that point:
    cancelling the awaiting task before the item is dispatched withdraws the item.
    """

    __slots__ = ("_batcher", "_slot")

    def __init__(self, batcher: Batcher[Any, R], slot: Slot[Any, R]) -> None:
        self._batcher = batcher
        self._slot = slot

    def __await__(self) -> Generator[Any, None, R]:
        return self._batcher._wait(self._slot).__await__()

    def done(self) -> bool:
        """Whether the item's result (or error) has been delivered."""
        return self._slot.state == DONE

    def cancel(self) -> bool:
        """Withdraw the item if fn has not received it yet; return whether it was withdrawn.

        A withdrawn item never reaches fn, and awaiting this handle afterwards raises
        ``BatcherClosed`` naming the withdrawal. Once dispatched, an item cannot be withdrawn and
        ``False`` is returned.
        """
        slot = self._slot
        if slot.state not in (QUEUED, BLOCKED):
            return False
        self._batcher._abandon(slot)
        slot.fail(BatcherClosed("this item was withdrawn with PendingResult.cancel() before dispatch"))
        return True
