"""Keyed state, shard by shard: one dict of key -> inner state per shard of the ring.

:class:`KeyedState` is what :class:`~microbatch.aggregate.ByKey` folds into. Besides the dicts it
remembers, per shard, which keys changed since the last incremental checkpoint, so that a
checkpoint writes only those (``ByKey.dump_changes``). The per-key work is done by a *folder*
chosen for the inner aggregator: ``Count`` and ``Sum`` get a fast path that keeps plain ints while
the partials are ints; any other aggregator goes through its own ``initial``/``fold``/``value``.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from typing import Any

from .._core.keys import key_hash
from .._core.ring import Ring
from .base import JSON, Aggregator
from .exact import _ExactSum
from .numeric import Count, Sum

__all__ = ["KeyFolder", "KeyedState", "KeyedView", "folder_for"]

#: A shard whose changed keys pass this share of its keys is written whole at the next checkpoint
#: (and its set of changed keys is dropped, which bounds that set's memory).
WHOLE_SHARD_SHARE = 0.5


class KeyedState:
    """Per shard: the dict of key -> inner state, and what changed since the last checkpoint.

    ``changed[s]`` holds the keys of shard ``s`` folded since the last ``dump_changes``;
    ``whole[s]`` says that shard ``s`` must be written whole next time (after a reshard, or when
    most of its keys changed), in which case ``changed[s]`` is not kept up to date.
    ``broken`` is set when an inner aggregator refused part of a batch result after other keys of
    that result were folded: such a state is no longer a fold of whole batches, and neither folds
    nor dumps further.
    """

    __slots__ = ("ring", "shards", "changed", "whole", "broken", "top", "monotone")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.shards: list[dict[Any, Any]] = [{} for _ in range(ring.shards)]
        self.changed: list[set[Any]] = [set() for _ in range(ring.shards)]
        self.whole = [False] * ring.shards
        self.broken: str | None = None
        # used by TopK only, per shard: the shard's top k, and whether its counts only grew since
        # that top k was computed from all of the shard's keys
        self.top: list[list[tuple[Any, Any]]] = [[] for _ in range(ring.shards)]
        self.monotone = [True] * ring.shards

    def note_changes(self, shard: int, keys: Mapping[Any, Any]) -> None:
        """Remember that ``keys`` of ``shard`` changed (a set update at C speed)."""
        if self.whole[shard]:
            return
        changed = self.changed[shard]
        changed.update(keys)
        if len(changed) > WHOLE_SHARD_SHARE * len(self.shards[shard]) and len(changed) > 64:
            self.whole[shard] = True
            changed.clear()

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def get(self, key: object) -> Any:
        """The inner state of ``key``; ``KeyError`` when it was never folded or is not a key."""
        try:
            h = key_hash(key)
        except TypeError:
            raise KeyError(key) from None
        return self.shards[self.ring.shard_of_hash(h)][key]


class KeyFolder:
    """Folds per-key partials into a shard's dict with any aggregator, and converts its states."""

    def __init__(self, inner: Aggregator[Any, Any, Any]) -> None:
        self.inner = inner

    def fold(self, shard: dict[Any, Any], part: Mapping[Any, Any]) -> None:
        inner, missing = self.inner, _MISSING
        for key, partial in part.items():
            state = shard.get(key, missing)
            try:
                shard[key] = inner.fold(inner.initial() if state is missing else state, partial)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"for the key {key!r:.100}: {exc}") from None

    def value(self, state: Any) -> Any:
        return self.inner.value(state)

    def dump(self, state: Any) -> JSON:
        return self.inner.dump(state)

    def load(self, data: JSON) -> Any:
        return self.inner.load(data)

    def dump_all(self, states: Iterable[Any]) -> list[JSON]:
        """``dump`` of each state, in order."""
        return list(map(self.dump, states))


_MISSING: Any = object()


class _CountFolder(KeyFolder):
    """Count per key: an int added as it is, anything else through ``Count.fold``."""

    def fold(self, shard: dict[Any, Any], part: Mapping[Any, Any]) -> None:
        get = shard.get
        for key, partial in part.items():
            if type(partial) is int and partial >= 0:
                shard[key] = get(key, 0) + partial
            else:
                try:
                    shard[key] = self.inner.fold(get(key, 0), partial)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"for the key {key!r:.100}: {exc}") from None

    def value(self, state: Any) -> Any:
        return state

    def dump(self, state: Any) -> JSON:
        return state

    def dump_all(self, states: Iterable[Any]) -> list[JSON]:
        return list(states)  # ints are their own JSON


class _SumFolder(KeyFolder):
    """Sum per key: a plain int while the key saw only ints, an exact sum once it saw anything else.

    Both forms dump as ``Sum`` would, except that an int state dumps as the int itself.
    """

    def fold(self, shard: dict[Any, Any], part: Mapping[Any, Any]) -> None:
        get = shard.get
        for key, partial in part.items():
            state = get(key, 0)
            if type(partial) is int and type(state) is int:
                shard[key] = state + partial
                continue
            if type(state) is int:
                acc = _ExactSum()
                acc.add_int_sum(state)
                state = acc
            try:
                shard[key] = self.inner.fold(state, partial)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"for the key {key!r:.100}: {exc}") from None

    def value(self, state: Any) -> Any:
        return state if type(state) is int else state.total()

    def dump(self, state: Any) -> JSON:
        return state if type(state) is int else state.dump()

    def dump_all(self, states: Iterable[Any]) -> list[JSON]:
        return [state if type(state) is int else state.dump() for state in states]

    def load(self, data: JSON) -> Any:
        if type(data) is int:
            return data
        return self.inner.load(data)


def folder_for(inner: Aggregator[Any, Any, Any]) -> KeyFolder:
    """The folder for ``inner``: a fast one for ``Count`` and ``Sum`` (not their subclasses)."""
    if type(inner) is Count:
        return _CountFolder(inner)
    if type(inner) is Sum:
        return _SumFolder(inner)
    return KeyFolder(inner)


class KeyedView(Mapping[Any, Any]):
    """A read-only mapping of key -> inner value over a keyed state, computed on access.

    It is a view: it shows later folds into the same state. Take ``dict(view)`` to keep a copy.
    Looking up a key costs one hash; ``len`` adds up the shards' sizes.
    """

    __slots__ = ("_state", "_value")

    def __init__(self, state: KeyedState, value: Any) -> None:
        self._state = state
        self._value = value

    def __getitem__(self, key: object) -> Any:
        return self._value(self._state.get(key))

    def __iter__(self) -> Iterator[Any]:
        for shard in self._state.shards:
            yield from shard

    def __len__(self) -> int:
        return len(self._state)

    # Shard by shard, without hashing each key again as ``Mapping``'s own views would.
    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def items(self) -> ItemsView[Any, Any]:
        return _Items(self)

    def __repr__(self) -> str:
        return f"<keyed values of {len(self)} keys in {len(self._state.shards)} shards>"


class _Values(ValuesView[Any]):
    _mapping: KeyedView

    def __iter__(self) -> Iterator[Any]:
        view = self._mapping
        for shard in view._state.shards:
            yield from map(view._value, shard.values())


class _Items(ItemsView[Any, Any]):
    _mapping: KeyedView

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        view = self._mapping
        for shard in view._state.shards:
            yield from zip(shard.keys(), map(view._value, shard.values()), strict=True)
