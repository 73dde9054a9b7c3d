"""The pure core, without an event loop: fold order, checkpoint schedule, bisection plan, layering."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microbatch._core.bisect import BisectionPlan, Part
from microbatch._core.schedule import CheckpointSchedule
from microbatch._core.sequencer import Sequencer

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "microbatch"


@given(st.permutations(range(40)), st.integers(0, 5))
def test_the_sequencer_releases_every_item_once_in_order(order: list[int], first: int) -> None:
    seq = Sequencer[int](first)
    out: list[int] = []
    for n in order:
        out += seq.add(n + first, n + first)
        # Only a gap holds items back: everything before next_seq is out.
        assert out == list(range(first, seq.next_seq))
    assert out == list(range(first, first + 40)) and len(seq) == 0


def test_the_sequencer_refuses_a_batch_twice() -> None:
    seq = Sequencer[str](0)
    assert seq.add(1, "b") == []
    with pytest.raises(ValueError, match="batch 1 arrived twice"):
        seq.add(1, "b")
    assert seq.add(0, "a") == ["a", "b"]
    with pytest.raises(ValueError, match="batch 0 arrived twice"):
        seq.add(0, "a")


def test_the_schedule_is_due_by_time_with_explicit_times() -> None:
    s = CheckpointSchedule(every=5.0, every_batches=None, now=100.0)
    assert not s.folded(104.9)
    assert s.folded(105.0)
    s.saved(105.0)
    assert not s.folded(109.0) and s.folded(110.5)


def test_the_schedule_is_due_by_count_or_time_whichever_first() -> None:
    s = CheckpointSchedule(every=60.0, every_batches=3, now=0.0)
    assert [s.folded(1.0), s.folded(2.0), s.folded(3.0)] == [False, False, True]
    s.saved(3.0)
    assert not s.folded(4.0)
    assert s.folded(63.0)  # time wins before the count


def test_the_schedule_without_limits_is_never_due() -> None:
    s = CheckpointSchedule(every=None, every_batches=None, now=0.0)
    assert not any(s.folded(float(t)) for t in range(0, 10_000, 100))


def test_checkpoint_every_zero_is_due_after_every_batch() -> None:
    s = CheckpointSchedule(every=0.0, every_batches=None, now=7.0)
    assert s.folded(7.0) and s.folded(7.0)


def _bisect(count: int, bad: set[int]) -> tuple[list[Part], list[Part], int]:
    plan = BisectionPlan(count)
    runs = 0
    while (part := plan.next()) is not None:
        runs += 1
        if any(i in bad for i in range(part.lo, part.hi)):
            plan.failed(part)
        else:
            plan.succeeded(part)
    return plan.succeeded_parts, plan.dead, runs


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
    assert part == Part(0, 2) and not part.retry
    with pytest.raises(ValueError, match="not the part the plan is running"):
        plan.succeeded(Part(2, 5))


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
