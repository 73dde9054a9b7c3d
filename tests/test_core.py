"""The pure core, without an event loop: bisection plan, layering (fold order: test_fold_machine)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microbatch._core.bisect import BisectionPlan, RecordRange

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "microbatch"


def _bisect(count: int, bad: set[int]) -> tuple[list[RecordRange], list[RecordRange], int]:
    plan = BisectionPlan(count)
    runs = 0
    while (part := plan.next()) is not None:
        runs += 1
        if any(i in bad for i in range(part.lo, part.hi)):
            plan.failed(part)
        else:
            plan.succeeded(part)
    return plan.succeeded_ranges, plan.dead, runs


@given(st.integers(2, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_bisection_isolates_exactly_the_bad_records_and_keeps_order(case: tuple[int, set[int]]) -> None:
    count, bad = case
    good, dead, runs = _bisect(count, bad)
    assert [p.lo for p in dead] == sorted(bad) and all(p.size == 1 and p.retry for p in dead)
    covered = sorted(i for p in good for i in range(p.lo, p.hi))
    assert covered == sorted(set(range(count)) - bad)
    # Good parts come out in record order, so their results fold in order.
    assert [p.lo for p in good] == sorted(p.lo for p in good)
    # At most about 2 * |bad| * log2(count) runs: a bad record costs one path down the tree.
    assert runs <= 2 + 2 * max(1, len(bad)) * count.bit_length()


def test_bisection_only_single_records_get_retries() -> None:
    plan = BisectionPlan(5)
    part = plan.next()
    assert part == RecordRange(0, 2) and not part.retry
    with pytest.raises(ValueError, match="not the span the plan is running"):
        plan.succeeded(RecordRange(2, 5))


def test_the_core_imports_without_anyio() -> None:
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'anyio' or name.startswith('anyio.') or name in ('trio', 'sniffio'):\n"
        "        raise ImportError('anyio is blocked: ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import pkgutil, importlib, microbatch._core as core\n"
        "names = [m.name for m in pkgutil.iter_modules(core.__path__)]\n"
        "for name in names: importlib.import_module('microbatch._core.' + name)\n"
        "print(len(names), sorted(m for m in sys.modules if m.startswith('anyio')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, rest = out.stdout.split(" ", 1)
    assert int(count) >= 8 and rest.strip() == "[]"
