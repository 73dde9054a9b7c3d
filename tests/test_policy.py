"""The pure batching policy: explicit times, no event loop."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch._core.policy import BatchPolicy, check_limits


def test_full_batches_and_pending() -> None:
    p = BatchPolicy(3, 1.0)
    assert p.add(2, 0.0) == 0
    assert (p.pending, p.deadline) == (2, 1.0)
    assert p.add(5, 0.5) == 2  # 2 + 5 = 7: two full batches, one record left
    assert p.pending == 1
    # The leftover record started a new partial batch at 0.5.
    assert p.deadline == 1.5


def test_partial_keeps_deadline_of_its_first_record() -> None:
    p = BatchPolicy(10, 1.0)
    p.add(1, 0.0)
    p.add(3, 0.9)
    assert p.deadline == 1.0
    assert not p.due(0.99)
    assert p.due(1.0)
    assert p.take_partial() == 4
    assert p.pending == 0
    assert p.deadline is None
    assert not p.due(100.0)


def test_exact_fill_clears_deadline() -> None:
    p = BatchPolicy(4, 1.0)
    p.add(2, 0.0)
    assert p.add(2, 0.2) == 1
    assert (p.pending, p.deadline) == (0, None)


def test_max_wait_none_never_due() -> None:
    p = BatchPolicy(5)
    p.add(3, 0.0)
    assert p.deadline is None
    assert not p.due(1e9)
    assert p.flush() == 3
    assert p.flush() == 0


def test_max_wait_zero_due_at_once() -> None:
    p = BatchPolicy(5, 0)
    p.add(1, 7.0)
    assert p.due(7.0)


def test_add_nothing() -> None:
    p = BatchPolicy(5, 1.0)
    assert p.add(0, 0.0) == 0
    assert p.add(-3, 0.0) == 0
    assert (p.pending, p.deadline) == (0, None)


@pytest.mark.parametrize(
    ("max_size", "max_wait", "error", "words"),
    [
        (0, None, ValueError, "max_size"),
        (-5, None, ValueError, "max_size"),
        (1.5, None, TypeError, "max_size"),
        (True, None, TypeError, "max_size"),
        ("10", None, TypeError, "max_size"),
        (10, -0.1, ValueError, "max_wait"),
        (10, math.nan, ValueError, "max_wait"),
        (10, "1", TypeError, "max_wait"),
        (10, True, TypeError, "max_wait"),
    ],
)
def test_check_limits(max_size: object, max_wait: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        check_limits(max_size, max_wait)  # type: ignore[arg-type]
    with pytest.raises(error, match=words):
        BatchPolicy(max_size, max_wait)  # type: ignore[arg-type]


def simulate(
    max_size: int, max_wait: float | None, arrivals: list[tuple[float, int]]
) -> tuple[list[list[int]], list[tuple[float, float, bool]]]:
    """Drive the policy like a shell with an always-waiting consumer.

    ``arrivals``: (gap since the previous arrival, number of records). Returns the batches and,
    for each, (time of its first record, emission time, partial-at-deadline).
    """
    policy = BatchPolicy(max_size, max_wait)
    buffer: list[tuple[int, float]] = []  # (record, arrival time)
    out: list[list[int]] = []
    times: list[tuple[float, float, bool]] = []

    def cut(n: int, now: float, partial: bool) -> None:
        head, buffer[:] = buffer[:n], buffer[n:]
        out.append([r for r, _ in head])
        times.append((head[0][1], now, partial))

    now, next_record = 0.0, 0
    for gap, count in arrivals:
        arrival = now + gap
        # The consumer wakes at every deadline that passes before the next arrival.
        while policy.deadline is not None and policy.deadline <= arrival:
            now = policy.deadline
            assert policy.due(now)
            cut(policy.take_partial(), now, True)
        now = arrival
        buffer.extend((next_record + k, now) for k in range(count))
        next_record += count
        for _ in range(policy.add(count, now)):
            cut(max_size, now, False)
    remainder = policy.flush()
    if remainder:
        cut(remainder, now, False)
    assert not buffer
    return out, times


@settings(max_examples=300)
@given(
    max_size=st.integers(1, 20),
    max_wait=st.one_of(st.none(), st.sampled_from([0.0, 0.25, 1.0, 3.0])),
    arrivals=st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5]), st.integers(0, 45)), max_size=40),
)
def test_policy_invariants(max_size: int, max_wait: float | None, arrivals: list[tuple[float, int]]) -> None:
    batches, times = simulate(max_size, max_wait, arrivals)
    total = sum(count for _, count in arrivals)
    # Every record exactly once, in order.
    assert [r for b in batches for r in b] == list(range(total))
    # Bounds.
    assert all(1 <= len(b) <= max_size for b in batches)
    for first, emitted, partial in times:
        assert emitted >= first
        if max_wait is not None:
            # No partial batch is older than max_wait when it comes out.
            assert emitted - first <= max_wait + 1e-9
        else:
            assert not partial
