"""TopK: the k keys with the largest total counts, over sharded keyed state."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

from .._core.params import check_int
from .._core.ring import MAX_SHARDS, ring
from .base import JSON, Aggregator, _type_error
from .bykey import KeyedAggregator
from .keyed import KeyedState, KeyFolder

__all__ = ["TopK"]


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


class _Total(Aggregator[int, int, int]):
    """An int total of int counts of any sign (TopK's per-key state)."""

    def initial(self) -> int:
        return 0

    def fold(self, state: int, result: int) -> int:
        return state + result

    def value(self, state: int) -> int:
        return state

    def load(self, data: JSON) -> int:
        if type(data) is not int:
            raise ValueError(f"TopK.load(): a count must be an int, got {data!r:.100}")
        return data


class _TotalFolder(KeyFolder):
    def fold(self, shard: dict[Any, Any], part: Mapping[Any, Any]) -> None:
        get = shard.get
        for key, n in part.items():
            shard[key] = get(key, 0) + n

    def value(self, state: Any) -> Any:
        return state

    def dump(self, state: Any) -> JSON:
        return state

    def dump_all(self, states: Iterable[Any]) -> list[JSON]:
        return list(states)


class TopK(KeyedAggregator[list[tuple[str, int]]]):
    """The ``k`` keys with the largest total counts, as ``[(key, count), ...]`` most common first.

    Batch results: a mapping of ``str`` key to ``int`` count, e.g. ``collections.Counter(words)``.
    Keys must be str (convert other keys in ``fn``, or use ``ByKey(Count())`` for int and tuple
    keys). Ties are broken by key, in ascending order, so the value is the same however the
    batches fell.

    The counts are keyed state, as in ``ByKey``, placed in ``shards`` shards (default 16; not part
    of ``describe()``, so a resumed run may change it), and each shard keeps its own top k: the value
    is the top k of those. So checkpoints can write only the counts that changed
    (``dump_changes``), and shards can be folded apart.

    Memory: the counts of *every* distinct key are kept, exactly (the top k of a stream cannot be
    known otherwise): about 100 bytes plus the key's length per distinct key, so a million distinct
    words take about 150 MB. ``fold`` costs O(k + keys of the batch) per shard while counts only
    grow; after a negative count the shard's top k is recomputed from its keys when next needed.
    """

    def __init__(self, k: int, *, shards: int = 16) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"TopK(k): k must be an int, got {type(k).__qualname__}")
        if k < 1:
            raise ValueError(f"TopK(k): k must be at least 1, got {k}")
        self.k = k
        self.shards = check_int("TopK(shards)", shards, minimum=1, maximum=MAX_SHARDS)
        self._ring = ring(shards)
        self._folder = _TotalFolder(_Total())

    def describe(self) -> str:
        return f"TopK(k={self.k})"

    def split(self, result: Any) -> list[dict[Any, Any]]:
        """``result`` split by shard, after checking every key is a str and every count an int."""
        if not isinstance(result, Mapping):
            raise _type_error(self, result, "a mapping of str key to int count, e.g. collections.Counter")
        # Check the whole result before changing the state, so that a refused result changes nothing.
        for key, n in result.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{self.describe()} needs str keys, got the key {key!r:.100} of type "
                    f"{type(key).__qualname__}: convert keys to str in fn, or use ByKey(Count())"
                )
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(
                    f"{self.describe()} needs int counts, got {n!r:.100} of type {type(n).__qualname__} "
                    f"for the key {key!r:.100}"
                )
        return super().split(result)

    def _fold_part(self, state: KeyedState, shard: int, part: Mapping[Any, Any]) -> None:
        super()._fold_part(state, shard, part)
        if state.monotone[shard] and min(part.values()) < 0:
            state.monotone[shard] = False
        if state.monotone[shard]:
            # Counts only grew: a key outside the old top k that this part did not touch still ranks
            # below all k of them, so the new top k is among the old top k and this part's keys.
            counts = state.shards[shard]
            candidates = {key for key, _ in state.top[shard]}
            candidates.update(part)
            state.top[shard] = heapq.nsmallest(self.k, ((key, counts[key]) for key in candidates), key=_rank)

    def _shard_top(self, state: KeyedState, shard: int) -> list[tuple[str, int]]:
        if not state.monotone[shard]:
            state.top[shard] = heapq.nsmallest(self.k, state.shards[shard].items(), key=_rank)
            state.monotone[shard] = True
        return state.top[shard]

    def value(self, state: KeyedState) -> list[tuple[str, int]]:
        tops = (self._shard_top(state, shard) for shard in range(len(state.shards)))
        return heapq.nsmallest(self.k, chain.from_iterable(tops), key=_rank)

    def load(self, data: JSON) -> KeyedState:
        state = super().load(data)
        state.monotone = [False] * self.shards  # each shard's top k is computed from its keys when needed
        return state

    def load_documents(self, documents: Any) -> KeyedState:
        state = super().load_documents(documents)
        state.monotone = [False] * self.shards
        return state
