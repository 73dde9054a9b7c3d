"""The bisection plan: which parts of a failing batch to run, to isolate its failing records.

A batch that failed all its attempts is split in halves; each half runs once, in order. A half that
succeeds counts; a half that fails is split again, depth first, so results stay in record order. A
single record that fails is run with the full retries before it is declared dead (a crash or a
timeout may have been another record's fault, or chance). The plan only keeps ranges of record
indexes; the pipeline cuts the payload and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .retry import halves

__all__ = ["BisectionPlan", "Part"]


@dataclass(frozen=True, slots=True)
class Part:
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

    Loop: ``part = plan.next()``; run it; ``plan.failed(part)`` or ``plan.succeeded(part)``; until
    ``next()`` returns None. ``dead`` lists the single records that failed, in order.
    """

    __slots__ = ("_todo", "dead", "succeeded_parts")

    def __init__(self, count: int) -> None:
        head, _ = halves(count)
        self._todo = [Part(head, count), Part(0, head)]  # a stack: the last is run first
        self.dead: list[Part] = []
        self.succeeded_parts: list[Part] = []

    def next(self) -> Part | None:
        return self._todo[-1] if self._todo else None

    def succeeded(self, part: Part) -> None:
        self._pop(part)
        self.succeeded_parts.append(part)

    def failed(self, part: Part) -> None:
        self._pop(part)
        if part.size == 1:
            self.dead.append(part)
        else:
            head, _ = halves(part.size)
            mid = part.lo + head
            self._todo += [Part(mid, part.hi), Part(part.lo, mid)]

    def _pop(self, part: Part) -> None:
        if not self._todo or self._todo[-1] != part:
            raise ValueError(f"{part} is not the part the plan is running")
        self._todo.pop()
