"""The binary shard file: one shard document of keyed state in msgpack, with a checksum.

A shard document (``{"shard", "shards", "kind", "count", "keys", "states"}``, see
:mod:`microbatch.aggregate.bykey`) is written by shard owners in this form rather than as JSON:
it is about half the size, and it is packed and unpacked in C. Layout (little-endian)::

    offset  size  field
    0       4     magic  b"MBKS"
    4       1     version (1)
    5       1     kind: 0 base, 1 delta
    6       4     shard number
    10      4     shard count of the ring
    14      8     count: keys the shard holds in all (a delta names only those that changed)
    22      8     entries: keys in this file
    30      n     body: msgpack array [keys, states], two arrays of ``entries`` items
    30 + n  8     XXH3-64 of bytes 0 .. 30 + n

Keys are msgpack str (lone surrogates kept, as ``surrogatepass`` UTF-8), int or array (a tuple
key); an int beyond 64 bits is an extension of type 1 holding its decimal digits. States are the
inner aggregator's ``dump`` (JSON-like values). Decoded keys are in their JSON form (a tuple
key as a list), as in JSON shard files. Nothing here is pickle: a file from elsewhere can
be refused, never executed.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import xxhash

from .._exceptions import CheckpointCorrupt

__all__ = ["MAGIC", "decode_document", "encode_document"]

MAGIC = b"MBKS"
VERSION = 1
_HEAD = struct.Struct("<4sBBIIQQ")
_SUM = struct.Struct("<Q")
_KINDS = ("base", "delta")
_BIG_INT = 1
#: The ``format`` of the shard documents decoded (as in :mod:`microbatch.aggregate.bykey`).
DOCUMENT_FORMAT = "microbatch.keyed/1"


def _default(obj: object) -> msgpack.ExtType:
    if type(obj) is int:
        return msgpack.ExtType(_BIG_INT, str(obj).encode("ascii"))
    raise TypeError(f"cannot write a value of type {type(obj).__qualname__} in a shard file: {obj!r:.100}")


def _ext_hook(code: int, data: bytes) -> object:
    if code == _BIG_INT:
        return int(data.decode("ascii"))
    raise ValueError(f"unknown extension type {code}")


def encode_document(doc: dict[str, Any]) -> bytes:
    """The bytes of the shard file holding ``doc``; ``TypeError`` for a value msgpack cannot hold."""
    keys, states = doc["keys"], doc["states"]
    head = _HEAD.pack(
        MAGIC, VERSION, _KINDS.index(doc["kind"]), doc["shard"], doc["shards"], doc["count"], len(keys)
    )
    body = msgpack.packb([keys, states], default=_default, unicode_errors="surrogatepass")
    data: bytes = head + body
    return data + _SUM.pack(xxhash.xxh3_64_intdigest(data))


def decode_document(data: bytes, where: str) -> dict[str, Any]:
    """The shard document in ``data``; ``CheckpointCorrupt`` naming ``where`` and the byte offset
    when it is not a shard file of this version, is cut short or fails its checksum."""
    if len(data) < _HEAD.size + _SUM.size:
        raise CheckpointCorrupt(f"{where}: {len(data)} bytes, too short for a shard file")
    magic, version, kind, shard, shards, count, entries = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointCorrupt(f"{where}: not a shard file (bytes 0-3 are {magic!r}, not {MAGIC!r})")
    if version != VERSION:
        raise CheckpointCorrupt(f"{where}: shard file version {version} at byte 4; this reads {VERSION}")
    end = len(data) - _SUM.size
    (expected,) = _SUM.unpack_from(data, end)
    actual = xxhash.xxh3_64_intdigest(memoryview(data)[:end])
    if actual != expected:
        raise CheckpointCorrupt(
            f"{where}: checksum {actual:016x} of bytes 0-{end - 1} does not match {expected:016x} "
            f"stored at byte {end}"
        )
    if kind >= len(_KINDS) or shards < 1 or shard >= shards or (entries > count and kind == 0):
        raise CheckpointCorrupt(
            f"{where}: bad header (kind {kind}, shard {shard} of {shards}, {entries} of {count} keys)"
        )
    try:
        keys, states = msgpack.unpackb(
            memoryview(data)[_HEAD.size : end], ext_hook=_ext_hook, unicode_errors="surrogatepass",
            strict_map_key=False,
        )
        if len(keys) != entries or len(states) != entries:
            raise ValueError(f"{len(keys)} keys and {len(states)} states, the header says {entries}")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointCorrupt(f"{where}: body at byte {_HEAD.size} cannot be read: {exc}") from None
    return {
        "format": DOCUMENT_FORMAT, "shard": shard, "shards": shards, "kind": _KINDS[kind], "count": count,
        "keys": keys, "states": states,
    }
