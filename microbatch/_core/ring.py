"""The consistent-hash ring that places keys of keyed state in shards.

Every shard owns ``vnodes`` points on a circle of 64-bit hashes; the point of shard ``s`` number
``v`` is XXH3-64 (seed 0) of ``b"microbatch-ring/%d/%d" % (s, v)``. A key belongs to the shard of
the first point at or after the key's hash (see :mod:`microbatch._core.keys`), wrapping around.
Points of equal hash are ordered by shard number.

Why a ring rather than ``hash % shards``: the points of shard ``s`` do not depend on how many
shards there are, so the ring of ``N + 1`` shards is the ring of ``N`` plus the points of the new
shard. Going from ``N`` to ``N + 1`` shards moves only the keys the new shard takes, about
``1 / (N + 1)`` of them, and a state resumed with another shard count moves few keys between
shard files. With 256 points per shard the new shard's part stays within 1.5 / (N + 1) (checked
by the tests for 1 to 8 shards).

Lookups cost one table index for most keys: the top 16 bits of the hash select one of 65,536
ranges of the circle, and a range that holds no point boundary between two shards knows its shard;
the others (a few percent at 16 shards) search the sorted points.
"""

from __future__ import annotations

import contextlib
import functools
from bisect import bisect_left
from collections.abc import Mapping
from itertools import repeat
from operator import rshift
from typing import Any

import xxhash

from .keys import STR_SEED, key_hash
from .params import check_int

__all__ = ["DEFAULT_VNODES", "MAX_SHARDS", "Ring", "ring"]

#: Points per shard. More points spread keys more evenly and make the ring slower to build.
DEFAULT_VNODES = 256
#: The largest shard count a ring accepts.
MAX_SHARDS = 4096

_TABLE_BITS = 16
_SHIFT = 64 - _TABLE_BITS
_MIXED = -1
_hash = xxhash.xxh3_64_intdigest


def _point(shard: int, vnode: int) -> int:
    return xxhash.xxh3_64_intdigest(b"microbatch-ring/%d/%d" % (shard, vnode))


class Ring:
    """Maps keys (or their 64-bit hashes) to shard numbers ``0 .. shards - 1``.

    ``shards`` is an int from 1 to :data:`MAX_SHARDS`; ``vnodes`` (points per shard, default
    :data:`DEFAULT_VNODES`) at least 1. A ring pickles as its two settings and is rebuilt (a few
    milliseconds for 16 shards) where it is unpickled; :func:`ring` caches rings per process.
    """

    __slots__ = ("shards", "vnodes", "_points", "_owners", "_table")

    def __init__(self, shards: int, *, vnodes: int = DEFAULT_VNODES) -> None:
        self.shards = check_int("shards", shards, minimum=1, maximum=MAX_SHARDS)
        self.vnodes = check_int("vnodes", vnodes, minimum=1, maximum=1 << 16)
        placed = sorted((_point(s, v), s) for s in range(shards) for v in range(vnodes))
        self._points = [p for p, _ in placed]
        self._owners = [s for _, s in placed]
        self._table = self._build_table()

    def _build_table(self) -> list[int]:
        """For each of the 2**16 ranges of hashes, its shard, or ``_MIXED`` when it holds several."""
        points, owners, n = self._points, self._owners, len(self._points)
        table = []
        j = 0  # bisect_left(points, lo) for the current range
        for b in range(1 << _TABLE_BITS):
            lo = b << _SHIFT
            hi = lo + (1 << _SHIFT) - 1
            while j < n and points[j] < lo:
                j += 1
            owner = owners[j % n]
            k = j
            # hashes in [lo, hi] map to owners[j .. bisect_left(points, hi)] (modulo n)
            while k < n and points[k] < hi:
                k += 1
                if owners[k % n] != owner:
                    owner = _MIXED
                    break
            table.append(owner)
        return table

    def shard_of_hash(self, h: int) -> int:
        """The shard of a 64-bit key hash."""
        shard = self._table[h >> _SHIFT]
        if shard != _MIXED:
            return shard
        i = bisect_left(self._points, h)
        return self._owners[i % len(self._owners)]

    def shard_of(self, key: object) -> int:
        """The shard of ``key``; ``TypeError`` when ``key`` is not a str, an int or a tuple of them."""
        return self.shard_of_hash(key_hash(key))

    def split(self, result: Mapping[Any, Any]) -> list[dict[Any, Any]]:
        """``result``'s items in one dict per shard (index = shard number; empty dicts included).

        ``TypeError`` naming the first key that is not a str, an int or a tuple of them, before
        anything is returned. This is the per-key hot path of keyed folds: str keys are hashed inline.
        """
        parts: list[dict[Any, Any]] = [{} for _ in range(self.shards)]
        table, points, owners, n = self._table, self._points, self._owners, len(self._points)
        hash_ = _hash
        for key, value in result.items():
            if type(key) is str:
                h = hash_(key.encode("utf-8", "surrogatepass"), STR_SEED)
            else:
                h = key_hash(key)
            shard = table[h >> _SHIFT]
            if shard == _MIXED:
                shard = owners[bisect_left(points, h) % n]
            parts[shard][key] = value
        return parts

    def split_lists(self, result: Mapping[Any, Any]) -> tuple[list[list[Any]], list[list[Any]]]:
        """``result``'s keys and values in one list each per shard (index = shard number), without
        a dict per shard; ``TypeError`` naming the first bad key, as :meth:`split`."""
        key_lists: list[list[Any]] = [[] for _ in range(self.shards)]
        value_lists: list[list[Any]] = [[] for _ in range(self.shards)]
        shard_of_hash = self.shard_of_hash
        for key, value in result.items():
            shard = shard_of_hash(key_hash(key))
            key_lists[shard].append(key)
            value_lists[shard].append(value)
        return key_lists, value_lists

    def split_encoded(self, result: Mapping[Any, Any]) -> tuple[list[list[bytes]], list[list[Any]]] | None:
        """When every key of ``result`` is a str without a newline: its keys, UTF-8
        (``surrogatepass``) encoded, and its values in one list each per shard (index = shard
        number); else None.

        One pass reads the key objects (a join); the hashing and the placing then run on the
        joined bytes, which lie in order in memory: with many keys, each pass over scattered key
        objects would cost a cache miss per key.
        """
        try:
            joined = "\n".join(result)
        except TypeError:
            return None  # a key that is not a str
        if joined.count("\n") != len(result) - 1:
            return None  # a key holds a newline
        pieces = joined.encode("utf-8", "surrogatepass").split(b"\n")
        del joined
        # The hashes are not kept (a list of big ints): a key in a range of several shards is
        # hashed again.
        hashes = map(_hash, pieces, repeat(STR_SEED))
        shards = list(map(self._table.__getitem__, map(rshift, hashes, repeat(_SHIFT))))
        points, owners, n = self._points, self._owners, len(self._points)
        i = -1
        with contextlib.suppress(ValueError):  # the end of the ranges holding several shards
            while True:
                i = shards.index(_MIXED, i + 1)
                shards[i] = owners[bisect_left(points, _hash(pieces[i], STR_SEED)) % n]
        key_lists: list[list[bytes]] = [[] for _ in range(self.shards)]
        value_lists: list[list[Any]] = [[] for _ in range(self.shards)]
        add_key = [part.append for part in key_lists]
        add_value = [part.append for part in value_lists]
        for key, value, shard in zip(pieces, result.values(), shards, strict=True):
            add_key[shard](key)
            add_value[shard](value)
        return key_lists, value_lists

    def __reduce__(self) -> tuple[object, tuple[int, int]]:
        return (ring, (self.shards, self.vnodes))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (self.shards, self.vnodes) == (other.shards, other.vnodes)

    def __hash__(self) -> int:
        return hash((self.shards, self.vnodes))

    def __repr__(self) -> str:
        return f"Ring(shards={self.shards}, vnodes={self.vnodes})"


@functools.lru_cache(maxsize=16)
def ring(shards: int, vnodes: int = DEFAULT_VNODES) -> Ring:
    """The ring of ``shards`` shards with ``vnodes`` points each, built once per process."""
    return Ring(shards, vnodes=vnodes)
