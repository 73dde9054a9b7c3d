"""``BatcherStats``: a snapshot of a ``Batcher``'s counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._core.intake import Intake

__all__ = ["BatcherStats", "snapshot"]


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a ``Batcher``'s counters (``batcher.stats``); times are in seconds."""

    #: Batches given to fn (a batch whose callers were all cancelled is never given and not counted).
    batches: int = 0
    #: Items given to fn.
    items: int = 0
    #: Batches cut because they reached ``max_size``.
    flushed_by_size: int = 0
    #: Partial batches cut because ``max_wait`` passed since their first item.
    flushed_by_time: int = 0
    #: Partial batches cut because the batcher was closing.
    flushed_by_close: int = 0
    #: How many batches had each size: ``{size: count}``.
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    #: Sum over items of the time from ``submit`` to the dispatch of their batch.
    wait_total: float = 0.0
    #: The longest such time.
    wait_max: float = 0.0
    #: Batches that failed as a whole: fn raised or ran past ``timeout``, or returned the wrong
    #: number of results.
    batch_errors: int = 0
    #: Items whose slot in fn's result held an exception instance.
    item_errors: int = 0
    #: Items withdrawn before dispatch because their caller was cancelled; they never reached fn.
    cancelled: int = 0
    #: Results discarded because their caller was cancelled after dispatch.
    dropped: int = 0
    #: Items queued for a batch right now (at most ``max_pending``).
    pending: int = 0
    #: Callers waiting in ``submit`` for room in the queue right now.
    blocked: int = 0
    #: Batches being processed by fn right now (at most ``max_concurrent_batches``).
    running: int = 0

    @property
    def mean_batch_size(self) -> float:
        """Mean number of items per batch (0.0 before the first batch)."""
        return self.items / self.batches if self.batches else 0.0

    @property
    def max_batch_size(self) -> int:
        """Largest batch given to fn so far (0 before the first batch)."""
        return max(self.batch_sizes, default=0)

    @property
    def mean_wait(self) -> float:
        """Mean time from ``submit`` to dispatch, over the items given to fn."""
        return self.wait_total / self.items if self.items else 0.0


def snapshot(intake: Intake[Any, Any]) -> BatcherStats:
    """The counters of ``intake`` as a :class:`BatcherStats`."""
    return BatcherStats(
        batches=sum(intake.sizes.values()),
        items=intake.items,
        flushed_by_size=intake.by_size,
        flushed_by_time=intake.by_time,
        flushed_by_close=intake.by_close,
        batch_sizes=dict(sorted(intake.sizes.items())),
        wait_total=intake.wait_total,
        wait_max=intake.wait_max,
        batch_errors=intake.batch_errors,
        item_errors=intake.item_errors,
        cancelled=intake.cancelled,
        dropped=intake.dropped,
        pending=len(intake.queue),
        blocked=len(intake.blocked),
        running=intake.running,
    )
