"""ByKey: one inner aggregator state per key, the keys placed in shards by a consistent-hash ring.

Shard documents (what ``dump``, ``dump_shard`` and ``dump_changes`` write, one JSON object per
shard)::

    {"format": "microbatch.keyed/1", "shard": 3, "shards": 16, "kind": "base" | "delta",
     "count": 51234, "keys": [...], "states": [...]}

``keys`` holds the JSON form of each key (see :mod:`microbatch._core.keys`: str and int as they
are, tuples as arrays) and ``states`` the inner aggregator's ``dump`` of that key's state, in the
same order. ``count`` is the number of keys the shard holds in all (a delta names only those that
changed). A delta is applied over its base by replacing the states of the keys it names: reading a
base and then its deltas in order gives the shard.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .._core.keys import key_from_json, key_to_json
from .._core.params import check_int
from .._core.ring import MAX_SHARDS, Ring, ring
from .base import JSON, Aggregator, _type_error
from .keyed import KeyedState, KeyedView, KeyFolder, folder_for

__all__ = ["ByKey", "KeyedAggregator", "split_to_bytes"]

V = TypeVar("V")

FORMAT = "microbatch.keyed/1"
_ACCEPTS = "a mapping of key (str, int or a tuple of them) to the batch result of that key"


class KeyedAggregator(Aggregator[Mapping[Any, Any], KeyedState, V]):
    """What :class:`ByKey` and :class:`~microbatch.aggregate.TopK` share: sharded keyed state.

    Subclasses set ``shards``, ``_ring`` and ``_folder`` and implement ``value``. The pipeline can
    treat every keyed aggregator alike: ``split``/``split_to_bytes`` in workers, ``fold_shard`` in
    shard owners, ``dump_changes``/``load_documents`` for checkpoints that write what changed.
    """

    shards: int
    _ring: Ring
    _folder: KeyFolder

    @property
    def ring(self) -> Ring:
        """The ring that places keys in this aggregator's shards."""
        return self._ring

    def initial(self) -> KeyedState:
        return KeyedState(self._ring)

    # --- folding ------------------------------------------------------------------------------

    def split(self, result: Any) -> list[dict[Any, Any]]:
        """``result`` split into one dict per shard; ``TypeError`` for a non-mapping or a bad key."""
        if not isinstance(result, Mapping):
            raise _type_error(self, result, _ACCEPTS)
        try:
            return self._ring.split(result)
        except TypeError as exc:
            raise TypeError(
                f"{self.describe()} cannot fold a batch result of type {type(result).__qualname__}: "
                f"{exc}; convert the keys in fn"
            ) from None

    def fold(self, state: KeyedState, result: Mapping[Any, Any]) -> KeyedState:
        parts = self.split(result)  # refuses a bad key before anything changes
        for shard, part in enumerate(parts):
            if part:
                self._fold_part(state, shard, part)
        return state

    def _fold_part(self, state: KeyedState, shard: int, part: Mapping[Any, Any]) -> None:
        if state.broken is not None:
            raise ValueError(state.broken)
        try:
            self._folder.fold(state.shards[shard], part)
        except (TypeError, ValueError) as exc:
            state.broken = (
                f"{self.describe()}: this state holds part of a refused batch result and cannot "
                f"fold or be saved any more (the refusal was: {exc})"
            )
            raise type(exc)(f"{self.describe()} {exc}") from None
        finally:
            state.note_changes(shard, part)

    def fold_shard(self, state: KeyedState, shard: int, data: bytes) -> KeyedState:
        """Fold one shard's part of a batch result, as ``split_to_bytes`` encoded it in a worker.

        ``state`` may hold only some shards (a shard owner's): only ``shard`` is touched. Parts of
        one shard must be folded in batch order; parts of different shards in any order.
        ``data`` is a pickle: take it only from this pipeline's own workers, never from files
        (checkpoints are JSON).
        """
        check_int("shard", shard, maximum=self.shards - 1)
        part = pickle.loads(data)
        if part:
            self._fold_part(state, shard, part)
        return state

    def summary(self, state: KeyedState) -> dict[str, int]:
        """A cheap summary for progress updates: the number of keys."""
        return {"keys": len(state)}

    # --- checkpoints --------------------------------------------------------------------------

    def _check_whole(self, state: KeyedState) -> None:
        if state.broken is not None:
            raise ValueError(state.broken)

    def dump_shard(self, state: KeyedState, shard: int, *, kind: str = "base") -> JSON:
        """One shard as a JSON document (see the module's docstring), all its keys."""
        self._check_whole(state)
        return self._document(state, shard, state.shards[shard], kind)

    def _document(self, state: KeyedState, shard: int, items: Mapping[Any, Any], kind: str) -> JSON:
        return {
            "format": FORMAT, "shard": shard, "shards": self.shards, "kind": kind,
            "count": len(state.shards[shard]),
            "keys": [key_to_json(key) if type(key) is tuple else key for key in items],
            "states": self._folder.dump_all(items.values()),
        }

    def dump(self, state: KeyedState) -> JSON:
        """Every shard's document, under ``{"format": ..., "documents": [...]}``."""
        return {"format": FORMAT, "documents": [self.dump_shard(state, s) for s in range(self.shards)]}

    def dump_changes(self, state: KeyedState) -> list[JSON]:
        """Documents of what changed since the last call (or since ``initial``/``load``), then forget it.

        One document per shard that changed: a ``"delta"`` naming the changed keys, or a whole
        ``"base"`` when most of the shard's keys changed or the state was resharded. The documents
        share nothing mutable with the state, so they can be written in another thread while
        folding goes on. The caller owns them: if writing them fails it must keep them and write
        them (or newer documents of the same shards) before any later delta.
        """
        self._check_whole(state)
        documents = []
        for shard in range(self.shards):
            if state.whole[shard]:
                documents.append(self._document(state, shard, state.shards[shard], "base"))
            elif state.changed[shard]:
                items = state.shards[shard]
                changed = {key: items[key] for key in state.changed[shard]}
                documents.append(self._document(state, shard, changed, "delta"))
            state.whole[shard] = False
            state.changed[shard].clear()
        return documents

    def mark_all_changed(self, state: KeyedState) -> None:
        """Make the next ``dump_changes`` give every shard whole (for a new set of shard files)."""
        state.whole = [True] * len(state.shards)
        for changed in state.changed:
            changed.clear()

    def load(self, data: JSON) -> KeyedState:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("documents"), list
        ):
            raise ValueError(f"{self.describe()}.load(): not a state this aggregator dumped: {data!r:.200}")
        return self.load_documents(data["documents"])

    def load_documents(self, documents: Iterable[JSON]) -> KeyedState:
        """The state the shard documents describe: each shard's base, then its deltas in order.

        Documents written with another shard count are placed again by this aggregator's ring
        (exact whatever the counts), and every shard is then marked to be written whole at the next
        ``dump_changes``, since the files on disk follow the old layout.
        """
        state = self.initial()
        load, where = self._folder.load, f"{self.describe()}.load()"
        resharded = False
        for doc in documents:
            shard, keys, states = _parse(doc, where)
            same = doc["shards"] == self.shards
            resharded = resharded or not same
            target = state.shards[shard] if same else None
            try:
                for key_data, inner_data in zip(keys, states, strict=True):
                    key = key_from_json(key_data)
                    shard_dict = target if target is not None else state.shards[self._ring.shard_of(key)]
                    shard_dict[key] = load(inner_data)
            except ValueError as exc:
                raise ValueError(f"{where}: shard {shard}: {exc}") from None
        if resharded:
            self.mark_all_changed(state)
        return state


class ByKey(KeyedAggregator[Mapping[Any, Any]]):
    """Folds each key's results into that key's own ``inner`` state: counts per user, sums per URL.

    ``fn`` returns a mapping of key -> partial result for its batch, e.g. a ``collections.Counter``
    for ``ByKey(Count())``; each partial folds into the key's ``inner`` state (``Sum()``,
    ``Count()``, ``Mean()``, ``Min()``, ``Max()`` or your own aggregator). Keys are str, int or tuples
    of them; any other key raises ``TypeError`` naming it and the batch result's type, and the state
    is left unchanged. ``value`` is a read-only ``Mapping`` of key -> inner value, computed on
    access (a view of the state: take ``dict(...)`` to keep a copy).

    ``shards`` (default 16, 1 to 4096) is the number of shards the keys are placed in by a
    consistent-hash ring, so that checkpoints can write only the shards and keys that changed
    (``dump_changes``) and shards can be folded apart (``split_to_bytes``, ``fold_shard``).
    It is not part of ``describe()``: a checkpoint dumped with other ``shards`` loads exactly,
    its keys placed again.

    ``owners``: on worker processes and without a checkpoint, the state of ``ByKey(Count())`` is
    held by shard owner processes, one per worker by default, which workers feed directly (see
    :mod:`microbatch.executors.owners`); ``owners=N`` (0 to ``shards``) sets how many, and also
    gives ``ByKey(Sum())`` owners (int partials only); ``owners=0`` folds in the pipeline process.
    On a ``DaskExecutor`` the owners are Dask actors, one per worker by default (see
    :mod:`microbatch.executors.dask_owners`). Not part of ``describe()``.

    Memory: every key's inner state is kept, a dict entry (about 100 bytes) plus the key and the
    state; ``Count`` and ``Sum`` keep plain ints while partials are ints.
    """

    def __init__(
        self, inner: Aggregator[Any, Any, Any], *, shards: int = 16, owners: int | None = None
    ) -> None:
        if not isinstance(inner, Aggregator):
            raise TypeError(
                f"ByKey(inner): inner must be an aggregator such as mb.Sum() or mb.Count(), "
                f"got {inner!r:.100} of type {type(inner).__qualname__}"
            )
        self.inner = inner
        self.shards = check_int("ByKey(shards)", shards, minimum=1, maximum=MAX_SHARDS)
        self._ring = ring(shards)
        self._folder = folder_for(inner)
        self.owners = None if owners is None else check_int(
            "ByKey(owners)", owners, minimum=0, maximum=self.shards
        )

    def describe(self) -> str:
        return f"{type(self).__name__}({self.inner.describe()})"

    def value(self, state: KeyedState) -> Mapping[Any, Any]:
        return KeyedView(state, self._folder.value)


def _parse(doc: JSON, where: str) -> tuple[int, list[Any], list[Any]]:
    if (
        not isinstance(doc, dict)
        or doc.get("format") != FORMAT
        or not isinstance(doc.get("keys"), list)
        or not isinstance(doc.get("states"), list)
        or len(doc["keys"]) != len(doc["states"])
        or type(doc.get("shards")) is not int
        or type(doc.get("shard")) is not int
        or not 0 <= doc["shard"] < doc["shards"]
        or doc.get("kind") not in ("base", "delta")
        or type(doc.get("count")) is not int
        or doc["count"] < 0
    ):
        raise ValueError(f"{where}: not a shard document of keyed state: {doc!r:.200}")
    return doc["shard"], doc["keys"], doc["states"]


def split_to_bytes(result: Any, agg: KeyedAggregator[Any]) -> dict[int, bytes]:
    """In a worker: ``result`` split by ``agg``'s shards, each non-empty part pickled.

    The parent can route each part to the owner of its shard without unpickling it; the owner
    folds it with ``agg.fold_shard(state, shard, data)``. ``TypeError`` for a result that is not a
    mapping or holds a key that is not a str, an int or a tuple of them, naming the key.
    """
    return {
        shard: pickle.dumps(part, protocol=5)
        for shard, part in enumerate(agg.split(result))
        if part
    }
