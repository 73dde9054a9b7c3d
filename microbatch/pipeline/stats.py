"""What a run reports: its counters (``Stats``) and one ``Update`` per folded batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Stats", "Update"]

V = TypeVar("V")


@dataclass(slots=True)
class Stats:
    """Counters of one run; every ``Update`` carries a snapshot.

    ``records`` and ``batches`` count what was folded (including what a resumed run inherited),
    ``run_records`` and ``run_batches`` this run's part; these record counts include the records
    of ``dead_letters`` (this run's), which ``good_records`` leaves out;
    ``queue_depth`` is the number of batches waiting for a worker, ``in_flight`` those running;
    latencies are seconds from a batch being cut to its result being folded. ``splits`` counts
    the file splits whose batches are folded (or being folded) in this run (each holds zero or
    more batches), ``split_fallbacks`` those whose call failed in a worker and whose batches were
    run one by one. ``late_records`` counts the records that came for a time window already closed
    (``Windows``), over the whole run including what a resumed run inherited.
    """

    records: int = 0
    batches: int = 0
    retries: int = 0
    crashes: int = 0
    timeouts: int = 0
    errors: int = 0
    dead_letters: int = 0
    checkpoints: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    position: Any = None
    started: float = 0.0
    elapsed: float = 0.0
    last_latency: float = 0.0
    total_latency: float = 0.0
    run_records: int = 0
    run_batches: int = 0
    splits: int = 0
    split_fallbacks: int = 0
    late_records: int = 0

    @property
    def good_records(self) -> int:
        """Records of this run whose results count: ``run_records`` less the dead letters."""
        return self.run_records - self.dead_letters

    def count_attempt(self, kind: str, retrying: bool) -> None:
        """Count one failed attempt: ``kind`` is ``"crash"``, ``"timeout"`` or ``"error"``."""
        if kind == "crash":
            self.crashes += 1
        elif kind == "timeout":
            self.timeouts += 1
        else:
            self.errors += 1
        if retrying:
            self.retries += 1

    def count_batch(self, records: int, dead: int, end: Any, cut_at: float, now: float) -> None:
        """Count one batch folded at ``now``: ``records`` records, ``dead`` of them dead letters,
        ending at position ``end``, cut at ``cut_at``."""
        self.dead_letters += dead
        self.records += records
        self.run_records += records
        self.batches += 1
        self.run_batches += 1
        self.position = end
        self.last_latency = now - cut_at
        self.total_latency += self.last_latency
        self.elapsed = now - self.started

    @property
    def mean_latency(self) -> float:
        """Mean seconds from cutting a batch to folding it, over this run."""
        return self.total_latency / self.run_batches if self.run_batches else 0.0

    @property
    def records_per_second(self) -> float:
        """Records folded per second in this run."""
        return self.run_records / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Update(Generic[V]):
    """The state after one batch was folded.

    ``results`` holds ``fn``'s results for the batch: one, or one per part that succeeded when the
    batch was split to isolate failing records (none when every record failed). ``result`` is the
    single result of a batch that ran whole, None otherwise. With shard owners (``ByKey``) they are
    the workers' receipts (``OwnedParts``): the keyed partials went to the owners (a pipeline with a
    ``sink`` gets no shard owners).
    """

    value: V
    seq: int
    records: int
    batch_records: int
    position: Any
    stats: Stats
    results: list[Any] = field(default_factory=list)
    split: bool = False

    @property
    def result(self) -> Any:
        """``fn``'s result for a batch that ran whole; None for a batch that was split."""
        return None if self.split or not self.results else self.results[0]
