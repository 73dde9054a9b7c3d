"""TopK: the k keys with the largest total counts."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from .base import JSON, Aggregator, _type_error

__all__ = ["TopK"]


class _TopKState:
    """Exact counts of every key, plus the current top k (derived, never dumped)."""

    __slots__ = ("counts", "top", "monotone")

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.top: list[tuple[str, int]] = []
        self.monotone = True  # False once a count decreased: the top k is then recomputed from all keys


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


class TopK(Aggregator[Mapping[str, int], _TopKState, list[tuple[str, int]]]):
    """The ``k`` keys with the largest total counts, as ``[(key, count), ...]`` most common first.

    Batch results: a mapping of ``str`` key to ``int`` count, e.g. ``collections.Counter(words)``.
    Keys must be str because the state is saved as a JSON object, whose keys are strings (convert
    other keys in ``fn``). Ties are broken by key, in ascending order, so the value is the same
    however the batches fell.

    Memory: the counts of *every* distinct key are kept, exactly (the top k of a stream cannot be
    known otherwise): about 100 bytes plus the key's length per distinct key, so a million distinct
    words take about 150 MB, and a checkpoint holds all of them. ``value`` costs O(k + keys in the
    last batch) while counts only grow; after a negative count it scans every key once per call.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"TopK(k): k must be an int, got {type(k).__qualname__}")
        if k < 1:
            raise ValueError(f"TopK(k): k must be at least 1, got {k}")
        self.k = k

    def initial(self) -> _TopKState:
        return _TopKState({})

    def fold(self, state: _TopKState, result: Mapping[str, int]) -> _TopKState:
        if not isinstance(result, Mapping):
            raise _type_error(self, result, "a mapping of str key to int count, e.g. collections.Counter")
        # Check the whole result before changing the state, so that a refused result changes nothing.
        for key, n in result.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{self.describe()} needs str keys (its state is a JSON object), "
                    f"got the key {key!r:.100} of type {type(key).__qualname__}: convert keys to str in fn"
                )
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(
                    f"{self.describe()} needs int counts, got {n!r:.100} of type {type(n).__qualname__} "
                    f"for the key {key!r:.100}"
                )
        counts = state.counts
        for key, n in result.items():
            if n < 0:
                state.monotone = False
            counts[key] = counts.get(key, 0) + n
        if state.monotone:
            # Counts only grew: a key outside the old top k that this batch did not touch still ranks
            # below all k of them, so the new top k is among the old top k and this batch's keys.
            candidates = {key for key, _ in state.top}
            candidates.update(result.keys())
            state.top = heapq.nsmallest(self.k, ((key, counts[key]) for key in candidates), key=_rank)
        return state

    def value(self, state: _TopKState) -> list[tuple[str, int]]:
        if state.monotone:
            return list(state.top)
        return heapq.nsmallest(self.k, state.counts.items(), key=_rank)

    def dump(self, state: _TopKState) -> JSON:
        return {"counts": dict(state.counts), "monotone": state.monotone}

    def load(self, data: JSON) -> _TopKState:
        counts = data.get("counts") if isinstance(data, dict) else None
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in counts.values()
        ):
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        state = _TopKState(dict(counts))
        state.monotone = bool(data.get("monotone", True))
        state.top = heapq.nsmallest(self.k, state.counts.items(), key=_rank)
        return state

