"""The fold stage's side of keyed state held by shard owners (see :mod:`microbatch.executors.owners`).

:func:`owned_run` decides whether a run uses shard owners and starts them; :class:`OwnedByKey`
stands for the ``ByKey`` in the fold stage: folding a batch sends its owners a FOLD, and its value
reads the owners while they run and their final state after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any

from .._core.ring import ring
from .._core.task import BatchTask
from ..aggregate import Aggregator, ByKey, Count, Sum
from ..aggregate.keyed import KeyedState
from ..executors import ProcessExecutor
from ..executors import ownerwire as wire
from ..executors.owners import OwnedParts, OwnerRoute, Owners

__all__ = ["OwnedByKey", "OwnedView", "owned_run", "owner_count"]


def owner_count(agg: object, workers: int | None) -> int:
    """How many shard owners a run of ``agg`` on ``workers`` worker processes uses (0: none).

    ``ByKey(Count())`` gets one owner per worker by default; ``ByKey(Sum())`` only when its
    ``owners`` is given; ``owners=0`` folds in the pipeline process. Never more owners than shards.
    """
    if type(agg) is not ByKey:
        return 0
    wanted = agg.owners
    if wanted is None:
        if type(agg.inner) is not Count:
            return 0
        wanted = workers or os.cpu_count() or 1
    if wanted == 0 or type(agg.inner) not in (Count, Sum):
        return 0
    return min(wanted, agg.shards)


async def owned_run(
    stack: AsyncExitStack,
    agg: Aggregator[Any, Any, Any],
    task: BatchTask[Any],
    executor: object,
    *,
    checkpoint: object,
    workers: int | None,
) -> tuple[OwnedByKey, BatchTask[Any]] | None:
    """Start shard owners on ``stack`` for a run that uses them: the aggregator and task it runs.

    None (nothing started) unless ``agg`` is a ``ByKey`` that :func:`owner_count` gives owners,
    run on worker processes, without a checkpoint (shard owners do not write checkpoints yet).
    """
    if checkpoint is not None or not isinstance(executor, ProcessExecutor):
        return None
    count = owner_count(agg, workers)
    if count == 0:
        return None
    assert isinstance(agg, ByKey)
    owners = await stack.enter_async_context(Owners(count, agg.shards))
    route = OwnerRoute(task.fn, agg.shards, owners.paths, counts=type(agg.inner) is Count)
    owned_task = BatchTask(route, encoding=task.encoding, errors=task.errors, where=task.where)
    return OwnedByKey(agg, owners), owned_task


class OwnedState:
    """The fold stage's state of keyed values held by shard owners."""

    __slots__ = ("owners",)

    def __init__(self, owners: Owners) -> None:
        self.owners = owners


class OwnedByKey(Aggregator[OwnedParts, OwnedState, Mapping[Any, Any]]):
    """Stands for a ``ByKey`` in the fold stage while shard owners hold its state."""

    def __init__(self, agg: ByKey, owners: Owners) -> None:
        self.agg = agg
        self.owners = owners
        self._final: KeyedState | None = None

    def describe(self) -> str:
        return self.agg.describe()

    def initial(self) -> OwnedState:
        return OwnedState(self.owners)

    def fold(self, state: OwnedState, result: OwnedParts) -> OwnedState:
        state.owners.fold(result)
        return state

    def final(self) -> Mapping[Any, Any] | None:
        """The keyed values once the owners' final state was taken (the run's block was left)."""
        if self._final is None:
            shards = self.owners.final
            if shards is None:
                return None
            state = KeyedState(ring(self.agg.shards))
            for shard, items in shards.items():
                state.shards[shard] = items
            self._final = state
        return self.agg.value(self._final)

    def value(self, state: OwnedState) -> Mapping[Any, Any]:
        final = self.final()
        return final if final is not None else OwnedView(self)

    def summary(self, state: OwnedState) -> dict[str, int]:
        """Progress without asking the owners: the batches they were told to fold."""
        return {"owners": self.owners.count, "batches": self.owners.batches}

    def dump(self, state: OwnedState) -> Any:
        # Called only by runs without a checkpoint store, whose saves write nothing.
        return None

    def load(self, data: Any) -> OwnedState:
        raise ValueError(f"{self.describe()}: state held by shard owners is not loaded from checkpoints")


class OwnedView(Mapping[Any, Any]):
    """Keyed values read from the shard owners while they run, from their final state after.

    While the owners run, each read waits for the owner's answer (after the folds it was told).
    """

    __slots__ = ("_agg",)

    def __init__(self, agg: OwnedByKey) -> None:
        self._agg = agg

    def __getitem__(self, key: object) -> Any:
        final = self._agg.final()
        if final is not None:
            return final[key]
        owners = self._agg.owners
        try:
            owner = owners.owner_of_key(key)
        except TypeError:
            raise KeyError(key) from None
        found, value = owners.ask(owner, wire.GET, wire.pack(key))
        if not found:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[Any]:
        final = self._agg.final()
        if final is not None:
            return iter(final)
        shards = self._agg.owners.take_state()
        return (key for items in shards.values() for key in items)

    def __len__(self) -> int:
        final = self._agg.final()
        if final is not None:
            return len(final)
        owners = self._agg.owners
        return sum(owners.ask(owner, wire.COUNT) for owner in range(owners.count))

    def __repr__(self) -> str:
        return f"<keyed values held by {self._agg.owners.count} shard owners>"
