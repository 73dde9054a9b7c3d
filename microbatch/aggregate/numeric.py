"""Aggregators of numbers: Sum, Count, Mean, Min and Max."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sized
from typing import Any

from .base import JSON, Aggregator, _type_error
from .exact import _add_numbers, _ExactSum, _is_number

__all__ = ["Sum", "Count", "Mean", "Min", "Max"]


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
        if type(data) is not int or data < 0:
            raise ValueError(f"{self.describe()}.load(): expected an int >= 0, got {data!r:.200}")
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
        if not isinstance(data, dict) or set(data) != {"sum", "count"}:
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        count = data["count"]
        if type(count) is not int or count < 0:
            raise ValueError(f"{self.describe()}.load(): field 'count' is {count!r:.60}, not an int >= 0")
        return (_ExactSum.load(data["sum"], self.describe()), count)


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
        if data is not None and (
            type(data) not in (int, float, str) or (type(data) is float and math.isnan(data))
        ):
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

