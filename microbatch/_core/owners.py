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
hashes each key once and files it under its owner and shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .params import check_int
from .ring import Ring

__all__ = ["EncodedKeys", "cut", "owner_of_shards"]


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
