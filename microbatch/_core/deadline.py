"""When a wait for a batch's deadline ends, as a plain number (no I/O, no event loop).

The three shells that wait for a partial batch (``batches()``, the pipeline's reader, ``Batcher``)
wait the same way: until something arrives or the policy's absolute ``deadline`` passes, on the
event loop's clock. ``None`` (no partial batch, or ``max_wait=None``) means no deadline.
"""

from __future__ import annotations

import math

__all__ = ["wait_deadline"]


def wait_deadline(deadline: float | None) -> float:
    """The absolute time at which a wait for ``deadline`` gives up: ``inf`` when there is none.

    A deadline already passed is returned as it is: the wait ends at once, before anything arrives.
    """
    return math.inf if deadline is None else deadline
