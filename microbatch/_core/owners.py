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
hashes each key once and files it under its owner and shard. :class:`SplitSizer` sizes the splits
of a file from the keys its batches had.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .params import check_int
from .ring import Ring

__all__ = ["EncodedKeys", "SplitSizer", "cut", "key_universe", "owner_of_shards"]


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


class EncodedKeys(list[bytes]):
    """Keys of a part already UTF-8 (``surrogatepass``) encoded: every one was a str without a
    newline (see :meth:`microbatch._core.ring.Ring.split_encoded`)."""

    __slots__ = ()


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
