"""Checks of users' parameters and the one way to name a callable in messages.

Every parameter error names the parameter and the value it got; bools are refused where an int is
meant (``True`` is an ``int`` to Python, never a count to a user).
"""

from __future__ import annotations

import functools
import math
import re

__all__ = ["callable_name", "check_bytes", "check_int", "check_seconds"]

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def check_int(name: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) within bounds; raise naming ``name`` otherwise.

    ``TypeError`` for a value that is not an int, ``ValueError`` for one out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return value


def check_bytes(name: str, value: object, *, minimum: int = 1) -> int:
    """A number of bytes: an int, or a string such as ``"512MB"``, ``"1.5GiB"``, ``"64 MiB"``.

    Units (any case): ``B``, decimal ``kB MB GB TB`` (powers of 1000), binary ``KiB MiB GiB TiB``
    (powers of 1024); a fraction is rounded down to whole bytes. The result is at least
    ``minimum``. ``TypeError`` or ``ValueError`` naming ``name`` otherwise.
    """
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = _UNITS.get(match.group(2).lower() or "b") if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{name} must be a number of bytes, as an int or a string such as '512MB' or "
                f"'1.5GiB' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}"
            )
        value = int(float(match.group(1)) * unit)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a number of bytes (an int or a string such as '512MB'), got {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} byte(s), got {value!r}")
    return value


def check_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float seconds if it is a finite-or-infinite positive number.

    ``allow_zero`` admits 0. NaN, negatives and bools are refused with an error naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return float(value)


def callable_name(fn: object) -> str:
    """``module.qualname`` of the user's function behind wrappers, for messages and fingerprints.

    Looks through ``functools.partial`` and through microbatch's own wrappers (any object with a
    ``fn`` attribute that is callable, such as the batch task), and falls back to the type's name
    for callable instances, never to a ``repr`` with an address in it.
    """
    seen = 0
    while seen < 16:  # a wrapper chain is short; a cycle must not hang a message
        seen += 1
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif callable(getattr(fn, "fn", None)) and not hasattr(fn, "__qualname__"):
            fn = fn.fn  # type: ignore[attr-defined]
        else:
            break
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(qualname, str):
        qualname, module = type(fn).__qualname__, type(fn).__module__
    return f"{module}.{qualname}" if module and module != "builtins" else qualname
