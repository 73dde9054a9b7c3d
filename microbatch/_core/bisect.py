"""The bisection plan: which record ranges of a failing batch to run, to isolate its failing records.

A batch that failed all its attempts is split in halves; each half runs once, in order. A half that
succeeds counts; a half that fails is split again, depth first, so results stay in record order. A
single record that fails is run with the full retries before it is declared dead (a crash or a
timeout may have been another record's fault, or chance). The plan only keeps ranges of record
indexes; the pipeline cuts the payload and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .retry import halves

__all__ = ["BisectionPlan", "RecordRange"]


@dataclass(frozen=True, slots=True)
class RecordRange:
    """Records ``lo`` to ``hi`` (exclusive) of the batch; ``retry``: give it the full retries."""

    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def retry(self) -> bool:
        return self.size == 1


class BisectionPlan:
    """Depth-first halving of records ``0..count`` that failed together.

    Loop: ``span = plan.next()``; run it; ``plan.failed(span)`` or ``plan.succeeded(span)``; until
    ``next()`` returns None. ``dead`` lists the single records that failed, in order.
    """

    __slots__ = ("_todo", "dead", "succeeded_ranges")

    def __init__(self, count: int) -> None:
        head, _ = halves(count)
        self._todo = [RecordRange(head, count), RecordRange(0, head)]  # a stack: the last is run first
        self.dead: list[RecordRange] = []
        self.succeeded_ranges: list[RecordRange] = []

    def next(self) -> RecordRange | None:
        return self._todo[-1] if self._todo else None

    def succeeded(self, span: RecordRange) -> None:
        self._pop(span)
        self.succeeded_ranges.append(span)

    def failed(self, span: RecordRange) -> None:
        self._pop(span)
        if span.size == 1:
            self.dead.append(span)
        else:
            head, _ = halves(span.size)
            mid = span.lo + head
            self._todo += [RecordRange(mid, span.hi), RecordRange(span.lo, mid)]

    def _pop(self, span: RecordRange) -> None:
        if not self._todo or self._todo[-1] != span:
            raise ValueError(f"{span} is not the span the plan is running")
        self._todo.pop()
