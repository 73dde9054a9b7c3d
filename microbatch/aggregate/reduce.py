"""Reduce: an aggregator from a function, for a state that is already JSON data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import JSON, Aggregator, _copy_json, _stable_repr

__all__ = ["Reduce"]


class Reduce(Aggregator[Any, Any, Any]):
    """An aggregator from a function: ``state = fn(state, result)`` per batch, starting at ``initial``.

    The state is the value. It must be JSON-native data (numbers, str, bool, None, lists, dicts
    with str keys) so that checkpoints can hold it: tuples come back as lists after a resume, so
    prefer lists. ``fn`` should return a new state rather than change the one it is given.
    ``describe`` names ``fn`` by module and qualified name, so renaming it refuses old checkpoints.

    Example: ``Reduce(lambda longest, lines: max([longest, *map(len, lines)]), 0)``.
    """

    def __init__(self, fn: Callable[[Any, Any], Any], initial: JSON) -> None:
        if not callable(fn):
            raise TypeError(f"Reduce(fn, initial): fn must be callable, got {type(fn).__qualname__}")
        self.fn = fn
        self.initial_state = _copy_json(initial, "initial", "Reduce")

    def initial(self) -> Any:
        return _copy_json(self.initial_state, "initial", "Reduce")

    def fold(self, state: Any, result: Any) -> Any:
        return self.fn(state, result)

    def value(self, state: Any) -> Any:
        return state

    def describe(self) -> str:
        return f"Reduce(fn={_stable_repr(self.fn)}, initial={self.initial_state!r})"
