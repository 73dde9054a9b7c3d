"""The fold stage's part in time windows: stamp, close after each batch, record late records, deliver.

With a ``Windows`` aggregate the folder calls :meth:`WindowHook.close` after folding a batch (the
watermark moves, the windows it reaches are taken out of the state), writes the late records as
dead letters with reason ``late`` (unless ``on_late="drop"``), and hands the closed windows to the
sink before any checkpoint that no longer holds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..aggregate.windows import Closed, Late, Windows, each_result, iso
from ..checkpoints.deadletters import DeadLetter, DeadLetterFile
from .stats import Stats

__all__ = ["WindowHook"]

log = logging.getLogger("microbatch")


class WindowHook:
    """What the folder does for a ``Windows`` aggregate; ``sink`` gets the closed windows.

    A sink with a ``deliver(seq, windows)`` method gets each batch's closed windows as one list, a
    keyed window as one ``KeyedWindow`` (and ``end()`` when folding is over); a plain
    ``sink(seq, window)`` gets them one ``WindowResult`` at a time.
    """

    def __init__(
        self, windows: Windows, state: Any, sink: Callable[[int, Any], Awaitable[None]] | None,
        dead: DeadLetterFile, stats: Stats,
    ) -> None:
        stats.late_records = state.late_records  # a resumed run goes on counting
        self.agg = windows
        self.sink = sink
        self.dead = dead
        self.stats = stats
        self.warned = False
        self.undelivered = False

    def stamp(self, results: list[Any], cut_at: float) -> list[Any]:
        """The batch's results as the aggregate folds them; ``cut_at`` on the run's clock."""
        if self.agg.clock == "event":
            return results
        return self.agg.stamp(results, time.time() - (anyio.current_time() - cut_at))

    def close(self, state: Any, seq: int) -> list[Closed]:
        """After batch ``seq``: move the watermark, take the windows it closed, record late records."""
        agg = self.agg
        closed, late = agg.close_batch(state)
        self.stats.late_records = state.late_records
        if late and agg.on_late == "dead_letter":
            self.dead.write([_late_letter(item, seq, agg.watermark(state)) for item in late])
        for item in late:
            log.info("batch %d: %d late record(s) for the closed window %s..%s", seq, item.records,
                     iso(item.start), iso(item.end))
        return closed

    def close_all(self, state: Any) -> list[Closed]:
        return self.agg.close_all(state)

    async def deliver(self, seq: int, closed: list[Closed]) -> None:
        """Hand over the windows batch ``seq`` closed. Until they are out, ``undelivered``: the
        state no longer holds them, so no final checkpoint may be written (a rerun hands them over
        again)."""
        sink = self.sink
        deliver = getattr(sink, "deliver", None)
        self.undelivered = True
        if deliver is not None:
            await deliver(seq, closed)
        elif sink is not None:
            for item in each_result(closed):
                await sink(seq, item)
        self.undelivered = False
        if sink is None and not self.warned:
            self.warned = True
            log.warning(
                "closed windows are handed to the pipeline's sink= or taken from pipeline.windows(); "
                "this run has neither, so they are dropped (the first at batch %d: %s)", seq, closed[0]
            )

    async def end_of_source(self, state: Any, finished: bool, seq: int) -> None:
        """At the end of the source (``finished``) every open window closes; then :meth:`end`."""
        closed = self.close_all(state) if finished else []
        if closed:
            await self.deliver(seq, closed)
        self.end()

    def end(self) -> None:
        end = getattr(self.sink, "end", None)
        if end is not None:
            end()


def _late_letter(late: Late, seq: int, watermark: object) -> DeadLetter:
    record = {"reason": "late", "timestamp": late.first, "last_timestamp": late.last,
              "records": late.records, "window": [late.start, late.end]}
    if late.key is not None:
        record["key"] = late.key
    return DeadLetter(
        record=record, batch=seq, position=None, error_type="late",
        message=(f"{late.records} record(s) with timestamps {late.first}..{late.last} came for the window "
                 f"[{iso(late.start)}, {iso(late.end)}) after it closed (watermark {watermark})"),
        traceback="",
    )
