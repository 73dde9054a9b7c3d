"""When the pipeline writes a checkpoint: every so many seconds, every so many batches, or both.

A checkpoint is always also written at the end of a run and when it stops early; this schedule only
decides the periodic ones. Times are explicit (``now``), so the rules are tested without a clock.
"""

from __future__ import annotations

__all__ = ["CheckpointSchedule"]


class CheckpointSchedule:
    """Says after each folded batch whether a checkpoint is due.

    ``every`` seconds (None: never by time) since the last checkpoint, or ``every_batches`` batches
    (None: never by count) since it; whichever comes first. ``every=0`` checkpoints after every
    batch.
    """

    __slots__ = ("every", "every_batches", "_last", "_batches")

    def __init__(self, every: float | None, every_batches: int | None, now: float) -> None:
        self.every = every
        self.every_batches = every_batches
        self._last = now
        self._batches = 0

    def folded(self, now: float) -> bool:
        """Count one folded batch at ``now``; return True when a checkpoint is due."""
        self._batches += 1
        if self.every_batches is not None and self._batches >= self.every_batches:
            return True
        return self.every is not None and now - self._last >= self.every

    def saved(self, now: float) -> None:
        """A checkpoint was written at ``now``: both counts start again."""
        self._last = now
        self._batches = 0
