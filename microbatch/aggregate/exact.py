"""Exact sums of ints and floats that do not depend on how the numbers were grouped into batches."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any

from .base import JSON

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
        """The sum ``dump`` wrote, checked strictly: ``ValueError`` naming the first field that is
        missing, of another type (no ``int()`` of a str, no bool for an int, no 1.5 for an int) or
        out of range, and the keys that do not belong."""
        if not isinstance(data, dict):
            raise ValueError(f"{owner}.load(): not a state this aggregator dumped: {data!r:.200}")
        unknown = set(data) - {"int", "partials", "special", "floats", "wide"}
        if unknown:
            raise ValueError(
                f"{owner}.load(): not a state this aggregator dumped: unknown fields {sorted(unknown)!r:.100}"
            )
        s = cls()
        s.integer = _field(data, "int", owner, _is_int, "an int")
        partials = _field(data, "partials", owner, lambda v: isinstance(v, list), "a list of floats")
        if not all(type(p) is float and math.isfinite(p) for p in partials):
            raise ValueError(
                f"{owner}.load(): field 'partials' is {partials!r:.100}, not a list of finite floats"
            )
        s.partials = list(partials)
        s.special = _field(data, "special", owner, lambda v: type(v) is float, "a float")
        s.floats = _field(data, "floats", owner, lambda v: isinstance(v, bool), "a bool")
        if "wide" in data:
            s.wide = _field(data, "wide", owner, _is_int, "an int")
        if not s.floats and (s.partials or s.special != 0.0 or s.wide is not None):
            raise ValueError(f"{owner}.load(): field 'floats' is false, but the sum holds float parts")
        return s


def _is_int(value: object) -> bool:
    return type(value) is int


def _field(data: dict[str, JSON], name: str, owner: str, ok: Callable[[object], bool], what: str) -> Any:
    if name not in data:
        raise ValueError(f"{owner}.load(): field {name!r} is missing")
    value = data[name]
    if not ok(value):
        kind = type(value).__name__
        raise ValueError(f"{owner}.load(): field {name!r} is {value!r:.60} ({kind}), not {what}")
    return value



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

