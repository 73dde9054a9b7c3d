"""Keys of keyed state: what a key may be, its canonical bytes, its JSON form and its stable hash.

A key is a ``str``, an ``int`` (not a ``bool``), or a ``tuple`` of keys (nested tuples allowed).
Anything else (floats, ``None``, lists, bytes) is refused: a float key would make ``1`` and
``1.0`` one key in memory but two in a file, and a list cannot be hashed.

**Canonical bytes** (the input of the hash, the same in every process and every Python version):

- a ``str``: ``b"s"``, the length of its UTF-8 bytes as an unsigned LEB128 varint, then the bytes
  (lone surrogates, as ``surrogateescape`` decoding produces, are written with ``surrogatepass``);
- an ``int``: ``b"i"``, the length as a varint, then the shortest big-endian two's complement bytes
  (``0`` is one zero byte);
- a ``tuple``: ``b"t"``, the number of items as a varint, then each item's canonical bytes.

Every form says its own length, so the encoding is injective: two keys have the same bytes only
when they are equal.

The **hash** of a key is an int in ``[0, 2**64)`` that, unlike Python's ``hash()``, does not change
with ``PYTHONHASHSEED`` or between processes: XXH3-64 with a seed per kind of key, of

- a ``str``: its UTF-8 bytes (``surrogatepass``), seed ``0x73`` (``"s"``);
- an ``int``: its shortest big-endian two's complement bytes, seed ``0x69`` (``"i"``);
- a ``tuple``: its canonical bytes, seed ``0x74`` (``"t"``).

(A ``str`` or an ``int`` is hashed without its tag and length, which would only add a copy: the
seed already tells the kinds apart. This is the step every record of a keyed fold goes through.)

**JSON form** (how checkpoints write a key): a ``str`` stays a JSON string, an ``int`` a JSON
integer, a ``tuple`` becomes a JSON array of the JSON forms of its items. Since lists are not keys,
reading an array back as a tuple is exact.
"""

from __future__ import annotations

from typing import TypeAlias

import xxhash

__all__ = [
    "INT_SEED", "STR_SEED", "TUPLE_SEED",
    "Key", "bad_key", "is_key", "key_bytes", "key_from_json", "key_hash", "key_to_json",
]

#: A key of keyed state: str, int, or a tuple of keys.
Key: TypeAlias = "str | int | tuple[Key, ...]"

_hash = xxhash.xxh3_64_intdigest


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _put(key: object, out: bytearray) -> None:
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
        out += b"s"
        out += _varint(len(data))
        out += data
    elif isinstance(key, int) and not isinstance(key, bool):
        data = int(key).to_bytes(key.bit_length() // 8 + 1, "big", signed=True)
        out += b"i"
        out += _varint(len(data))
        out += data
    elif isinstance(key, tuple):
        out += b"t"
        out += _varint(len(key))
        for item in key:
            _put(item, out)
    else:
        raise TypeError(bad_key(key))


def key_bytes(key: object) -> bytes:
    """The canonical bytes of ``key``; ``TypeError`` (saying which part is wrong) for a non-key."""
    out = bytearray()
    try:
        _put(key, out)
    except TypeError:
        raise TypeError(bad_key(key)) from None
    return bytes(out)


STR_SEED = 0x73
INT_SEED = 0x69
TUPLE_SEED = 0x74


def key_hash(key: object) -> int:
    """The stable 64-bit hash of ``key``; ``TypeError`` for a non-key."""
    if isinstance(key, str):
        return _hash(key.encode("utf-8", "surrogatepass"), STR_SEED)
    if isinstance(key, int) and not isinstance(key, bool):
        return _hash(int(key).to_bytes(key.bit_length() // 8 + 1, "big", signed=True), INT_SEED)
    if isinstance(key, tuple):
        return _hash(key_bytes(key), TUPLE_SEED)
    raise TypeError(bad_key(key))


def bad_key(key: object) -> str:
    """Why ``key`` is not a key, as a sentence naming the offending part (for error messages)."""
    if isinstance(key, tuple):
        for item in key:
            if not is_key(item):
                return f"the tuple {key!r:.100} holds {bad_key(item)}"
        return f"{key!r:.100} is a valid key"
    what = "a bool" if isinstance(key, bool) else f"of type {type(key).__qualname__}"
    return f"the key {key!r:.100} is {what}, and keys are str, int (not bool) or tuples of them"


def is_key(key: object) -> bool:
    """Whether ``key`` is a str, an int (not a bool) or a tuple of keys."""
    if isinstance(key, (str, tuple)) or (isinstance(key, int) and not isinstance(key, bool)):
        return not isinstance(key, tuple) or all(is_key(item) for item in key)
    return False


def key_to_json(key: object) -> object:
    """The JSON form of ``key``: str and int as they are, tuples as lists."""
    if isinstance(key, tuple):
        return [key_to_json(item) for item in key]
    return key


def key_from_json(data: object) -> Key:
    """The key whose JSON form is ``data``; ``ValueError`` for data no key turns into."""
    if isinstance(data, str) or (isinstance(data, int) and not isinstance(data, bool)):
        return data
    if isinstance(data, list):
        return tuple(key_from_json(item) for item in data)
    raise ValueError(f"{data!r:.100} is not the JSON form of a key (a string, an integer or an array)")
