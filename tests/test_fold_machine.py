"""The fold machine without an event loop: order, exactly once, checkpoint positions and cadence."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microbatch._core.fold import FoldMachine, Save

# -- order --------------------------------------------------------------------------------------------


@given(st.permutations(range(40)), st.integers(0, 5))
def test_whole_tickets_are_released_once_in_order(order: list[int], first: int) -> None:
    m = FoldMachine[int](first_ticket=first)
    out: list[int] = []
    for n in order:
        out += m.arrive(n + first, n + first)
        # Only a gap holds items back: everything before next_ticket is out.
        assert out == list(range(first, m.next_ticket))
    assert out == list(range(first, first + 40)) and len(m) == 0


def test_a_ticket_twice_or_a_piece_after_the_last_is_refused() -> None:
    m = FoldMachine[str]()
    assert m.arrive(1, "b") == []
    with pytest.raises(ValueError, match="ticket 1 arrived after its last piece"):
        m.arrive(1, "b")
    assert m.arrive(0, "a") == ["a", "b"]
    with pytest.raises(ValueError, match="ticket 0 arrived after its last piece"):
        m.arrive(0, "a", last=False)


def test_pieces_of_the_ticket_due_go_at_once_and_those_of_later_ones_wait() -> None:
    m = FoldMachine[str]()
    assert m.arrive(1, "1a", last=False) == []
    assert m.arrive(0, "0a", last=False) == ["0a"]
    assert m.arrive(1, "1b", last=False) == []
    # Ticket 0 ends: ticket 1 is due, its pieces go, but it is not complete yet.
    assert m.arrive(0, "0b") == ["0b", "1a", "1b"]
    assert m.arrive(2, "2") == []
    assert m.arrive(1, "1c") == ["1c", "2"]
    assert m.next_ticket == 3


# -- checkpoints with explicit times ----------------------------------------------------------------


def test_by_time_after_a_fold_with_explicit_times() -> None:
    m = FoldMachine[int](every=5.0, now=100.0)
    assert m.folded("p1", 10, 104.9) is None
    save = m.folded("p2", 10, 105.0)
    assert save == Save(2, 20, "p2")
    m.saved(save, 105.0)
    assert m.folded("p3", 1, 109.0) is None
    assert m.folded("p4", 1, 110.5) == Save(4, 22, "p4")


def test_by_count_or_time_whichever_first() -> None:
    m = FoldMachine[int](every=60.0, every_batches=3)
    assert [m.folded(i, 1, float(i)) for i in (1, 2)] == [None, None]
    save = m.folded(3, 1, 3.0)
    assert save == Save(3, 3, 3)
    m.saved(save, 3.0)
    assert m.folded(4, 1, 4.0) is None
    assert m.folded(5, 1, 63.0) == Save(5, 5, 5)  # time wins before the count


def test_without_limits_only_the_start_and_the_final_checkpoint() -> None:
    m = FoldMachine[int]()
    assert m.begin("start") == Save(0, 0, "start")
    assert not any(m.folded(t, 1, float(t)) for t in range(0, 10_000, 100))
    assert m.deadline is None and m.tick(1e9) is None
    assert m.final() == Save(100, 100, 9_900)


def test_every_zero_is_due_after_every_batch() -> None:
    m = FoldMachine[int](every=0.0, now=7.0)
    assert m.folded(1, 1, 7.0) == Save(1, 1, 1)
    assert m.folded(2, 1, 7.0) == Save(2, 2, 2)  # not reported saved: still due


def test_a_tick_writes_what_was_folded_while_a_ticket_is_missing() -> None:
    # Ticket 0 is slow; 1..3 arrive and wait; what was folded before is checkpointed on time.
    m = FoldMachine[str](every=5.0, now=0.0)
    for item in m.arrive(0, "t0"):
        assert m.folded(item, 100, 1.0) is None
    assert m.deadline == 5.0
    for ticket in (2, 3, 4):
        assert m.arrive(ticket, f"t{ticket}") == []
    assert m.tick(4.9) is None
    save = m.tick(5.0)
    assert save == Save(1, 100, "t0")
    m.saved(save, 5.2)
    # Nothing folded since: nothing is due, however long the wait.
    assert m.deadline is None and m.tick(1_000.0) is None


def test_no_store_no_checkpoint_is_ever_asked_for() -> None:
    m = FoldMachine[int](saving=False, every=0.0, every_batches=1)
    assert m.begin(0) is None
    assert all(m.folded(i, 1, float(i)) is None for i in range(100))
    assert m.deadline is None and m.tick(1e9) is None and m.final() is None


def test_the_start_checkpoint_only_when_nothing_was_resumed_or_folded() -> None:
    assert FoldMachine[int](resumed=True, batches=5, position=50).begin(0) is None
    m = FoldMachine[int]()
    m.folded("p", 3, 0.0)
    assert m.begin("start") is None  # later positions are folded already
    assert m.final() == Save(1, 3, "p")


def test_the_final_checkpoint_is_finished_only_when_everything_was_released() -> None:
    m = FoldMachine[int](every=None)
    m.end(2)
    for item in m.arrive(1, 1):
        m.folded(item, 1, 0.0)
        m.processed()
    assert m.final() == Save(0, 0, None, finished=False)
    for item in m.arrive(0, 0):
        m.folded(item, 1, 0.0)
        m.processed()
    assert m.final() == Save(2, 2, 1, finished=True)
    m.halt()
    assert not m.final().finished  # type: ignore[union-attr]


def test_released_is_not_folded_a_run_cancelled_amid_released_items_has_not_finished() -> None:
    # Ticket 0 was slow: 1..3 arrived meanwhile, and all four are released at once. The run is
    # cancelled after folding two of them (a consumer left while an update waited): the final
    # checkpoint must not say finished, or a resumed run would return a value missing two batches.
    m = FoldMachine[int](every=None)
    for ticket in (1, 2, 3):
        assert m.arrive(ticket, ticket) == []
    m.end(4)
    due = m.arrive(0, 0)
    assert due == [0, 1, 2, 3]
    for item in due[:2]:
        m.folded(item, 1, 0.0)
        m.processed()
    assert m.final() == Save(2, 2, 1, finished=False)
    for item in due[2:]:
        m.folded(item, 1, 0.0)
        m.processed()
    assert m.final() == Save(4, 4, 3, finished=True)


# -- interleavings -----------------------------------------------------------------------------------


@dataclass
class Shell:
    """A fold stage without I/O: folds what is released, writes what is asked, ticks at deadlines."""

    machine: FoldMachine[tuple[int, int]]
    every: float
    tick_latency: float
    now: float = 0.0
    folded: list[tuple[int, int]] = field(default_factory=list)
    fold_times: list[float] = field(default_factory=list)
    saves: list[tuple[float, Save]] = field(default_factory=list)

    def save(self, save: Save | None) -> None:
        if save is None:
            return
        # Never beyond what was folded, and it names the position of the last batch folded.
        assert save.batches == len(self.folded)
        assert save.position == (self.folded[-1] if self.folded else "start")
        self.saves.append((self.now, save))
        self.machine.saved(save, self.now)

    def advance(self, to: float) -> None:
        """Time passes while waiting; the shell wakes at each deadline (a little late)."""
        while (deadline := self.machine.deadline) is not None and deadline + self.tick_latency <= to:
            self.now = max(self.now, deadline + self.tick_latency)
            self.save(self.machine.tick(self.now))
        self.now = max(self.now, to)

    def arrive(self, ticket: int, piece: int, last: bool) -> None:
        for item in self.machine.arrive(ticket, (ticket, piece), last=last):
            self.folded.append(item)
            self.fold_times.append(self.now)
            self.save(self.machine.folded(item, 1, self.now))
            self.machine.processed()


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[list[tuple[int, int, bool, float]], int | None, int]:
    """Tickets of 1..3 pieces, delivered in any order across tickets (in order within one), each
    after a random pause; and maybe a cancellation after some of them."""
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=12))
    queues = [[(t, p, p == n - 1) for p in range(n)] for t, n in enumerate(sizes)]
    order: list[tuple[int, int, bool, float]] = []
    while any(queues):
        index = draw(st.sampled_from([i for i, q in enumerate(queues) if q]))
        ticket, piece, last = queues[index].pop(0)
        order.append((ticket, piece, last, draw(st.floats(0.0, 4.0))))
    cancel = draw(st.none() | st.integers(0, len(order)))
    return order, cancel, len(sizes)


@settings(max_examples=300, deadline=None)
@given(interleavings(), st.sampled_from([0.0, 0.5, 2.0, 5.0]), st.none() | st.integers(1, 4))
def test_any_interleaving_folds_once_in_order_and_checkpoints_on_time(
    case: tuple[list[tuple[int, int, bool, float]], int | None, int],
    every: float,
    every_batches: int | None,
) -> None:
    order, cancel, tickets = case
    latency = 0.25
    shell = Shell(FoldMachine(every=every, every_batches=every_batches), every, latency)
    shell.save(shell.machine.begin("start"))
    delivered = order if cancel is None else order[:cancel]
    for ticket, piece, last, pause in delivered:
        shell.advance(shell.now + pause)
        shell.arrive(ticket, piece, last)
    if cancel is None:
        shell.machine.end(tickets)
    shell.advance(shell.now + 60.0)  # waiting for what never comes: the clock still runs
    shell.save(shell.machine.final())

    # Exactly once, in ticket order then piece order: a prefix of everything, all of it at the end.
    everything = sorted((t, p) for t, p, _, _ in order)
    assert shell.folded == everything[: len(shell.folded)]
    if cancel is None:
        assert shell.folded == everything
        assert shell.saves[-1][1].finished
    else:
        assert not shell.saves[-1][1].finished or shell.folded == everything

    # Cadence: a folded batch is covered by a checkpoint written at most `every` after the
    # previous checkpoint (or after the fold itself, if later), plus the shell's latency.
    for index, folded_at in enumerate(shell.fold_times):
        previous = max((t for t, s in shell.saves if t <= folded_at), default=0.0)
        covering = min(t for t, s in shell.saves if s.batches > index)
        assert covering <= max(folded_at, previous + every) + latency + 1e-9
    # Checkpoints cover more and more, and the first names the start.
    assert [s.batches for _, s in shell.saves] == sorted(s.batches for _, s in shell.saves)
    assert shell.saves[0][1] == Save(0, 0, "start")
