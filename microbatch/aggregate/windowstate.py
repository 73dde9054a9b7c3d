"""The state of ``Windows`` and what is read from it: windows handed over, JSON, views.

See :mod:`microbatch.aggregate.windows` for the JSON form of the state.
"""

from __future__ import annotations

import datetime
import functools
import heapq
import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, NamedTuple

from .._core.keys import key_from_json, key_to_json
from .._core.windows import Number, Spec
from ..checkpoints.windowfiles import WindowChanges
from .base import JSON, Aggregator

__all__ = [
    "FORMAT", "Closed", "KeyedWindow", "Late", "OpenWindows", "StateIO", "WindowResult", "WindowsState",
    "count_results", "each_result", "iso",
]

FORMAT = "microbatch.windows/1"
_EPOCH = datetime.datetime(1970, 1, 1)


class WindowResult(NamedTuple):
    """One closed window: ``[start, end)`` in epoch seconds, the inner value, and its key (None
    unless the inner aggregate is a ``ByKey``)."""

    start: Number
    end: Number
    value: Any
    key: Any = None

    def to_json(self) -> dict[str, Any]:
        """The window as JSON data: ISO-8601 UTC times, the key as JSON (tuples as arrays)."""
        out: dict[str, Any] = {"start": iso(self.start), "end": iso(self.end)}
        if self.key is not None:
            out["key"] = key_to_json(self.key)
        out["value"] = self.value
        return out


class KeyedWindow(NamedTuple):
    """One closed window of a ``ByKey`` inner with all its keys: ``values`` maps each key to its
    value, keys in the order they first came in the stream (the same whatever the batch cuts of an
    in-order stream). What ``WindowStream.by_window()`` gives: one item per window, built without
    work per key (the window's dict is handed over as the state held it, for ``Count``).
    ``results()`` gives the ``WindowResult`` of each key, what the other ways hand over."""

    start: Number
    end: Number
    values: dict[Any, Any]

    def results(self) -> Iterator[WindowResult]:
        """A ``WindowResult(start, end, value, key)`` per key, in the order of ``values``."""
        values = self.values
        # built at C speed: one window may hold many keys
        return map(_make, zip(repeat(self.start), repeat(self.end), values.values(), values))


Closed = WindowResult | KeyedWindow


def each_result(closed: Iterable[Closed]) -> Iterator[WindowResult]:
    """The ``WindowResult``s of closed windows, a ``KeyedWindow`` giving one per key."""
    for item in closed:
        if type(item) is KeyedWindow:
            yield from item.results()
        else:
            yield item  # type: ignore[misc]


def count_results(closed: Iterable[Closed]) -> int:
    """How many ``WindowResult``s ``closed`` makes (one per key of a ``KeyedWindow``)."""
    return sum(len(item.values) if type(item) is KeyedWindow else 1 for item in closed)


class Late(NamedTuple):
    """Records that came for a window already closed: ``records`` of them, with timestamps from
    ``first`` to ``last``, for the window ``[start, end)`` (and ``key``)."""

    start: Number
    end: Number
    key: Any
    records: int
    first: Number
    last: Number


def iso(t: Number) -> str:
    """ISO-8601 UTC text of epoch seconds, e.g. ``2024-05-01T12:00:00Z`` (fractions when any)."""
    when = _EPOCH + datetime.timedelta(seconds=t)  # exact for ints, microseconds for floats
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{when.microsecond:06d}".rstrip("0") + "Z" if when.microsecond else f"{text}Z"


class WindowsState:
    """The open windows, the watermark's base and the counts; see the module's docstring."""

    __slots__ = ("open", "sessions", "heap", "top", "pending", "emitted", "late_records", "late", "tick",
                 "broken", "changed")

    def __init__(self) -> None:
        self.open: dict[Number, Any] = {}  # window start -> inner state (keyed: dict key -> state)
        self.sessions: dict[Any, list[list[Any]]] = {}  # key -> [[start, last, state], ...] by start
        self.heap: list[tuple[Number, int, Any, Number]] = []  # (end, tick, key, start): closes to check
        self.top: Number | None = None  # largest timestamp folded before the batch being folded
        self.pending: Number | None = None  # largest timestamp of the batch being folded
        self.emitted = 0
        self.late_records = 0
        self.late: list[Late] = []  # of the batch being folded, handed over by ``close_batch``
        self.tick = 0
        #: Why this state can neither fold nor be saved: it holds part of a refused batch result.
        self.broken: str | None = None
        #: The starts of the windows folded into since the last ``window_changes``.
        self.changed: set[Number] = set()


_make = functools.partial(tuple.__new__, WindowResult)


def _sorted(results: list[WindowResult]) -> list[WindowResult]:
    try:
        return sorted(results, key=lambda w: (w.end, w.start, w.key))
    except TypeError:  # keys of different types in one window
        return sorted(results, key=lambda w: (w.end, w.start, json.dumps(key_to_json(w.key))))


class StateIO:
    """What ``Windows`` does with a state besides folding: JSON (see ``aggregate/windows.py``) and
    back, and the views of its open windows."""

    _spec: Spec
    keyed: bool
    _unit: Aggregator[Any, Any, Any]
    _folder: Any
    _ints: int

    def describe(self) -> str:
        raise NotImplementedError

    def watermark(self, state: WindowsState) -> Number | None:
        raise NotImplementedError

    def _closed(self, start: Number, end: Number, s: Any) -> Closed:
        """The window ``[start, end)`` with state ``s``, taken out of the state, as handed over."""
        if not self.keyed:
            return WindowResult(start, end, self._unit.value(s))
        # Keys in the order they first came in the stream (a dict's order, kept by the checkpoint):
        # the same whatever the batch cuts of an in-order stream, and no sort per window.
        if self._ints != 1:  # Count keeps ints: the state is the value
            s = dict(zip(s, map(self._folder.value, s.values()), strict=True))
        return KeyedWindow(start, end, s)

    def _results(self, start: Number, end: Number, s: Any) -> Iterable[WindowResult]:
        if not self.keyed:
            return [WindowResult(start, end, self._unit.value(s))]
        values: Iterable[Any] = s.values()
        if self._ints != 1:
            values = map(self._folder.value, values)
        return map(_make, zip(repeat(start), repeat(end), values, s))

    def value(self, state: WindowsState) -> OpenWindows:
        """The open windows with their values so far (they may still change), in close order: a
        view computed on access (a pipeline computes a value per batch; most are never read)."""
        return OpenWindows(self, state)

    def open_windows(self, state: WindowsState) -> list[WindowResult]:
        """The open windows with their values so far, in close order."""
        if self._spec.kind == "session":
            value = self._unit.value
            gap = self._spec.gap
            return _sorted([
                WindowResult(s[0], s[1] + gap, value(s[2]), key)
                for key, sessions in state.sessions.items() for s in sessions
            ])
        size, open_ = self._spec.size, state.open
        return [w for start in sorted(open_) for w in self._results(start, start + size, open_[start])]

    def summary(self, state: WindowsState) -> dict[str, Any]:
        """Open windows, the watermark and the counts, for progress and ``inspect``."""
        opened = sum(map(len, state.sessions.values())) if self._spec.kind == "session" else len(state.open)
        return {"open_windows": opened, "watermark": self.watermark(state), "emitted": state.emitted,
                "late_records": state.late_records}

    def _head(self, state: WindowsState, where: str) -> dict[str, JSON]:
        if state.broken is not None:
            raise ValueError(state.broken)
        if state.pending is not None or state.late:
            raise ValueError(f"{self.describe()}.{where}(): a batch is half folded (close_batch not called)")
        return {"format": FORMAT, "top": state.top, "emitted": state.emitted, "late": state.late_records}

    def window_changes(self, state: WindowsState) -> WindowChanges | None:
        """What an incremental checkpoint writes (see :mod:`microbatch.checkpoints.windowfiles`):
        the open windows, and the keys and states of those folded into since the last call; None
        when the state is not kept that way (windows without keys and sessions are small: ``dump``
        writes them whole)."""
        if not self.keyed or self._spec.kind == "session":
            return None
        head = self._head(state, "window_changes")
        open_, dump_all = state.open, self._folder.dump_all
        documents = {}
        for start in state.changed:
            s = open_.get(start)
            if s is not None:  # else closed since
                documents[start] = (_keys_to_json(s), dump_all(s.values()))
        state.changed = set()
        return WindowChanges(head, list(open_), documents)

    def mark_windows_changed(self, state: WindowsState) -> None:
        """Have the next ``window_changes`` give every open window (a state loaded from JSON, or
        files lost)."""
        state.changed = set(state.open)

    def dump(self, state: WindowsState) -> JSON:
        data = self._head(state, "dump")
        if self._spec.kind == "session":
            dump = self._unit.dump
            data["sessions"] = [
                [key_to_json(key), s[0], s[1], dump(s[2])]
                for key, sessions in state.sessions.items() for s in sessions
            ]
        elif self.keyed:
            data["windows"] = [
                [start, {"keys": _keys_to_json(s), "states": self._folder.dump_all(s.values())}]
                for start, s in state.open.items()
            ]
        else:
            data["windows"] = [[start, self._unit.dump(s)] for start, s in state.open.items()]
        return data

    def load(self, data: JSON) -> WindowsState:
        where = f"{self.describe()}.load()"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a state this aggregator dumped: {data!r:.200}")
        state = WindowsState()
        try:
            state.top = data["top"]
            state.emitted, state.late_records = int(data["emitted"]), int(data["late"])
            load = self._folder.load if self.keyed else self._unit.load
            if self._spec.kind == "session":
                load = self._unit.load
                for key_data, start, last, inner in data["sessions"]:
                    key = None if key_data is None else key_from_json(key_data)
                    state.sessions.setdefault(key, []).append([start, last, load(inner)])
                for key, sessions in state.sessions.items():
                    sessions.sort(key=lambda s: s[0])
                    for s in sessions:
                        state.tick += 1
                        state.heap.append((s[1] + self._spec.gap, state.tick, key, s[0]))
                heapq.heapify(state.heap)
            elif self.keyed:
                for start, inner in data["windows"]:
                    state.open[start] = {
                        key_from_json(k): load(v) for k, v in zip(inner["keys"], inner["states"], strict=True)
                    }
            else:
                for start, inner in data["windows"]:
                    state.open[start] = self._unit.load(inner)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a state this aggregator dumped ({exc}): {data!r:.200}") from None
        return state


def _keys_to_json(keys: dict[Any, Any]) -> list[Any]:
    """The JSON forms of a window's keys, in order: the keys themselves unless some is a tuple."""
    if set(map(type, keys)) <= {str, int}:
        return list(keys)
    return [key_to_json(k) for k in keys]


class OpenWindows(Sequence[WindowResult]):
    """A read-only view of the open windows of a state, as ``WindowResult``s, computed on access."""

    __slots__ = ("_agg", "_state")

    def __init__(self, agg: StateIO, state: WindowsState) -> None:
        self._agg = agg
        self._state = state

    def _now(self) -> list[WindowResult]:
        return self._agg.open_windows(self._state)

    def __getitem__(self, index: Any) -> Any:
        return self._now()[index]

    def __len__(self) -> int:
        return len(self._now())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and self._now() == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<open windows {self._now()!r}>"
