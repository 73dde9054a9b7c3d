"""The size/time batching decision, with no I/O and no event loop.

The policy only counts: it is told how many records arrived and when, and answers how many records
to cut into batches. The async shells (``batches()``, the pipeline's block batcher, ``Batcher``)
hold the records themselves and do the cutting, so the same policy serves lists of records, blocks
of lines and pending requests alike.

Rules:

- a batch holds between 1 and ``max_size`` records;
- a partial batch is due ``max_wait`` seconds after its first record arrived (``deadline``);
- ``max_wait=None`` means a partial batch waits for more records or the end of the source;
- ``max_wait=0`` means a partial batch is due as soon as it exists.
"""

from __future__ import annotations

import math

__all__ = ["BatchPolicy", "check_limits"]


def check_limits(max_size: int, max_wait: float | None) -> None:
    """Raise ``ValueError`` naming the parameter when ``max_size`` or ``max_wait`` is invalid."""
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, got {type(max_size).__name__}")
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    if max_wait is not None:
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)):
            raise TypeError(f"max_wait must be a number of seconds or None, got {max_wait!r}")
        if math.isnan(max_wait) or max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds or None, got {max_wait}")


class BatchPolicy:
    """Decides when records become batches, from counts and explicit times.

    ``add(n, now)`` returns how many full batches (of exactly ``max_size``) are ready;
    ``due(now)`` says whether the partial batch has reached its deadline; ``take_partial()`` and
    ``flush()`` hand out the partial batch. ``pending`` is the number of records not yet cut.
    """

    __slots__ = ("max_size", "max_wait", "pending", "deadline")

    def __init__(self, max_size: int, max_wait: float | None = None) -> None:
        check_limits(max_size, max_wait)
        self.max_size = max_size
        self.max_wait = None if max_wait is None else float(max_wait)
        #: Records received but not yet cut into a batch (always < max_size between calls).
        self.pending = 0
        #: When the partial batch is due, or None when there is none or max_wait is None.
        self.deadline: float | None = None

    def add(self, n: int, now: float) -> int:
        """Record that ``n`` records arrived at ``now``; return the number of full batches to cut.

        The caller cuts ``returned * max_size`` records from the front of its buffer. The records
        left over (``pending``) form a partial batch whose deadline starts at its first record:
        a partial batch that already existed keeps its deadline.
        """
        if n <= 0:
            return 0
        had_partial = self.pending > 0
        total = self.pending + n
        full, self.pending = divmod(total, self.max_size)
        if self.pending == 0:
            self.deadline = None
        elif full or not had_partial:
            # The leftover records started a new partial batch at `now`.
            self.deadline = None if self.max_wait is None else now + self.max_wait
        return full

    def due(self, now: float) -> bool:
        """Whether the partial batch must be emitted at ``now``."""
        return self.deadline is not None and now >= self.deadline

    def take_partial(self) -> int:
        """Hand out the partial batch (its deadline passed); return its size, possibly 0."""
        n, self.pending, self.deadline = self.pending, 0, None
        return n

    def flush(self) -> int:
        """End of input: return the size of the remainder to emit (0 if none)."""
        return self.take_partial()
