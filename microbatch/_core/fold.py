"""The fold stage's decisions: what to fold next, and when to write a checkpoint with which position.

:class:`FoldMachine` does no I/O and knows no event loop: the fold stage (``pipeline/fold.py``)
tells it what happened and carries out what it answers. Times are explicit (``now``). The rules:

**Order.**

1. The reader numbers what it sends with consecutive *tickets* from ``first_ticket``: a batch, or
   a file split holding many batches. Results arrive in any order. :meth:`~FoldMachine.arrive`
   releases them strictly in ticket order, each exactly once, and holds the early ones (their
   number is bounded by the pipeline's window, not here).
2. A ticket's result may arrive in pieces (a split run batch by batch): ``last=False`` for every
   piece but the last. Pieces of the ticket due are released at once, in the order they came;
   pieces of a later ticket wait until it is due. The next ticket is due once the last piece of
   this one was released. A ticket below the next one due, or a piece after a ticket's last, is a
   bug in the caller: ``ValueError``.

**Folding.**

3. Each released item is to be folded by the caller, which then reports every batch it folded
   with :meth:`~FoldMachine.folded` (its position and record count), and the end of the item with
   :meth:`~FoldMachine.processed`. Only reported batches count: a checkpoint never names a
   position beyond the last batch reported folded, so a fold interrupted before it is reported
   is covered by no checkpoint.

**Checkpoints** (none at all when ``saving`` is False: no answer ever asks for one).

4. *Start.* The reader's starting position (:meth:`~FoldMachine.begin`) is checkpointed at once in
   a run that resumed from nothing and folded nothing yet: a run killed before its first regular
   checkpoint then resumes where this one started (in the file it started in), not from scratch.
   A resumed run's starting position is its checkpoint already.
5. *By count.* After ``every_batches`` batches folded since the newest checkpoint, one is due.
6. *By clock.* Once ``every`` seconds passed since the newest checkpoint and a batch was folded
   since, one is due: at the next :meth:`~FoldMachine.folded`, or at :meth:`~FoldMachine.tick` at
   :attr:`~FoldMachine.deadline`, whichever the caller reaches first. A caller that ticks at the
   deadline while it waits (for a result, for a consumer) writes a checkpoint covering every
   folded batch at most ``every`` seconds (plus its own latency) after the previous one,
   however quiet the source and however long one missing ticket keeps later ones held. With
   nothing folded since the newest checkpoint, it still covers everything: none is due.
7. *Final.* :meth:`~FoldMachine.final` (the source ended, the run was stopped, cancelled, or
   failed) answers one last checkpoint covering every batch reported folded, whether or not its
   update reached a consumer. It is ``finished`` when the source ended (:meth:`~FoldMachine.end`),
   every ticket was released and every released item processed, and the caller did not
   :meth:`~FoldMachine.halt` folding. (Released is not folded: many items may be released at
   once, and a run cancelled while it folds them has not finished.)
8. A checkpoint counts as written when the caller reports it (:meth:`~FoldMachine.saved`); the
   counts and the clock of rules 5 and 6 restart from what it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["FoldMachine", "Save"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Save:
    """Write a checkpoint: ``batches`` batches and ``records`` records folded, reading goes on
    after ``position`` (the position of the last batch folded, or the start); ``finished``: the
    source was read to its end and all of it folded."""

    batches: int
    records: int
    position: Any
    finished: bool = False


class FoldMachine(Generic[T]):
    """The fold stage's state (see the module's docstring for the rules).

    ``batches``, ``records`` and ``position`` are what a resumed run inherited (0, 0, None when
    it starts afresh); ``resumed`` says whether it did. ``every`` (seconds, None: never by time)
    and ``every_batches`` (None: never by count) set the cadence; ``now`` is the start.
    """

    __slots__ = (
        "_complete",
        "_held",
        "_saved_at",
        "_saved_batches",
        "_tickets",
        "_unprocessed",
        "batches",
        "every",
        "every_batches",
        "halted",
        "next_ticket",
        "position",
        "records",
        "resumed",
        "saving",
    )

    def __init__(
        self,
        *,
        first_ticket: int = 0,
        batches: int = 0,
        records: int = 0,
        position: Any = None,
        resumed: bool = False,
        saving: bool = True,
        every: float | None = None,
        every_batches: int | None = None,
        now: float = 0.0,
    ) -> None:
        self.next_ticket = first_ticket
        self.batches = batches
        self.records = records
        self.position = position
        self.resumed = resumed
        self.saving = saving
        self.every = every
        self.every_batches = every_batches
        #: Folding was halted (``halt()``): the run cannot be finished.
        self.halted = False
        self._held: dict[int, list[T]] = {}
        self._complete: set[int] = set()
        self._tickets: int | None = None
        self._unprocessed = 0  # items released and not yet reported processed
        self._saved_at = now
        self._saved_batches = batches

    # -- order --------------------------------------------------------------------------------------

    def arrive(self, ticket: int, item: T, *, last: bool = True) -> list[T]:
        """Ticket ``ticket``'s result (or one piece of it) arrived: the items now due, in order."""
        if ticket < self.next_ticket or ticket in self._complete:
            raise ValueError(f"ticket {ticket} arrived after its last piece (next due: {self.next_ticket})")
        if ticket != self.next_ticket:
            self._held.setdefault(ticket, []).append(item)
            if last:
                self._complete.add(ticket)
            return []
        if not last:
            self._unprocessed += 1
            return [item]
        due = [item]
        held, complete = self._held, self._complete
        self.next_ticket += 1
        while True:
            pieces = held.pop(self.next_ticket, None)
            if pieces is not None:
                due += pieces
            if self.next_ticket not in complete:
                self._unprocessed += len(due)
                return due
            complete.discard(self.next_ticket)
            self.next_ticket += 1

    def __len__(self) -> int:
        """Tickets held (some or all of their pieces), waiting for an earlier one."""
        return len(self._held)

    def end(self, tickets: int) -> None:
        """The source ended (it was not stopped): ``tickets`` tickets make the whole run."""
        self._tickets = tickets

    def halt(self) -> None:
        """Folding stopped before the run's end (a stop within a split): it is not finished."""
        self.halted = True

    def processed(self) -> None:
        """The caller finished folding one item :meth:`arrive` released (rule 3)."""
        self._unprocessed -= 1

    @property
    def finished(self) -> bool:
        """The source ended, every ticket was released and processed, and folding was not halted."""
        return self._tickets == self.next_ticket and not self._unprocessed and not self.halted

    # -- checkpoints --------------------------------------------------------------------------------

    def begin(self, position: Any) -> Save | None:
        """The reader starts at ``position``: the start checkpoint (rule 4), or None."""
        if self.batches != self._saved_batches or self.resumed:
            return None  # batches were folded first (their checkpoint names later positions)
        self.position = position
        return self._save() if self.saving else None

    def folded(self, position: Any, records: int, now: float) -> Save | None:
        """One batch of ``records`` records, ending at ``position``, was folded at ``now``."""
        self.batches += 1
        self.records += records
        self.position = position
        if not self.saving:
            return None
        every_batches = self.every_batches
        if every_batches is not None and self.batches - self._saved_batches >= every_batches:
            return self._save()
        every = self.every
        if every is not None and now - self._saved_at >= every:
            return self._save()
        return None

    @property
    def deadline(self) -> float | None:
        """When a :meth:`tick` would find a checkpoint due (rule 6); None: no tick is needed."""
        if not self.saving or self.every is None or self.batches == self._saved_batches:
            return None
        return self._saved_at + self.every

    def tick(self, now: float) -> Save | None:
        """The clock reads ``now``: a checkpoint when one is due by time (rule 6), else None."""
        deadline = self.deadline
        return self._save() if deadline is not None and now >= deadline else None

    def final(self) -> Save | None:
        """The last checkpoint of the run (rule 7); None without checkpoints."""
        return self._save(finished=self.finished) if self.saving else None

    def saved(self, save: Save, now: float) -> None:
        """The checkpoint ``save`` was written at ``now`` (rule 8)."""
        self._saved_at = now
        self._saved_batches = save.batches

    def _save(self, *, finished: bool = False) -> Save:
        return Save(self.batches, self.records, self.position, finished)
