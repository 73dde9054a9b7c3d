"""The fold order: results arrive in any order, and leave in batch order.

Dispatchers finish batches in whatever order the workers do; the folder must fold batch ``n`` before
batch ``n + 1``. The sequencer holds the early arrivals and releases the longest run of consecutive
batches that starts at the next one due. Its buffer is bounded by the pipeline's window (at most
``queue_size + capacity`` batches are unfolded at any time), not by itself.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Sequencer"]

T = TypeVar("T")


class Sequencer(Generic[T]):
    """Puts items numbered ``next_seq, next_seq + 1, ...`` back in order.

    ``add(seq, item)`` returns the items that are now due, in order (often none, often one).
    A number below ``next_seq`` or one already held is a bug in the caller: ``ValueError``.
    """

    __slots__ = ("_held", "next_seq")

    def __init__(self, next_seq: int = 0) -> None:
        self.next_seq = next_seq
        self._held: dict[int, T] = {}

    def __len__(self) -> int:
        """The number of items held, waiting for an earlier one."""
        return len(self._held)

    def add(self, seq: int, item: T) -> list[T]:
        if seq < self.next_seq or seq in self._held:
            raise ValueError(f"batch {seq} arrived twice (next due: {self.next_seq})")
        if seq != self.next_seq:
            self._held[seq] = item
            return []
        due = [item]
        self.next_seq += 1
        held = self._held
        while self.next_seq in held:
            due.append(held.pop(self.next_seq))
            self.next_seq += 1
        return due
