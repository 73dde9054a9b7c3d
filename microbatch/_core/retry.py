"""Retry and poison-isolation decisions, with no I/O.

A batch that fails (an exception from ``fn``, a crashed worker, a timeout) is retried up to
``retries`` times with exponential backoff and full jitter. When it still fails, the pipeline either
stops (``on_error="raise"``) or isolates the failing records by bisection: the batch is split in
halves, each half is run once, a failing half is split again, and a single failing record is retried
like a batch before it is declared dead. Good records' results still count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RetryPolicy", "halves"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failed batch is retried.

    ``retries`` extra attempts after the first; the n-th retry (n = 1, 2, ...) waits a random time
    in ``[0, min(max_backoff, backoff * 2 ** (n - 1))]`` ("full jitter"), so that retries of many
    batches failing together spread out instead of arriving at once.
    """

    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    @property
    def attempts(self) -> int:
        """Total attempts a batch gets: the first one and its retries."""
        return self.retries + 1

    def should_retry(self, failed_attempts: int) -> bool:
        """Whether a batch that has failed ``failed_attempts`` times gets another attempt."""
        return failed_attempts <= self.retries

    def delay(self, failed_attempts: int, rand: float) -> float:
        """Seconds to wait before the next attempt; ``rand`` is uniform in [0, 1)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** max(0, failed_attempts - 1))
        return ceiling * rand


def halves(n: int) -> tuple[int, int]:
    """Sizes of the two parts a failing batch of ``n >= 2`` records is split into."""
    if n < 2:
        raise ValueError(f"cannot split a batch of {n} record(s)")
    head = n // 2
    return head, n - head
