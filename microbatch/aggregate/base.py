"""The aggregator contract (:class:`Aggregator`) and the helpers every built-in shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

__all__ = ["Aggregator", "JSON"]

R = TypeVar("R")
S = TypeVar("S")
V = TypeVar("V")

#: JSON-compatible data: dict with str keys, list, str, int, float, bool or None, nested.
JSON = Any


def _type_error(agg: Aggregator[Any, Any, Any], result: object, accepts: str) -> TypeError:
    return TypeError(
        f"{agg.describe()} cannot fold a batch result of type {type(result).__qualname__}: "
        f"it accepts {accepts}; make fn return one of these"
    )


def _stable_repr(value: object) -> str:
    """A repr that does not change between runs (no memory addresses for functions and classes)."""
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        module = getattr(value, "__module__", None) or "?"
        return f"{module}.{value.__qualname__}"
    return repr(value)


def _copy_json(value: object, where: str, owner: str) -> JSON:
    """Copy JSON-native data, tuples becoming lists; ``TypeError`` naming the path of anything else."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        out: dict[str, JSON] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{owner}.dump(): {where} has the key {key!r} of type {type(key).__qualname__}; "
                    f"JSON object keys are str: override dump() and load() to convert"
                )
            out[key] = _copy_json(item, f"{where}[{key!r}]", owner)
        return out
    if isinstance(value, (list, tuple)):
        return [_copy_json(item, f"{where}[{i}]", owner) for i, item in enumerate(value)]
    raise TypeError(
        f"{owner}.dump(): {where} is a {type(value).__qualname__}, which JSON cannot hold; "
        f"override dump() and load() to convert the state"
    )


class Aggregator(ABC, Generic[R, S, V]):
    """Folds batch results (``R``) into a state (``S``) whose current value (``V``) the user sees.

    Subclasses implement ``initial``, ``fold`` and ``value``. The defaults of the rest suit a state
    made only of dict (str keys), list, str, int, float, bool and None:

    - ``dump`` returns a deep copy of the state (tuples become lists), sharing nothing mutable with
      it, so a checkpoint can be serialized in another thread while folding goes on; it raises
      ``TypeError`` naming the part of the state that JSON cannot hold.
    - ``load`` returns the data as it is. Override it when the state holds tuples, sets or objects.
    - ``describe`` returns ``ClassName(attr=value, ...)`` from the public instance attributes (the
      constructor arguments, by convention); functions appear as ``module.qualname``. It is part of
      the pipeline's fingerprint, so a checkpoint is refused when the aggregator's class or settings
      change (not when the body of a method or function changes: that is not visible in the text).

    ``fold`` may update the state in place and return it (the built-in ``TopK`` does, to avoid
    copying a large dict per batch); the caller must use the returned state from then on.
    """

    @abstractmethod
    def initial(self) -> S:
        """Return the state before any batch result was folded."""

    @abstractmethod
    def fold(self, state: S, result: R) -> S:
        """Return the state after folding one batch result (the next one in batch order)."""

    @abstractmethod
    def value(self, state: S) -> V:
        """Return the user-facing value of a state."""

    def dump(self, state: S) -> JSON:
        """Return the state as JSON-compatible data that shares nothing mutable with it."""
        return _copy_json(state, "the state", type(self).__qualname__)

    def load(self, data: JSON) -> S:
        """Return the state that ``dump`` turned into ``data``."""
        return data  # type: ignore[no-any-return]

    def describe(self) -> str:
        """Return a stable text naming this aggregator and its settings, e.g. ``TopK(k=10)``."""
        args = ", ".join(
            f"{name}={_stable_repr(value)}" for name, value in vars(self).items() if not name.startswith("_")
        )
        return f"{type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe()

