"""Windows: any aggregator folded per time window, windows closed by a watermark and handed over.

State (what ``dump`` writes, JSON)::

    {"format": "microbatch.windows/1", "top": 1700000123.5, "emitted": 1440, "late": 3,
     "windows": [[start, state], ...],                      # tumbling and hopping, not keyed
     "windows": [[start, {"keys": [...], "states": [...]}], ...],   # keyed (ByKey inner)
     "sessions": [[key, start, last, state], ...]}          # sessions; key null when not keyed

``top`` is the largest timestamp folded (the watermark is ``top - grace``), ``emitted`` the number
of windows closed so far (the emission high-water mark), ``late`` the late records counted. Only
open windows are kept: a closed window is handed over once and evicted, so the state does not grow
with the span of event time, and a window a checkpoint no longer holds can never come out again.
A folder or SQLite store keeps keyed tumbling and hopping windows as one file per open window
instead, rewritten only when it changed (:mod:`microbatch.checkpoints.windowfiles`, fed by
``window_changes``).
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Iterable
from typing import Any, Literal

from .._core.windows import Grouped, Number, Spec, group, merge_runs
from .base import Aggregator
from .bykey import ByKey
from .combine import int_partials, merger_for, reducer_for
from .keyed import folder_for
from .windowstate import (
    FORMAT,
    Closed,
    KeyedWindow,
    Late,
    OpenWindows,
    StateIO,
    WindowResult,
    WindowsState,
    _sorted,
    count_results,
    each_result,
    iso,
)

__all__ = [
    "FORMAT", "Closed", "KeyedWindow", "Late", "OpenWindows", "WindowResult", "WindowedFn", "Windows",
    "WindowsState", "combine_in_worker", "count_results", "each_result", "iso",
]

Clock = Literal["event", "processing"]
OnLate = Literal["dead_letter", "drop"]
_MISSING: Any = object()


class Windows(StateIO, Aggregator[Any, WindowsState, OpenWindows]):
    """Folds ``inner`` per time window: tumbling (``size``), hopping (``size``, ``slide``) or
    session (``gap``, per key when ``inner`` is a ``ByKey``); any other combination is a
    ``ValueError`` saying which.

    With ``clock="event"`` (the default) ``fn`` returns a list of ``(timestamp, partial)`` pairs,
    the timestamp in epoch seconds (int or float) or an aware ``datetime``, the partial what
    ``inner`` folds; with a ``ByKey`` inner also ``(timestamp, key, partial)``. The pairs are
    grouped by window (and key) in the worker, so a batch sends one partial per window and key for
    ``Count`` and ``Sum`` (other aggregators: the partials of one window travel together and are
    folded one by one). With ``clock="processing"``, ``fn`` returns plain partials, stamped with
    the wall-clock time their batch was read.

    The watermark is the largest timestamp folded minus ``grace`` seconds. A batch is judged
    against the watermark as it stood before it; a window ``[start, end)`` closes when the
    watermark reaches ``end``, and at the end of a finite source every open window closes.
    A partial for a closed window is late: counted (``stats.late_records``) and, with
    ``on_late="dead_letter"`` (the default), written to the dead-letter file; ``"drop"`` only
    counts it. For sessions, the records of one batch less than ``gap`` apart are judged together.

    Session windows need an ``inner`` whose states can merge (``Count``, ``Sum``, ``Mean``,
    ``Min``, ``Max``, ``Aggregates`` of them, or any aggregator with a ``merge(a, b)`` method).
    ``Windows`` is used as a pipeline's own aggregate, not inside another aggregator.
    """

    def __init__(
        self,
        inner: Aggregator[Any, Any, Any],
        *,
        size: Number | None = None,
        slide: Number | None = None,
        gap: Number | None = None,
        grace: Number = 0.0,
        clock: Clock = "event",
        on_late: OnLate = "dead_letter",
    ) -> None:
        if not isinstance(inner, Aggregator):
            raise TypeError(
                f"Windows(inner): inner must be an aggregator such as mb.Count(), got {inner!r:.100}"
            )
        if isinstance(inner, Windows):
            raise ValueError("Windows(inner): inner is a Windows already; windows do not nest")
        self._spec = Spec(size, slide, gap, grace)
        if clock not in ("event", "processing"):
            raise ValueError(f"Windows(clock=...) must be 'event' or 'processing', got {clock!r}")
        if on_late not in ("dead_letter", "drop"):
            raise ValueError(f"Windows(on_late=...) must be 'dead_letter' or 'drop', got {on_late!r}")
        self.inner = inner
        self.clock: Clock = clock
        self.on_late: OnLate = on_late
        self.keyed = isinstance(inner, ByKey)
        unit = inner.inner if isinstance(inner, ByKey) else inner
        self._unit: Aggregator[Any, Any, Any] = unit
        self._folder = folder_for(unit)
        self._reduce = reducer_for(unit)
        self._merge = merger_for(unit)
        self._ints = int_partials(unit)
        # a window's dict of int partials from the worker may become its state as it is
        self._adopt = self.keyed and self._ints != 0
        if self._spec.kind == "session" and self._merge is None:
            raise ValueError(
                f"Windows({unit.describe()}, gap=...): session windows merge the states of two "
                f"sessions that a record bridges, and {unit.describe()} cannot merge: give it a "
                f"merge(a, b) method, or use size= windows"
            )

    @property
    def kind(self) -> str:
        """``"tumbling"``, ``"hopping"`` or ``"session"``."""
        return self._spec.kind

    @property
    def grace(self) -> Number:
        return self._spec.grace

    def describe(self) -> str:
        return (f"Windows({self.inner.describe()}, {self._spec.describe()}, clock={self.clock!r}, "
                f"on_late={self.on_late!r})")

    # --- in the worker ------------------------------------------------------------------------

    def combine(self, result: Any) -> Grouped:
        """``fn``'s pairs grouped by window (and key), each group's partials reduced."""
        if isinstance(result, Grouped):
            return result
        return group(result, self._spec, self.keyed, self._reduce, self._ints)

    def stamp(self, results: Iterable[Any], read_at: float) -> list[Any]:
        """The batch results as ``fold`` takes them: with the processing clock, each stamped with
        ``read_at`` (epoch seconds); with the event clock, as they are."""
        if self.clock == "event":
            return list(results)
        return [[(read_at, result)] for result in results]

    # --- folding ------------------------------------------------------------------------------

    def initial(self) -> WindowsState:
        return WindowsState()

    def watermark(self, state: WindowsState) -> Number | None:
        """The watermark (None before anything was folded): closed windows end at or before it."""
        return None if state.top is None else state.top - self._spec.grace

    def fold(self, state: WindowsState, result: Any) -> WindowsState:
        try:
            grouped = self.combine(result)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self.describe()}: {exc}") from None
        if state.broken is not None:
            raise ValueError(state.broken)
        if grouped.top is None:
            return state
        mark = self.watermark(state)
        try:
            if self._spec.kind == "session":
                self._fold_sessions(state, grouped, mark)
            else:
                self._fold_windows(state, grouped, mark)
        except (TypeError, ValueError) as exc:
            state.broken = (
                f"{self.describe()}: this state holds part of a refused batch result and cannot fold "
                f"or be saved any more (the refusal was: {exc})"
            )
            raise type(exc)(f"{self.describe()}: {exc}") from None
        if state.pending is None or grouped.top > state.pending:
            state.pending = grouped.top
        return state

    def _late(self, state: WindowsState, late: Late) -> None:
        state.late.append(late)
        state.late_records += late.records

    def _fold_unit(self, s: Any, partials: list[Any]) -> Any:
        fold = self._unit.fold
        for partial in partials:
            s = fold(s, partial)
        return s

    def _fold_windows(self, state: WindowsState, grouped: Grouped, mark: Number | None) -> None:
        size, open_, keyed, adopt = self._spec.size, state.open, self.keyed, self._adopt
        changed = state.changed
        for start, bucket in grouped.buckets.items():
            end = start + size
            if mark is not None and end <= mark:
                n, first, last = bucket[:3]
                self._late(state, Late(start, end, None, n, first, last))
                continue
            changed.add(start)
            s = open_.get(start, _MISSING)
            if not keyed:
                partials = bucket[3]
                open_[start] = self._fold_unit(self._unit.initial() if s is _MISSING else s, partials)
                continue
            singles, more, ints = bucket[3:]
            if s is _MISSING:
                if adopt and ints:
                    open_[start] = singles  # a new window's counts, as the worker added them
                    continue
                s = open_[start] = {}
            self._folder.fold(s, singles)
            for key, ps in more.items():
                for p in ps:
                    self._folder.fold(s, {key: p})

    def _fold_sessions(self, state: WindowsState, grouped: Grouped, mark: Number | None) -> None:
        gap, merge, unit = self._spec.gap, self._merge, self._unit
        assert merge is not None
        for key, runs in grouped.buckets.items():
            sessions = state.sessions.setdefault(key, [])
            for first, last, n, partials in runs:
                if mark is not None and last + gap <= mark:
                    self._late(state, Late(first, last + gap, key, n, first, last))
                    continue
                i, j = merge_runs(sessions, first, last, gap)
                if j - i == 1:
                    session = sessions[i]
                    session[2] = self._fold_unit(session[2], partials)
                else:
                    s = self._fold_unit(unit.initial(), partials)
                    if j > i:
                        for other in sessions[i:j]:
                            s = merge(other[2], s)
                        session = [min(first, sessions[i][0]), max(last, sessions[j - 1][1]), s]
                    else:
                        session = [first, last, s]
                    sessions[i:j] = [session]
                session[0], session[1] = min(session[0], first), max(session[1], last)
                state.tick += 1
                heapq.heappush(state.heap, (session[1] + gap, state.tick, key, session[0]))
            if not sessions:
                del state.sessions[key]

    def close_batch(self, state: WindowsState) -> tuple[list[Closed], list[Late]]:
        """After a batch was folded: move the watermark, close and evict the windows that end at or
        before it, and hand them over in close order (a keyed window as one ``KeyedWindow``) with
        the batch's late records."""
        if state.pending is not None and (state.top is None or state.pending > state.top):
            state.top = state.pending
        state.pending = None
        late, state.late = state.late, []
        mark = self.watermark(state)
        return ([] if mark is None else self._close(state, mark)), late

    def close_all(self, state: WindowsState) -> list[Closed]:
        """Close every open window (the end of a finite source), in close order."""
        return self._close(state, float("inf"))

    def _close(self, state: WindowsState, mark: Number) -> list[Closed]:
        if self._spec.kind == "session":
            results: list[WindowResult] = []
            heap, value, gap = state.heap, self._unit.value, self._spec.gap
            while heap and heap[0][0] <= mark:
                end, _, key, start = heapq.heappop(heap)
                sessions = state.sessions.get(key, [])
                for i, session in enumerate(sessions):
                    if session[0] == start and session[1] + gap == end:
                        del sessions[i]
                        results.append(WindowResult(start, end, value(session[2]), key))
                        break
                if not sessions:
                    state.sessions.pop(key, None)
            state.emitted += len(results)
            return list(_sorted(results))
        closed: list[Closed] = []
        size, open_, changed = self._spec.size, state.open, state.changed
        for start in sorted(open_):
            end = start + size
            if end > mark:
                break
            closed.append(self._closed(start, end, open_.pop(start)))
            changed.discard(start)  # without checkpoints nothing else empties it
        state.emitted += count_results(closed)
        return closed


def combine_in_worker(fn: Callable[[list[Any]], Any], windows: Windows) -> Callable[[list[Any]], Any]:
    """``fn`` followed by ``windows.combine`` (the worker's half of event-time windows); ``fn``
    itself for the processing clock, whose results are stamped where they are folded."""
    if isinstance(fn, WindowedFn):
        fn = fn.fn
    if windows.clock != "event":
        return fn
    return WindowedFn(fn, windows._spec, windows.keyed, windows._reduce, windows._ints)


class WindowedFn:
    """Runs ``fn`` on a batch and groups its pairs by window in the worker (picklable: it holds
    the window settings, not the aggregator)."""

    __slots__ = ("fn", "spec", "keyed", "reduce", "ints")

    def __init__(self, fn: Callable[[list[Any]], Any], spec: Spec, keyed: bool,
                 reduce: Callable[[list[Any]], list[Any]], ints: int) -> None:
        self.fn = fn
        self.spec = spec
        self.keyed = keyed
        self.reduce = reduce
        self.ints = ints

    def __call__(self, records: list[Any]) -> Grouped:
        # The cyclic collector is paused while fn runs and its pairs are grouped: the pairs (one
        # per record) stay alive until then, so collections meanwhile would walk them and free
        # nothing; they are freed before it resumes. Cyclic garbage fn leaves is collected later.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            result = self.fn(records)
            grouped = group(result, self.spec, self.keyed, self.reduce, self.ints)
            del result
        finally:
            if paused:
                gc.enable()
        return grouped

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fn, self.spec, self.keyed, self.reduce, self.ints)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fn, self.spec, self.keyed, self.reduce, self.ints = state
