"""Which shard owner holds which shard of keyed state, and a batch result cut by owner.

Shard owners are processes that each hold some shards of a keyed aggregator's state (see
:mod:`microbatch.executors.owners`). The assignment of shards to owners is a pure function of the
two counts, the same in every process:

- balanced: owners hold ``shards // owners`` or one more shard each;
- stable: the assignment for ``n + 1`` owners is the one for ``n`` with ``shards // (n + 1)``
  shards handed to the new owner, each taken from the owner holding the most shards (the lowest
  numbered among equals), its highest-numbered shard. Going from ``n`` to ``n + 1`` owners moves
  only those shards, at most ``1 / (n + 1)`` of them, and the ring keeps shards about equal in keys.

:func:`cut` is the worker's side of a sharded fold: one pass over a batch's combined result that
hashes each key once and files it under its owner and shard; :class:`OwnerRoute` runs ``fn`` in a
worker, cuts its result and writes each owner's part, returning a receipt (:class:`OwnedParts`).
Workers import this module without the executors' (nor anyio). :class:`SplitSizer` sizes the
splits of a file from the keys its batches had.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from . import ownerwire as wire
from .ownerwire import EncodedKeys
from .params import check_int
from .ring import Ring, ring

__all__ = [
    "OwnedParts", "OwnerRoute", "SplitSizer", "cut", "key_universe", "owner_of_shards",
]


def owner_of_shards(shards: int, owners: int) -> list[int]:
    """The owner (``0 .. owners - 1``) of each shard (``0 .. shards - 1``), balanced and stable.

    ``ValueError`` naming the parameter when ``owners`` is below 1 or above ``shards``.
    """
    check_int("shards", shards, minimum=1)
    check_int("owners", owners, minimum=1, maximum=shards)
    owner = [0] * shards
    held = [shards] + [0] * (owners - 1)
    for n in range(2, owners + 1):
        new = n - 1
        for _ in range(shards // n):
            donor = max(range(new), key=lambda o: (held[o], -o))
            shard = max(s for s in range(shards) if owner[s] == donor)
            owner[shard] = new
            held[donor] -= 1
            held[new] += 1
    return owner


def cut(
    result: Mapping[Any, Any], ring: Ring, owner_of: list[int], owners: int
) -> list[dict[int, tuple[list[Any], list[Any]]]]:
    """``result`` cut into one ``{shard: (keys, values)}`` per owner (empty dicts for owners
    without keys): two lists of equal length per shard; the keys an :class:`EncodedKeys` when
    every key of ``result`` is a str without a newline.

    Each key is hashed once. ``TypeError`` naming the first key that is not a str, an int or a
    tuple of them, before anything is returned.
    """
    parts: list[dict[int, tuple[list[Any], list[Any]]]] = [{} for _ in range(owners)]
    encoded = ring.split_encoded(result)
    key_lists, value_lists = ring.split_lists(result) if encoded is None else encoded
    for shard, keys in enumerate(key_lists):
        if keys:
            parts[owner_of[shard]][shard] = (EncodedKeys(keys) if encoded else keys, value_lists[shard])
    return parts


class OwnedParts:
    """A worker's receipt for one batch result: ``(owner, part id)`` of each part it wrote, and
    the batch's records, their bytes (about: 0 when unknown) and the distinct keys of its result."""

    __slots__ = ("parts", "keys", "records", "nbytes")

    def __init__(
        self, parts: tuple[tuple[int, int], ...], keys: int, records: int = 0, nbytes: int = 0
    ) -> None:
        self.parts = parts
        self.keys = keys
        self.records = records
        self.nbytes = nbytes

    def __reduce__(self) -> tuple[Any, ...]:
        return (OwnedParts, (self.parts, self.keys, self.records, self.nbytes))

    def __repr__(self) -> str:
        return f"OwnedParts({len(self.parts)} parts, {self.keys} keys)"


class OwnerRoute:
    """Runs in a worker: ``fn``, then each owner's part of the result written for that owner."""

    def __init__(
        self, fn: Callable[[list[Any]], Any], shards: int, folder: str, owners: int, *, counts: bool
    ) -> None:
        self.fn = fn
        self.shards = shards
        self.folder = folder
        self.owners = owners
        self.counts = counts  # Count: partials must also be >= 0

    def __call__(self, records: list[Any]) -> OwnedParts:
        result = self.fn(records)
        if not isinstance(result, Mapping):
            raise TypeError(
                f"with shard owners, fn must return a mapping of key -> int (such as a Counter), "
                f"not {type(result).__qualname__}"
            )
        values = result.values()
        if values and (not set(map(type, values)) <= {int} or (self.counts and min(values) < 0)):
            key = next(k for k, v in result.items() if type(v) is not int or (self.counts and v < 0))
            raise TypeError(
                f"with shard owners, each partial must be an int{' >= 0' if self.counts else ''}; the key "
                f"{key!r:.100} has {result[key]!r:.100}; give ByKey(owners=0) to fold other values"
            )
        parts = cut(result, ring(self.shards), owner_of_shards(self.shards, self.owners), self.owners)
        keys = len(result)
        del result, values  # the parts hold what is left to send: less memory at the peak
        return OwnedParts(self.send(parts), keys, len(records), _bytes_of(records))

    def send(self, parts: list[dict[int, tuple[list[Any], list[Any]]]]) -> tuple[tuple[int, int], ...]:
        """Hand each owner its part (:func:`cut`), whole before returning: here as a part file in
        the owners' folder; ``(owner, part id)`` of each part."""
        sent = []
        for owner in range(self.owners):
            part, parts[owner] = parts[owner], {}
            if part:
                ident = wire.part_id()
                wire.write_part(wire.part_path(self.folder, owner, ident), wire.pack_part(part))
                sent.append((owner, ident))
        return tuple(sent)


def _bytes_of(records: list[Any]) -> int:
    """About the bytes of ``records`` as lines of a file (each with its newline), from the first
    ones; 0 when they are not strings or bytes."""
    head = records[:_SAMPLE]
    if not head or type(head[0]) not in (str, bytes):
        return 0
    try:
        return (sum(map(len, head)) + len(head)) * len(records) // len(head)
    except TypeError:  # not all of them
        return 0


#: Records whose length tells a batch's bytes.
_SAMPLE = 1_000


def key_universe(records: int, keys: int) -> float:
    """How many distinct keys a stream draws from, estimated from one batch of ``records`` records
    that held ``keys`` distinct keys, as if drawn uniformly: the ``K`` that solves
    ``keys = K * (1 - exp(-records / K))``; ``inf`` when no key repeated. A skewed stream (a few
    keys most of the time) gives a smaller estimate than its true count of keys."""
    if keys >= records:
        return math.inf
    if keys <= 0:
        return 0.0

    def drawn(k: float) -> float:  # distinct keys expected of `records` draws among k
        return -k * math.expm1(-records / k)

    lo = hi = float(keys)
    while drawn(hi) < keys:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if drawn(mid) < keys else (lo, mid)
    return hi


class SplitSizer:
    """The size of the next split of a file read by a run with shard owners, from its keys so far.

    Each distinct key of a batch's result costs a cut, a part and a fold in an owner; each record
    costs only ``fn``; and a worker holds a split's lines and result while it runs. When the keys
    seen say the file draws from more keys than a ``large`` split holds lines, a large split would
    combine few records per key while holding more in memory (and out of the caches): splits are
    ``small``. Else they are ``large``, and combine many records per key. Call it for the size now.
    """

    __slots__ = ("large", "small", "size")

    #: Fewer records than this in a batch say too little about the keys.
    MIN_RECORDS = 1_000

    def __init__(self, large: int, small: int) -> None:
        self.large = check_int("large", large, minimum=1)
        self.small = check_int("small", small, minimum=1, maximum=large)
        self.size = small

    def __call__(self) -> int:
        return self.size

    def observe(self, records: int, keys: int, nbytes: int) -> None:
        """A batch of ``records`` records (about ``nbytes`` bytes) had ``keys`` distinct keys."""
        if records < self.MIN_RECORDS or nbytes < 1:
            return
        lines_in_large = records * self.large / nbytes
        self.size = self.small if key_universe(records, keys) > lines_in_large else self.large
