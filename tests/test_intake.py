"""The ``Batcher``'s decisions without an event loop: ``Intake`` and ``check_results``, on explicit times."""

from __future__ import annotations

import pytest

from microbatch import BatcherClosed, MicrobatchError
from microbatch._core.intake import BLOCKED, DONE, DROPPED, QUEUED, RUNNING, Intake, Slot
from microbatch._core.results import BatchResultMismatch, check_results


class Flag:
    """Stands in for the caller's event."""

    def __init__(self) -> None:
        self.is_set = False

    def set(self) -> None:
        self.is_set = True


def slot(item: int, now: float = 0.0) -> Slot[int, int]:
    return Slot(item, Flag(), now)


def items(batch: list[Slot[int, int]] | None) -> list[int]:
    assert batch is not None
    return [s.item for s in batch]


def test_full_batch_wakes_the_flusher_and_goes_first() -> None:
    intake: Intake[int, int] = Intake(3, 1.0, 1, None)
    assert intake.offer(slot(0)) is True  # a new partial batch: the flusher must start its clock
    assert intake.offer(slot(1)) is False  # joined it: the flusher already sleeps on its deadline
    assert intake.offer(slot(2)) is True  # full
    assert intake.deadline() is None
    batch = intake.next_batch(0.0, closing=False)
    assert items(batch) == [0, 1, 2]
    assert batch is not None and all(s.state == RUNNING for s in batch)
    assert (intake.by_size, intake.running, intake.items) == (1, 1, 3)


def test_partial_batch_is_due_max_wait_after_its_first_item() -> None:
    intake: Intake[int, int] = Intake(10, 0.5, 1, None)
    intake.offer(slot(0, now=1.0))
    intake.offer(slot(1, now=1.3))
    assert intake.deadline() == 1.5
    assert intake.next_batch(1.49, closing=False) is None
    assert items(intake.next_batch(1.5, closing=False)) == [0, 1]
    assert intake.by_time == 1
    assert intake.wait_total == pytest.approx(0.5 + 0.2)
    assert intake.wait_max == pytest.approx(0.5)


def test_busy_slots_hold_the_partial_batch_until_one_frees() -> None:
    intake: Intake[int, int] = Intake(4, 0.0, 1, None)
    intake.offer(slot(0))
    assert items(intake.next_batch(0.0, closing=False)) == [0]
    assert intake.offer(slot(1, now=1.0)) is False  # due at once, but no slot is free
    assert intake.deadline() is None  # nothing to wait for while busy
    assert intake.next_batch(5.0, closing=False) is None
    intake.offer(slot(2, now=2.0))
    intake.finished()
    assert intake.deadline() == 1.0
    assert items(intake.next_batch(5.0, closing=False)) == [1, 2]


def test_closing_flushes_the_partial_batch_at_once() -> None:
    intake: Intake[int, int] = Intake(4, None, 1, None)
    intake.offer(slot(0))
    assert intake.next_batch(100.0, closing=False) is None  # max_wait=None: never due by time
    assert items(intake.next_batch(100.0, closing=True)) == [0]
    assert intake.by_close == 1 and intake.empty


def test_max_pending_blocks_callers_and_dispatch_admits_them_at_that_time() -> None:
    intake: Intake[int, int] = Intake(2, None, 1, 2)
    a, b, c = slot(0), slot(1), slot(2)
    intake.offer(a)
    intake.offer(b)
    assert not intake.has_room
    assert intake.offer(c) is False and c.state == BLOCKED
    assert items(intake.next_batch(3.0, closing=False)) == [0, 1]
    assert c.state == QUEUED and c.t_admit == 3.0 and list(intake.queue) == [c]
    assert intake.policy.deadline is None  # max_wait=None


def test_withdrawing_a_queued_item_regroups_the_queue() -> None:
    intake: Intake[int, int] = Intake(2, 1.0, 1, 2)
    slots = [slot(i, now=float(i)) for i in range(3)]
    for s in slots:
        intake.offer(s)
    assert slots[2].state == BLOCKED and intake.full == 1
    assert intake.withdraw(slots[0], now=10.0) is True
    # 1 moved to the front; the blocked 2 was admitted at 10.0 and completes a full batch
    assert [s.item for s in intake.queue] == [1, 2] and intake.full == 1
    assert intake.withdraw(slots[2], now=11.0) is True
    assert intake.full == 0 and intake.deadline() == 1.0 + 1.0  # 1's admission time + max_wait
    assert intake.cancelled == 2


def test_withdrawing_blocked_and_dispatched_items() -> None:
    intake: Intake[int, int] = Intake(1, None, 1, 1)
    running, queued, blocked = slot(0), slot(1), slot(2)
    intake.offer(running)
    intake.next_batch(0.0, closing=False)
    intake.offer(queued)
    intake.offer(blocked)
    assert intake.withdraw(blocked, 0.0) is False and not intake.blocked
    assert intake.withdraw(running, 0.0) is False and running.state == DROPPED
    running.deliver()
    assert running.state == DROPPED and running.event.is_set  # type: ignore[attr-defined]
    assert (intake.cancelled, intake.dropped) == (1, 1)


def test_abort_fails_every_waiting_item_with_batcher_closed() -> None:
    intake: Intake[int, int] = Intake(2, None, 1, 2)
    slots = [slot(i) for i in range(5)]
    for s in slots:
        intake.offer(s)
    intake.next_batch(0.0, closing=False)
    intake.abort("shut down")
    for s in slots[2:]:
        assert s.state == DONE and isinstance(s.error, BatcherClosed) and str(s.error) == "shut down"
    assert slots[0].state == RUNNING and intake.empty and intake.full == 0


@pytest.mark.parametrize(
    ("args", "error", "parameter"),
    [
        ((0, 1.0, 1, None), ValueError, "max_size"),
        ((2, -1.0, 1, None), ValueError, "max_wait"),
        ((2, 1.0, 0, None), ValueError, "max_concurrent_batches"),
        ((2, 1.0, 1, 1), ValueError, "max_pending must be at least max_size=2"),
        ((2, 1.0, 1, 2.5), TypeError, "max_pending"),
    ],
)
def test_invalid_limits_name_the_parameter(args: tuple[object, ...], error: type, parameter: str) -> None:
    with pytest.raises(error, match=parameter):
        Intake(*args)  # type: ignore[arg-type]


def test_wrong_number_of_results_is_a_batch_result_mismatch() -> None:
    with pytest.raises(BatchResultMismatch) as info:
        check_results([1, 2], 3, batch=4, fn="jobs.embed", where="batch 4 of B")
    error = info.value
    assert isinstance(error, MicrobatchError) and isinstance(error, ValueError)
    assert (error.batch, error.size, error.results, error.fn) == (4, 3, 2, "jobs.embed")
    assert str(error).startswith("batch 4 of B: fn jobs.embed returned 2 results for 3 items")


def test_results_of_another_shape() -> None:
    assert check_results((i for i in "ab"), 2, batch=1, fn="f", where="w") == ["a", "b"]
    for bad in (None, "ab", {"a": 1}):
        with pytest.raises(TypeError, match=f"returned {type(bad).__name__}"):
            check_results(bad, 2, batch=1, fn="f", where="w")
