"""Combining for windows: partials reduced in a worker, and two states of a session merged.

``reducer_for(agg)`` gives a function that turns a list of ``agg``'s batch results into a shorter
list that folds to the same state (``Count`` and ``Sum`` add int partials into one); other
aggregators keep the list as it is, and the parent folds each partial.

``merger_for(agg)`` gives ``merge(a, b) -> state``, the state of both folds, for the built-in
numeric aggregators, ``Aggregates`` of mergeable ones, and any aggregator with a ``merge(a, b)``
method; None otherwise. Session windows need it when a late-arriving record bridges two sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Aggregator
from .exact import _ExactSum, _scaled
from .numeric import Count, Max, Mean, Min, Sum
from .several import Aggregates

__all__ = ["int_partials", "merger_for", "reducer_for"]

Reducer = Callable[[list[Any]], list[Any]]
Merger = Callable[[Any, Any], Any]


def _keep(partials: list[Any]) -> list[Any]:
    return partials


def _add_ints(partials: list[Any]) -> list[Any]:
    if len(partials) > 1:
        total = 0
        for p in partials:
            if type(p) is not int or p < 0:
                return partials  # the parent folds (and refuses) them one by one
            total += p
        return [total]
    return partials


def _add_any_ints(partials: list[Any]) -> list[Any]:
    if len(partials) > 1:
        total = 0
        for p in partials:
            if type(p) is not int:
                return partials
            total += p
        return [total]
    return partials


def int_partials(agg: Aggregator[Any, Any, Any]) -> int:
    """1 when int partials >= 0 of ``agg`` just add (``Count``), 2 when any do (``Sum``), else 0."""
    return 1 if type(agg) is Count else 2 if type(agg) is Sum else 0


def reducer_for(agg: Aggregator[Any, Any, Any]) -> Reducer:
    """How a worker shortens a list of ``agg``'s partials without changing what they fold to."""
    if type(agg) is Count:
        return _add_ints
    if type(agg) is Sum:
        return _add_any_ints
    return _keep


def _merge_exact(a: _ExactSum, b: _ExactSum) -> _ExactSum:
    a.integer += b.integer
    if b.floats:
        a.floats = True
        if b.special != 0.0 or b.special != b.special:
            a.special += b.special
        if b.wide is not None:
            if a.wide is None:
                a.wide = sum(_scaled(p) for p in a.partials)
                a.partials = []
            a.wide += b.wide
        for p in b.partials:
            a.add(p)  # each partial is a float: added exactly (or into ``wide``)
    return a


def _exact(s: Any) -> _ExactSum:
    if type(s) is int:  # a keyed Sum keeps a plain int while it saw only ints
        acc = _ExactSum()
        acc.add_int_sum(s)
        return acc
    return s  # type: ignore[no-any-return]


def _merge_sum(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int:
        return a + b
    return _merge_exact(_exact(a), _exact(b))


def _merge_count(a: int, b: int) -> int:
    return a + b


def merger_for(agg: Aggregator[Any, Any, Any]) -> Merger | None:
    """``merge(a, b)``: one state holding what states ``a`` and ``b`` hold; None when unknown."""
    own = getattr(agg, "merge", None)
    if callable(own):
        return own  # type: ignore[no-any-return]
    kind = type(agg)
    if kind is Count:
        return _merge_count
    if kind is Sum:
        return _merge_sum
    if kind is Mean:
        return lambda a, b: (_merge_exact(a[0], b[0]), a[1] + b[1])
    if kind in (Min, Max):
        return lambda a, b: a if b is None else agg.fold(a, b)
    if isinstance(agg, Aggregates):
        parts = {name: merger_for(inner) for name, inner in agg.named.items()}
        if any(m is None for m in parts.values()):
            return None
        return lambda a, b: {name: m(a[name], b[name]) for name, m in parts.items()}  # type: ignore[misc]
    return None
