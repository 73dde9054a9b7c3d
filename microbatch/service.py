"""``Batcher``: dynamic batching for async services.

Many concurrent tasks (request handlers, typically) each submit one item and await that item's
result, while ``fn`` is called underneath on lists of items bounded by size and by time::

    async def embed(texts: list[str]) -> list[list[float]]:
        ...  # one call to a model, a database or an HTTP API for the whole list

    async with mb.Batcher(embed, max_size=32, max_wait=0.005) as batcher:
        vector = await batcher.submit("hello")   # in each request handler

How it works: ``submit`` appends the item to a queue and parks its caller on one event; a single
flusher task cuts the queue into batches (:class:`microbatch._core.intake.Intake` decides, with
:class:`microbatch._core.policy.BatchPolicy`: a batch is due when it holds ``max_size`` items, or
``max_wait`` seconds after its first item arrived) and starts one task per batch, at most
``max_concurrent_batches`` at a time.

While every batch slot is busy, the waiting partial batch keeps growing up to ``max_size`` instead
of being cut at its deadline, so a slow ``fn`` receives larger batches; it is dispatched as soon as
a slot frees. ``max_wait`` is therefore the bound on batching delay, not on queueing delay.

This module is the public face; the implementation lives in ``microbatch/_service/`` (the async
shell) and ``microbatch/_core/intake.py`` (the decisions, with no I/O).
"""

from __future__ import annotations

from ._service.batcher import AsyncBatchFn as AsyncBatchFn
from ._service.batcher import Batcher
from ._service.batcher import SyncBatchFn as SyncBatchFn
from ._service.call import BatchExecutor
from ._service.pending import PendingResult
from ._service.stats import BatcherStats

__all__ = ["Batcher", "BatcherStats", "BatchExecutor", "PendingResult"]
