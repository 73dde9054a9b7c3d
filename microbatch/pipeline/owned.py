"""The fold stage's side of keyed state held by shard owners (see :mod:`microbatch.executors.owners`).

:func:`owned_run` decides whether a run uses shard owners and starts them; :class:`OwnedByKey`
stands for the ``ByKey`` in the fold stage: folding a batch sends its owners a FOLD, and its value
reads the owners while they run and their final state after.
"""

from __future__ import annotations

import logging
import os
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from contextlib import AsyncExitStack
from typing import Any

import anyio

from .._core import ownerwire as wire
from .._core.owners import OwnedParts, OwnerRoute, SplitSizer
from .._core.ring import Ring, ring
from .._core.task import BatchTask
from ..aggregate import Aggregator, ByKey, Count, Sum
from ..checkpoints.session import Checkpoints, DeferredShards
from ..executors import ProcessExecutor, check_picklable
from ..executors.dask import DaskExecutor
from ..executors.dask_owners import DaskBarrier, DaskOwnerRoute, DaskOwners
from ..executors.owners import Barrier, Owners
from .stats import Stats

__all__ = [
    "OWNED_SMALL_SPLIT_SIZE", "OWNED_SPLIT_SIZE", "OwnedByKey", "OwnedView", "loaded_here", "owned_run",
    "owned_split_sizes", "owner_count", "PackedValues", "prepare_executor", "uses_owners",
]

log = logging.getLogger("microbatch")


#: Bytes per split of a file a run with shard owners reads, when ``split_size`` is not given:
#: this many while its keys are few against a split's lines...
OWNED_SPLIT_SIZE = 4 << 20
#: ... and this many once they are many (see :class:`~microbatch._core.owners.SplitSizer`).
OWNED_SMALL_SPLIT_SIZE = 1 << 20


def owned_split_sizes(
    size: int | None, default_size: bool, default_batch: bool, *, adapt: bool = True
) -> tuple[int | SplitSizer | None, int | None]:
    """The split size and the lines per batch inside a split of a run with shard owners.

    Each batch result's distinct keys cost a cut, a message and a fold in an owner; the records of
    a batch cost only ``fn``. Batches that are large against the number of keys combine many
    records per key, so when not given: splits of ``OWNED_SPLIT_SIZE`` bytes (instead of 2 MiB),
    or of ``OWNED_SMALL_SPLIT_SIZE`` once the keys seen are too many for a split to combine them
    (a :class:`SplitSizer`, told of each batch's keys by :class:`OwnedByKey`); each split one batch
    (``max_size`` stays the bound of batches read in the pipeline process). Without ``adapt``
    (on Dask, where each split is a task and many are in flight before the first is folded),
    always ``OWNED_SPLIT_SIZE``.
    """
    sized: int | SplitSizer | None = size
    if default_size and size is not None:
        size = sized = OWNED_SPLIT_SIZE
        if adapt:
            sized = SplitSizer(OWNED_SPLIT_SIZE, OWNED_SMALL_SPLIT_SIZE)
    batch = size if default_batch and size is not None else None  # a line holds at least one byte
    return sized, batch


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


def uses_owners(agg: object, executor: object, checkpoints: Checkpoints, workers: int | None) -> bool:
    """Whether a run of ``agg`` on ``executor`` keeps its keyed state in shard owners: a ``ByKey``
    that :func:`owner_count` gives owners, on worker processes or a Dask cluster (owners as actors),
    without a checkpoint or with one in a folder or SQLite file (whose shard files the owners
    write), not a store object."""
    if isinstance(executor, DaskExecutor):
        if owner_count(agg, 1) == 0:
            return False
    elif not isinstance(executor, ProcessExecutor) or owner_count(agg, workers) == 0:
        return False
    return checkpoints.target is None or isinstance(checkpoints.target, (str, os.PathLike))


def prepare_executor(executor: Any, pipeline: Any, agg: object, checkpoints: Checkpoints) -> Any:
    """``executor``, once checked for ``pipeline``'s fn (picklable for worker processes); says to
    ``checkpoints`` whether shard owners will hold the run's keyed state (and load a keyed
    checkpoint themselves, see :func:`uses_owners`)."""
    if isinstance(executor, ProcessExecutor):
        check_picklable(pipeline.fn)
    # A sink is given fn's results: they must stay results, not the owners' receipts.
    owners = pipeline.sink is None and uses_owners(agg, executor, checkpoints, pipeline.workers)
    checkpoints.defer_keyed = owners
    return executor


async def loaded_here(state: Any) -> Any:
    """``state``, or the keyed state a ``DeferredShards`` names loaded in this process."""
    if isinstance(state, DeferredShards):
        return await anyio.to_thread.run_sync(state.load)
    return state


async def owned_run(
    stack: AsyncExitStack,
    agg: Aggregator[Any, Any, Any],
    task: BatchTask[Any],
    state: Any,
    stats: Stats,
    checkpoints: Checkpoints,
    pipeline: Any,
    executor: Any,
    split_size: object = None,
) -> tuple[Aggregator[Any, Any, Any], BatchTask[Any], Any]:
    """The aggregator, task and state a run goes on with: as given, unless ``checkpoints`` says
    the run uses shard owners (:func:`prepare_executor`); then they are started on ``stack``.

    ``state`` is the initial state, or the ``DeferredShards`` of the checkpoint resumed from, which
    the owners load (``CheckpointCorrupt`` naming a damaged file). With a checkpoint, a dead owner
    is started again. On a ``DaskExecutor`` the owners are Dask actors
    (:mod:`microbatch.executors.dask_owners`); elsewhere processes, one per ``pipeline.workers``.
    A ``split_size`` that is a :class:`SplitSizer` is told of each batch's keys.
    """
    if not checkpoints.defer_keyed:
        return agg, task, state
    assert isinstance(agg, ByKey)
    counts = type(agg.inner) is Count
    sizer = split_size if isinstance(split_size, SplitSizer) else None
    if isinstance(executor, DaskExecutor):
        actors = await stack.enter_async_context(DaskOwners(executor, agg.owners, agg.shards))
        if isinstance(state, DeferredShards):
            loaded = await actors.load(state.manifest, state.folder)
            log.info("shard owners on Dask loaded %d keys from %s", loaded, state.folder)
        route: OwnerRoute = DaskOwnerRoute(task.fn, agg.shards, actors.actors, counts=counts)
        owned = OwnedByKey(agg, actors, stats, sizer)
        task = BatchTask(route, encoding=task.encoding, errors=task.errors, where=task.where)
        return owned, task, owned.initial()
    owners = await stack.enter_async_context(
        Owners(owner_count(agg, pipeline.workers), agg.shards, keep_parts=checkpoints.target is not None)
    )
    if isinstance(state, DeferredShards):
        manifest, folder = state.manifest, state.folder
        loaded = await anyio.to_thread.run_sync(lambda: owners.load(manifest, folder))
        log.info("shard owners loaded %d keys from %s", loaded, folder)
    route = OwnerRoute(task.fn, agg.shards, owners.folder, owners.count, counts=counts)
    owned_task = BatchTask(route, encoding=task.encoding, errors=task.errors, where=task.where)
    owned = OwnedByKey(agg, owners, stats, sizer)
    return owned, owned_task, owned.initial()


class OwnedState:
    """The fold stage's state of keyed values held by shard owners."""

    __slots__ = ("owners",)

    def __init__(self, owners: Owners | DaskOwners) -> None:
        self.owners = owners


class OwnedByKey(Aggregator[OwnedParts, OwnedState, Mapping[Any, Any]]):
    """Stands for a ``ByKey`` in the fold stage while shard owners hold its state."""

    def __init__(
        self, agg: ByKey, owners: Owners | DaskOwners, stats: Stats, sizer: SplitSizer | None = None
    ) -> None:
        self.agg = agg
        self.owners = owners
        self.stats = stats  # the fold stage's: ``batches`` is the number of a checkpoint taken now
        self.sizer = sizer  # told of each batch's keys: the reader's next splits follow
        self._final: PackedValues | None = None

    def describe(self) -> str:
        return self.agg.describe()

    def initial(self) -> OwnedState:
        return OwnedState(self.owners)

    def fold(self, state: OwnedState, result: OwnedParts) -> OwnedState:
        state.owners.fold(result)
        if self.sizer is not None:
            self.sizer.observe(result.records, result.keys, result.nbytes)
        return state

    def final(self) -> Mapping[Any, Any] | None:
        """The keyed values once the owners' final state was taken (the run's block was left)."""
        if self._final is None:
            taken = self.owners.final
            if taken is None:
                return None
            self._final = PackedValues(taken, ring(self.agg.shards))
        return self._final

    def value(self, state: OwnedState) -> Mapping[Any, Any]:
        final = self.final()
        return final if final is not None else OwnedView(self)

    def summary(self, state: OwnedState) -> dict[str, int]:
        """Progress without asking the owners: the batches they were told to fold."""
        return {"owners": self.owners.count, "batches": self.owners.batches}

    def barrier(self, state: OwnedState, folder: str) -> Barrier | DaskBarrier:
        """A checkpoint of the owners' state now: each writes its shard files into ``folder``."""
        return self.owners.barrier(self.stats.batches, folder)

    def dump(self, state: OwnedState) -> Any:
        # Called only by runs without a checkpoint store (whose saves write nothing): a store
        # object, not a folder, never gets shard owners.
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

    def values(self) -> ValuesView[Any]:
        final = self._agg.final()
        return super().values() if final is None else final.values()

    def items(self) -> ItemsView[Any, Any]:
        final = self._agg.final()
        return super().items() if final is None else final.items()

    def __len__(self) -> int:
        final = self._agg.final()
        if final is not None:
            return len(final)
        owners = self._agg.owners
        return sum(owners.ask(owner, wire.COUNT) for owner in range(owners.count))

    def __repr__(self) -> str:
        return f"<keyed values held by {self._agg.owners.count} shard owners>"


class PackedValues(Mapping[Any, Any]):
    """The keyed values of a run's end: the owners' state as they sent it, part bytes
    (:func:`microbatch._core.ownerwire.pack_part`), decoded a shard at a time as it is read.
    The owners hold int counts and sums, which are their own values.

    A lookup hashes the key once and decodes its shard (the last shard decoded is kept);
    iterating decodes each shard in turn. ``dict(values)`` makes an ordinary copy.
    """

    __slots__ = ("_taken", "_blocks", "_ring", "_len", "_decoded")

    def __init__(self, taken: Sequence[bytes | bytearray], place: Ring) -> None:
        self._taken = taken
        self._blocks: dict[int, tuple[int, wire.Block]] = {}
        for index, data in enumerate(taken):
            for block in wire.part_blocks(data):
                self._blocks[block[1]] = (index, block)
        self._ring = place
        self._len = sum(block[2] for _, block in self._blocks.values())
        self._decoded: tuple[int, dict[Any, Any]] = (-1, {})

    def _items(self, shard: int) -> tuple[Any, Any]:
        index, block = self._blocks[shard]
        return wire.block_items(self._taken[index], block)

    def _shard(self, shard: int) -> dict[Any, Any]:
        if self._decoded[0] != shard:
            self._decoded = (shard, dict(zip(*self._items(shard), strict=True)))
        return self._decoded[1]

    def __getitem__(self, key: object) -> Any:
        try:
            shard = self._ring.shard_of(key)
        except TypeError:
            raise KeyError(key) from None
        if shard not in self._blocks:
            raise KeyError(key)
        return self._shard(shard)[key]

    def __iter__(self) -> Iterator[Any]:
        for shard in sorted(self._blocks):
            yield from self._items(shard)[0]

    def __len__(self) -> int:
        return self._len

    def values(self) -> ValuesView[Any]:
        return _PackedValuesView(self)

    def items(self) -> ItemsView[Any, Any]:
        return _PackedItems(self)

    def __repr__(self) -> str:
        return f"<keyed values of {self._len} keys in {len(self._blocks)} shards>"


class _PackedValuesView(ValuesView[Any]):
    _mapping: PackedValues

    def __iter__(self) -> Iterator[Any]:
        packed = self._mapping
        for shard in sorted(packed._blocks):
            yield from packed._items(shard)[1]


class _PackedItems(ItemsView[Any, Any]):
    _mapping: PackedValues

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        packed = self._mapping
        for shard in sorted(packed._blocks):
            yield from zip(*packed._items(shard), strict=True)
