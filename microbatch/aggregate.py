"""Aggregators: fold per-batch results, in batch order, into a running value that checkpoints can save.

A pipeline runs ``fn`` on every batch and hands each batch's result to an aggregator, strictly in
batch order. The aggregator keeps a *state*; ``value(state)`` is what the user sees. To survive a
crash the state goes into a checkpoint as JSON-compatible data (``dump``) and comes back (``load``).

The contract every aggregator keeps, and the built-ins are tested against:

- folding in batch order makes the state a pure function of the results folded so far;
- ``load(dump(state))`` is a state that folds and reports exactly like ``state`` (floats included:
  Python's JSON writes the shortest ``repr`` of a float, which reads back bit for bit);

so a run resumed from a checkpoint ends with exactly the value of an uninterrupted run.

Built-ins (``R`` is what each accepts as a batch result; anything else raises ``TypeError`` naming
the aggregator and the result's type):

=============  ================================================  =========================================
aggregator     batch result                                      value
=============  ================================================  =========================================
``Sum()``      a number, or an iterable of numbers               exact int sum; a float when floats appear
``Count()``    a ``Sized`` (adds ``len``) or a non-negative int  int
``Mean()``     a ``(sum, count)`` tuple, a number, or an         float, or ``None`` when nothing was seen
               iterable of numbers
``Min()``      a number or str, or an iterable of them;          the smallest value, ``None`` when none
               ``None``, empty iterables and NaN are skipped
``Max()``      as ``Min``                                        the largest value, ``None`` when none
``TopK(k)``    a mapping of str key to int count                 ``[(key, count), ...]``, the k largest
               (``collections.Counter`` fits)                    counts, ties by key
``Reduce(fn,   anything ``fn`` takes                             the state itself
initial)``
=============  ================================================  =========================================

Writing one's own: subclass :class:`Aggregator` and implement ``initial``, ``fold`` and ``value``.
``dump``/``load`` default to a copy of a JSON-native state, ``describe`` to the class name and its
public attributes. For a state that is already JSON data, ``Reduce(fn, initial)`` needs no class.
"""

from __future__ import annotations

import heapq
import math
import numbers
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, Generic, TypeVar

__all__ = ["Aggregator", "Sum", "Count", "Mean", "Min", "Max", "TopK", "Reduce", "JSON"]

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


# --- exact sums ------------------------------------------------------------------------------------


_SCALE = 1074  # 2**-1074 is the smallest float: every float times 2**1074 is an integer


def _scaled(f: float) -> int:
    """``f * 2**1074`` exactly, as an int (``f`` finite)."""
    numerator, denominator = f.as_integer_ratio()  # the denominator is a power of two
    return numerator << (_SCALE + 1 - denominator.bit_length())


class _ExactSum:
    """A sum of ints and floats that does not depend on how the numbers were grouped.

    Ints add exactly. Floats are kept as Shewchuk's non-overlapping partials (the algorithm behind
    ``math.fsum``), so the float sum is the correctly rounded sum of every number, whatever the batch
    sizes were. When a partial sum leaves the float range, the float part goes on as one exact
    integer in units of 2**-1074 (``wide``): numbers that bring the sum back into range still give
    the correctly rounded value. NaN and infinities follow IEEE rules; a final sum past the float
    range is infinite.
    """

    __slots__ = ("integer", "partials", "wide", "special", "floats")

    def __init__(self) -> None:
        self.integer = 0
        self.partials: list[float] = []
        self.wide: int | None = None  # the float part in units of 2**-1074 once it overflowed
        self.special = 0.0  # the sum of the inf/nan numbers seen, 0.0 while there were none
        self.floats = False  # whether any non-integer number was seen (the value is then a float)

    def add(self, x: object) -> bool:
        """Add one number; return False (adding nothing) when ``x`` is not a real number."""
        if isinstance(x, int):
            self.integer += x
            return True
        if isinstance(x, float):
            f = x
        elif hasattr(type(x), "__index__") and not isinstance(x, (str, bytes)):
            self.integer += operator.index(x)  # type: ignore[arg-type]
            return True
        elif isinstance(x, numbers.Real):
            f = float(x)
        else:
            return False
        self.floats = True
        if not math.isfinite(f):
            self.special += f
            return True
        if self.wide is not None:
            self.wide += _scaled(f)
            return True
        partials = self.partials
        i = 0
        for j, y in enumerate(partials):
            if abs(f) < abs(y):
                f, y = y, f
            hi = f + y
            if not math.isfinite(hi):
                # Past the float range: go on exactly. The numbers not folded yet are the partials
                # written so far, f and y, and the partials after y.
                rest = [*partials[:i], f, y, *partials[j + 1 :]]
                self.wide = sum(_scaled(p) for p in rest)
                self.partials = []
                return True
            lo = y - (hi - f)
            if lo:
                partials[i] = lo
                i += 1
            f = hi
        partials[i:] = [f]
        return True

    def add_int_sum(self, total: int) -> None:
        self.integer += total

    def total(self) -> int | float:
        if not self.floats:
            return self.integer
        if self.special != 0.0 or math.isnan(self.special):
            return self.special
        if self.wide is not None:
            exact = self.wide + (self.integer << _SCALE)
            try:
                return exact / (1 << _SCALE)  # int / int is correctly rounded
            except OverflowError:
                return math.inf if exact > 0 else -math.inf
        pieces = list(self.partials)
        n = self.integer
        try:
            while n:  # split the int into floats that add up to it exactly
                f = float(n)
                pieces.append(f)
                n -= int(f)
            return math.fsum(pieces)
        except OverflowError:
            return math.copysign(math.inf, self.integer)

    def dump(self) -> JSON:
        data: dict[str, JSON] = {"int": self.integer, "partials": list(self.partials),
                                 "special": self.special, "floats": self.floats}
        if self.wide is not None:
            data["wide"] = self.wide
        return data

    @classmethod
    def load(cls, data: JSON, owner: str) -> _ExactSum:
        try:
            s = cls()
            s.integer = int(data["int"])
            s.partials = [float(p) for p in data["partials"]]
            s.special = float(data["special"])
            s.floats = bool(data["floats"])
            if "wide" in data:
                s.wide = int(data["wide"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{owner}.load(): not a state this aggregator dumped: {data!r:.200}") from exc
        return s



def _add_numbers(acc: _ExactSum, values: Iterable[object]) -> int:
    """Add every number of ``values``; return how many; raise ``LookupError`` with the first non-number."""
    if isinstance(values, (list, tuple)):
        try:
            total = sum(values)
        except TypeError:
            total = None
        if type(total) is int:  # the common case: all ints, summed at C speed, exactly
            acc.add_int_sum(total)
            return len(values)
    n = 0
    for x in values:
        if not acc.add(x):
            raise LookupError(x)
        n += 1
    return n


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) or hasattr(type(x), "__index__")


class Sum(Aggregator[Any, _ExactSum, "int | float"]):
    """The sum of every number the batches returned.

    Batch results: a number, or an iterable of numbers (a list of ints is summed at C speed).
    Ints (and integer types with ``__index__``, such as NumPy's) add exactly, with no overflow.
    Other real numbers are added as floats, correctly rounded over the whole run (as
    ``math.fsum``), so the value does not depend on how records fell into batches. The value is an
    int while only integers were seen, a float after that. ``bool`` is refused as a likely mistake.
    """

    _ACCEPTS = "a number or an iterable of numbers"

    def initial(self) -> _ExactSum:
        return _ExactSum()

    def fold(self, state: _ExactSum, result: Any) -> _ExactSum:
        if state.add(result):
            return state
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            raise _type_error(self, result, self._ACCEPTS)
        try:
            _add_numbers(state, result)
        except LookupError as exc:
            raise TypeError(
                f"{self.describe()} cannot fold an iterable holding {exc.args[0]!r} of type "
                f"{type(exc.args[0]).__qualname__}: it accepts {self._ACCEPTS}"
            ) from None
        return state

    def value(self, state: _ExactSum) -> int | float:
        return state.total()

    def dump(self, state: _ExactSum) -> JSON:
        return state.dump()

    def load(self, data: JSON) -> _ExactSum:
        return _ExactSum.load(data, self.describe())


class Count(Aggregator[Any, int, int]):
    """Counts: adds ``len(result)`` for a ``Sized`` result (a list of records, a str...), or the int itself.

    A typical ``fn`` returns its filtered records, or how many matched. A negative int raises
    ``ValueError``; a result that is neither raises ``TypeError``.
    """

    def initial(self) -> int:
        return 0

    def fold(self, state: int, result: Any) -> int:
        if isinstance(result, Sized):
            return state + len(result)
        if not hasattr(type(result), "__index__"):
            raise _type_error(self, result, "a Sized (its len is added) or a non-negative int")
        n = operator.index(result)
        if n < 0:
            raise ValueError(
                f"{self.describe()} cannot add a negative count ({n}): make fn return a count >= 0"
            )
        return state + n

    def value(self, state: int) -> int:
        return state

    def load(self, data: JSON) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ValueError(f"{self.describe()}.load(): expected an int, got {data!r:.200}")
        return data


class Mean(Aggregator[Any, tuple[_ExactSum, int], "float | None"]):
    """The arithmetic mean of every number seen; ``None`` while nothing was seen.

    Batch results: a ``(sum, count)`` tuple (so ``fn`` can reduce its batch itself: a tuple is
    always read as this pair), a single number (one value), or any other iterable of numbers such
    as a list. The sum is exact as in :class:`Sum`; the value is ``sum / count`` rounded once.
    """

    _ACCEPTS = "a (sum, count) tuple, a number, or an iterable (not a tuple) of numbers"

    def initial(self) -> tuple[_ExactSum, int]:
        return (_ExactSum(), 0)

    def fold(self, state: tuple[_ExactSum, int], result: Any) -> tuple[_ExactSum, int]:
        acc, count = state
        if isinstance(result, tuple):
            if len(result) != 2 or not _is_number(result[0]) or not isinstance(result[1], int) \
                    or result[1] < 0:
                raise TypeError(
                    f"{self.describe()} reads a tuple batch result as (sum, count) with count an int >= 0, "
                    f"got {result!r:.200}; return a list to pass the values themselves"
                )
            acc.add(result[0])
            return (acc, count + result[1])
        if acc.add(result):
            return (acc, count + 1)
        if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
            raise _type_error(self, result, self._ACCEPTS)
        try:
            n = _add_numbers(acc, result)
        except LookupError as exc:
            raise TypeError(
                f"{self.describe()} cannot fold an iterable holding {exc.args[0]!r} of type "
                f"{type(exc.args[0]).__qualname__}: it accepts {self._ACCEPTS}"
            ) from None
        return (acc, count + n)

    def value(self, state: tuple[_ExactSum, int]) -> float | None:
        acc, count = state
        if count == 0:
            return None
        return acc.total() / count  # int / int is correctly rounded, even for huge ints

    def dump(self, state: tuple[_ExactSum, int]) -> JSON:
        return {"sum": state[0].dump(), "count": state[1]}

    def load(self, data: JSON) -> tuple[_ExactSum, int]:
        if not isinstance(data, dict) or not isinstance(data.get("count"), int):
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        return (_ExactSum.load(data.get("sum"), self.describe()), data["count"])


_Scalar = Any  # int | float | str, compared with < and >


class _Extreme(Aggregator[Any, _Scalar, _Scalar]):
    """Shared body of Min and Max: ``better(a, b)`` says whether ``a`` replaces ``b``."""

    _ACCEPTS = "a number or str, None, or an iterable of them"

    def _better(self, new: _Scalar, old: _Scalar) -> bool:
        raise NotImplementedError

    def initial(self) -> _Scalar:
        return None

    def _offer(self, state: _Scalar, x: object) -> _Scalar:
        if x is None:
            return state
        if not (isinstance(x, str) or _is_number(x)):
            raise _type_error(self, x, self._ACCEPTS)
        if isinstance(x, float) and math.isnan(x):
            return state
        if not isinstance(x, (int, float, str)):  # NumPy scalars and the like: store a JSON type
            x = operator.index(x) if hasattr(type(x), "__index__") else float(x)  # type: ignore[arg-type]
            if isinstance(x, float) and math.isnan(x):
                return state
        if state is None:
            return x
        try:
            return x if self._better(x, state) else state
        except TypeError:
            raise TypeError(
                f"{self.describe()} cannot compare {x!r:.100} ({type(x).__qualname__}) with the "
                f"{type(state).__qualname__} {state!r:.100} seen before: make fn return one kind of value"
            ) from None

    def fold(self, state: _Scalar, result: Any) -> _Scalar:
        if result is None or isinstance(result, str) or _is_number(result):
            return self._offer(state, result)
        if isinstance(result, (bytes, Mapping)) or not isinstance(result, Iterable):
            raise _type_error(self, result, self._ACCEPTS)
        for x in result:
            state = self._offer(state, x)
        return state

    def value(self, state: _Scalar) -> _Scalar:
        return state

    def load(self, data: JSON) -> _Scalar:
        if data is not None and not isinstance(data, (int, float, str)):
            raise ValueError(f"{self.describe()}.load(): expected a number, a str or null, got {data!r:.200}")
        return data


class Min(_Extreme):
    """The smallest value seen; ``None`` while nothing was seen.

    Batch results: a number or a str, or an iterable of them (a list, a generator). ``None``,
    empty iterables and NaN are skipped. Values must be comparable with each other (all numbers or
    all str), else ``TypeError``. Of equal values (``1`` and ``1.0``) the first one seen is kept.
    """

    def _better(self, new: _Scalar, old: _Scalar) -> bool:
        return bool(new < old)


class Max(_Extreme):
    """The largest value seen; ``None`` while nothing was seen. Accepts what :class:`Min` accepts."""

    def _better(self, new: _Scalar, old: _Scalar) -> bool:
        return bool(new > old)


class _TopKState:
    """Exact counts of every key, plus the current top k (derived, never dumped)."""

    __slots__ = ("counts", "top", "monotone")

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.top: list[tuple[str, int]] = []
        self.monotone = True  # False once a count decreased: the top k is then recomputed from all keys


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


class TopK(Aggregator[Mapping[str, int], _TopKState, list[tuple[str, int]]]):
    """The ``k`` keys with the largest total counts, as ``[(key, count), ...]`` most common first.

    Batch results: a mapping of ``str`` key to ``int`` count, e.g. ``collections.Counter(words)``.
    Keys must be str because the state is saved as a JSON object, whose keys are strings (convert
    other keys in ``fn``). Ties are broken by key, in ascending order, so the value is the same
    however the batches fell.

    Memory: the counts of *every* distinct key are kept, exactly (the top k of a stream cannot be
    known otherwise): about 100 bytes plus the key's length per distinct key, so a million distinct
    words take about 150 MB, and a checkpoint holds all of them. ``value`` costs O(k + keys in the
    last batch) while counts only grow; after a negative count it scans every key once per call.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"TopK(k): k must be an int, got {type(k).__qualname__}")
        if k < 1:
            raise ValueError(f"TopK(k): k must be at least 1, got {k}")
        self.k = k

    def initial(self) -> _TopKState:
        return _TopKState({})

    def fold(self, state: _TopKState, result: Mapping[str, int]) -> _TopKState:
        if not isinstance(result, Mapping):
            raise _type_error(self, result, "a mapping of str key to int count, e.g. collections.Counter")
        # Check the whole result before changing the state, so that a refused result changes nothing.
        for key, n in result.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{self.describe()} needs str keys (its state is a JSON object), "
                    f"got the key {key!r:.100} of type {type(key).__qualname__}: convert keys to str in fn"
                )
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(
                    f"{self.describe()} needs int counts, got {n!r:.100} of type {type(n).__qualname__} "
                    f"for the key {key!r:.100}"
                )
        counts = state.counts
        for key, n in result.items():
            if n < 0:
                state.monotone = False
            counts[key] = counts.get(key, 0) + n
        if state.monotone:
            # Counts only grew: a key outside the old top k that this batch did not touch still ranks
            # below all k of them, so the new top k is among the old top k and this batch's keys.
            candidates = {key for key, _ in state.top}
            candidates.update(result.keys())
            state.top = heapq.nsmallest(self.k, ((key, counts[key]) for key in candidates), key=_rank)
        return state

    def value(self, state: _TopKState) -> list[tuple[str, int]]:
        if state.monotone:
            return list(state.top)
        return heapq.nsmallest(self.k, state.counts.items(), key=_rank)

    def dump(self, state: _TopKState) -> JSON:
        return {"counts": dict(state.counts), "monotone": state.monotone}

    def load(self, data: JSON) -> _TopKState:
        counts = data.get("counts") if isinstance(data, dict) else None
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in counts.values()
        ):
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        state = _TopKState(dict(counts))
        state.monotone = bool(data.get("monotone", True))
        state.top = heapq.nsmallest(self.k, state.counts.items(), key=_rank)
        return state


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
