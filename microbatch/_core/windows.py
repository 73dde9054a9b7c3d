"""Time windows without I/O: which windows a timestamp falls in, grouping a batch, session bounds.

Three kinds of window, all half-open intervals ``[start, end)`` of seconds since the epoch:

- **tumbling** (``size``): ``[k*size, (k+1)*size)``, each timestamp in exactly one;
- **hopping** (``size``, ``slide``): ``[k*slide, k*slide + size)``, a timestamp in ``size/slide``
  of them (rounded up);
- **session** (``gap``): a timestamp ``t`` opens ``[t, t + gap)``; windows of the same key that
  overlap merge, so a session is ``[first, last + gap)`` of records less than ``gap`` apart.

The watermark is the largest timestamp folded minus ``grace``. A window closes when the watermark
reaches its end. A batch is judged against the watermark as it stood before the batch, which the
caller passes in: where batches are cut never changes what an in-order stream gives.

:func:`group` runs in a worker: it turns ``fn``'s ``(timestamp, partial)`` pairs into one
:class:`Grouped` (per window, or per key and run of close timestamps for sessions) so that a batch
sends one entry per window and key, not one per record.
"""

from __future__ import annotations

import bisect
import datetime
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, Literal

from .keys import bad_key, is_key

__all__ = [
    "Grouped", "Spec", "group", "merge_runs", "to_seconds", "window_starts",
]

Kind = Literal["tumbling", "hopping", "session"]
Number = int | float


def _positive(name: str, value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Windows({name}=...) must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Windows({name}=...) must be a finite number of seconds > 0, got {value!r}")
    return value


class Spec:
    """The window settings: kind, size, slide, gap and grace, checked once.

    ``ValueError`` names the combination that makes no kind: ``size`` alone is tumbling, ``size``
    and ``slide`` hopping, ``gap`` alone session.
    """

    __slots__ = ("kind", "size", "slide", "gap", "grace")

    def __init__(
        self, size: Number | None, slide: Number | None, gap: Number | None, grace: Number
    ) -> None:
        given = [name for name, v in (("size", size), ("slide", slide), ("gap", gap)) if v is not None]
        if given == ["size"]:
            self.kind: Kind = "tumbling"
        elif given == ["size", "slide"]:
            self.kind = "hopping"
        elif given == ["gap"]:
            self.kind = "session"
        else:
            raise ValueError(
                f"Windows() was given {' and '.join(given) or 'none of size, slide and gap'}: give "
                f"size (tumbling), size and slide (hopping), or gap (session)"
            )
        self.size = _positive("size", size) if size is not None else 0
        self.slide = _positive("slide", slide) if slide is not None else self.size
        self.gap = _positive("gap", gap) if gap is not None else 0
        if self.kind == "hopping" and self.slide > self.size:
            raise ValueError(
                f"Windows(size={size!r}, slide={slide!r}): slide must not exceed size, or some "
                f"timestamps would fall in no window"
            )
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0 \
                or not math.isfinite(grace):
            raise ValueError(f"Windows(grace=...) must be a finite number of seconds >= 0, got {grace!r}")
        self.grace = grace

    def describe(self) -> str:
        if self.kind == "session":
            return f"gap={self.gap!r}, grace={self.grace!r}"
        slide = f", slide={self.slide!r}" if self.kind == "hopping" else ""
        return f"size={self.size!r}{slide}, grace={self.grace!r}"


def to_seconds(ts: object) -> Number:
    """Seconds since the epoch of a timestamp: an int or float, or an aware ``datetime``.

    ``TypeError`` for anything else (a naive ``datetime`` is refused: its zone is unknown),
    ``ValueError`` for NaN or an infinity.
    """
    if type(ts) is int:
        return ts
    if type(ts) is float or (isinstance(ts, (int, float)) and not isinstance(ts, bool)):
        if not math.isfinite(ts):
            raise ValueError(f"the timestamp {ts!r} is not finite")
        return ts
    if isinstance(ts, datetime.datetime):
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise TypeError(
                f"the timestamp {ts!r} is a naive datetime: give it a zone "
                f"(datetime(..., tzinfo=timezone.utc)) or pass epoch seconds"
            )
        return ts.timestamp()
    raise TypeError(
        f"the timestamp {ts!r:.100} is of type {type(ts).__qualname__}: give epoch seconds "
        f"(int or float) or an aware datetime"
    )


def window_starts(t: Number, size: Number, slide: Number) -> list[Number]:
    """The starts of the windows ``[start, start + size)`` that hold ``t``, latest first."""
    last = t - t % slide
    if slide == size:
        return [last]
    starts = []
    start = last
    while start > t - size:
        starts.append(start)
        start -= slide
    return starts


class Grouped:
    """One batch's timestamped partials, grouped (what a worker sends instead of the pairs).

    ``buckets`` maps a window start (tumbling, hopping) to ``[n, first, last, partials]``, or a key
    (sessions; None when the inner aggregate is not keyed) to a list of runs
    ``[first, last, n, partials]`` sorted by ``first``, runs of one key being more than ``gap``
    apart. ``n`` counts the pairs, ``first``/``last`` are their smallest and largest timestamps;
    ``partials`` is a list. For a keyed inner aggregate and windows by time, a bucket is
    ``[n, first, last, singles, more, ints]`` instead: ``singles`` a dict of key -> partial,
    ``more`` a dict of key -> list of further partials of that key, ``ints`` True when every single
    is an int and ``more`` is empty (a dict the parent may keep as the window's counts). ``top`` is
    the largest timestamp of the batch (None when it had no pairs).
    """

    __slots__ = ("buckets", "top", "records")

    def __init__(self, buckets: dict[Any, Any], top: Number | None, records: int) -> None:
        self.buckets = buckets
        self.top = top
        self.records = records

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.buckets, self.top, self.records)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.buckets, self.top, self.records = state

    def __repr__(self) -> str:
        return f"Grouped({len(self.buckets)} buckets, {self.records} records, top={self.top!r})"


Reduce = Callable[[list[Any]], list[Any]]
_FIRST, _SECOND, _THIRD = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)


def _pairs(result: object, keyed: bool) -> Iterable[tuple[Number, Any, Any]]:
    """``(seconds, key, partial)`` for each item of ``fn``'s result; key is None when not keyed."""
    if not isinstance(result, (list, tuple)):
        raise TypeError(
            f"fn returned {type(result).__qualname__}: with event-time windows it returns a list of "
            f"(timestamp, partial) pairs"
        )
    for i, item in enumerate(result):
        if not isinstance(item, tuple) or len(item) not in (2, 3) or (len(item) == 3 and not keyed):
            want = "(timestamp, partial) or (timestamp, key, partial)" if keyed else "(timestamp, partial)"
            raise TypeError(f"item {i} of fn's result is {item!r:.100}: expected a tuple {want}")
        try:
            t = to_seconds(item[0])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"item {i} of fn's result: {exc}") from None
        if len(item) == 3:
            if not is_key(item[1]):
                raise TypeError(f"item {i} of fn's result: {bad_key(item[1])}")
            yield t, item[1], item[2]
        elif keyed:
            partial = item[1]
            if not hasattr(partial, "items"):
                raise TypeError(
                    f"item {i} of fn's result holds {type(partial).__qualname__}: a keyed aggregate "
                    f"takes a mapping of key -> partial, or use (timestamp, key, partial)"
                )
            for key, value in partial.items():
                if not is_key(key):
                    raise TypeError(f"item {i} of fn's result: {bad_key(key)}")
                yield t, key, value
        else:
            yield t, None, item[1]


def group(result: object, spec: Spec, keyed: bool, reduce: Reduce, ints: int = 0) -> Grouped:
    """Group ``fn``'s ``(timestamp, partial)`` pairs by window (and key), reducing each group's
    partials with ``reduce`` (which may return them as they are). ``TypeError``/``ValueError``
    names the item of the result that is wrong.

    ``ints`` says that int partials of one key simply add (1: those >= 0, as ``Count``; 2: any, as
    ``Sum``): a batch of ``(int, str, int)`` triples for tumbling windows then takes a fast path.
    """
    if ints and keyed and spec.kind == "tumbling" and isinstance(result, list):
        fast = _tumbling_ints(result, spec.size, ints == 1)
        if fast is not None:
            return fast
    top: Number | None = None
    n = 0
    buckets: dict[Any, Any] = {}
    if spec.kind == "session":
        points: dict[Any, list[tuple[Number, Any]]] = {}
        for t, key, partial in _pairs(result, keyed):
            n += 1
            top = t if top is None or t > top else top
            points.setdefault(key, []).append((t, partial))
        for key, items in points.items():
            items.sort(key=lambda p: p[0])
            runs: list[list[Any]] = []
            for t, partial in items:
                if runs and t - runs[-1][1] < spec.gap:
                    run = runs[-1]
                    run[1] = t
                    run[2] += 1
                    run[3].append(partial)
                else:
                    runs.append([t, t, 1, [partial]])
            for run in runs:
                run[3] = reduce(run[3])
            buckets[key] = runs
        return Grouped(buckets, top, n)
    size, slide = spec.size, spec.slide
    tumbling = size == slide
    for t, key, partial in _pairs(result, keyed):
        n += 1
        if top is None or t > top:
            top = t
        for start in ([t - t % size] if tumbling else window_starts(t, size, slide)):
            bucket = buckets.get(start)
            if bucket is None:
                bucket = buckets[start] = [0, t, t, {} if keyed else []]
            bucket[0] += 1
            if t < bucket[1]:
                bucket[1] = t
            elif t > bucket[2]:
                bucket[2] = t
            if keyed:
                bucket[3].setdefault(key, []).append(partial)
            else:
                bucket[3].append(partial)
    for bucket in buckets.values():
        if keyed:
            singles, more = {}, {}
            for key, ps in bucket[3].items():
                ps = reduce(ps)
                singles[key] = ps[0]
                if len(ps) > 1:
                    more[key] = ps[1:]
            bucket[3:] = [singles, more, False]
        else:
            bucket[3] = reduce(bucket[3])
    return Grouped(buckets, top, n)


def _tumbling_ints(result: list[Any], size: Number, counts: bool) -> Grouped | None:
    """``group`` for ``(int, str, int)`` triples into tumbling windows; None for anything else
    (the general path then takes the whole batch, and names what is wrong)."""
    if result and set(map(type, result)) == {tuple} and set(map(len, result)) == {3}:
        # columns by itemgetter: zip(*result) would cost several times more on a large batch
        ts, keys, ps = list(map(_FIRST, result)), list(map(_SECOND, result)), list(map(_THIRD, result))
        if set(map(type, ts)) == {int} and set(map(type, keys)) == {str} and set(map(type, ps)) == {int} \
                and ps.count(1) == len(ps) and all(map(operator.le, ts, islice(ts, 1, None))):
            return _ones_in_order(ts, keys, size)
    buckets: dict[Any, Any] = {}
    current: Number | None = None
    bucket: list[Any] = []
    singles: dict[str, int] = {}
    for item in result:
        if type(item) is not tuple or len(item) != 3:
            return None
        t, key, p = item
        if type(t) is not int or type(key) is not str or type(p) is not int or (counts and p < 0):
            return None
        start = t - t % size
        if start != current:
            got = buckets.get(start)
            if got is None:
                got = buckets[start] = [0, t, t, {}, {}, True]
            bucket, singles, current = got, got[3], start
        bucket[0] += 1
        if t > bucket[2]:
            bucket[2] = t
        elif t < bucket[1]:
            bucket[1] = t
        singles[key] = singles.get(key, 0) + p
    top = max(b[2] for b in buckets.values()) if buckets else None
    return Grouped(buckets, top, len(result))


def _ones_in_order(ts: list[int], keys: list[str], size: Number) -> Grouped:
    """Counts of keys in order of time, each partial 1: each window's slice counted at C speed."""
    buckets: dict[Any, Any] = {}
    i, n = 0, len(ts)
    while i < n:
        start = ts[i] - ts[i] % size
        j = bisect.bisect_left(ts, start + size, i)
        buckets[start] = [j - i, ts[i], ts[j - 1], dict(Counter(keys[i:j])), {}, True]
        i = j
    return Grouped(buckets, ts[-1], n)


def merge_runs(sessions: list[list[Any]], first: Number, last: Number, gap: Number) -> tuple[int, int]:
    """Where a run ``[first, last + gap)`` goes in a key's open sessions (sorted by start, each
    ``[start, last, ...]``): the slice ``sessions[i:j]`` of sessions it overlaps (``i == j``: none,
    insert at ``i``)."""
    i = 0
    n = len(sessions)
    while i < n and sessions[i][1] + gap <= first:
        i += 1
    j = i
    while j < n and sessions[j][0] < last + gap:
        j += 1
    return i, j
