"""The frames shard owners, workers and the pipeline exchange over Unix sockets.

Workers hand owners their parts as files: a worker writes owner ``k``'s part of a batch result to
``FOLDER/p{k}-{id:016x}`` (``id``: 64 random bits), whole before its receipt returns. A part is one
block per shard (:func:`pack_part`), each a 13-byte header ``<BIII`` (kind, shard, keys, bytes) and
its bytes:

- kind 0 (str keys without a newline, int64 partials: the common case, decoded with no per-key
  step in Python): the keys, UTF-8 (``surrogatepass``), joined by ``\n``, then the partials as
  little-endian int64s (``8 * keys`` bytes, after the header's byte count);
- kind 1 (any other keys or ints): msgpack ``{key: partial}``.

The pipeline talks to each owner over one Unix socket connection, in
frames: a 13-byte header ``<BQI`` (kind, id, payload length) and the payload.

    pipeline -> owner   CONTROL  opens the control connection (one per owner); on it, in order:
                        FOLD     payload: the part ids (little-endian u64 each) of one batch, to be
                                 folded now, in this order, once each
                        GET      payload: msgpack key                     -> VALUE [found, value]
                        COUNT    keys held                                -> VALUE int
                        DUMP     every key the owner holds                -> VALUE {shard: {key: value}}
                        TAKE     every key the owner holds, as part bytes (:func:`pack_part`), its
                                 last answer: it then exits             -> VALUE part bytes
                        LOAD     msgpack [folder, manifest, own shards, shard count]: load those
                                 shards from the shard files the manifest names -> VALUE keys loaded
                        BARRIER  msgpack [seq, folder, own shards, shard count]: write the changes of
                                 those shards since the last BARRIER (or LOAD) as shard files at
                                 batch ``seq`` -> VALUE {shard: manifest entry}
    owner -> pipeline   VALUE    the answer to the oldest question not answered yet
                        FAILED   payload: a message (UTF-8); the owner could not fold a batch

An owner folds the FOLDs strictly in the order they came. A part that no FOLD ever names (its
worker crashed before its result reached the pipeline, and the batch ran again elsewhere) is never
folded, which keeps folds exactly-once. A FOLD whose part file is missing or unreadable ends the
owner (with the error on its stderr): the pipeline starts it again or fails the run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
from array import array
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import msgpack

__all__ = ["HEADER", "EncodedKeys", "connect", "pack", "pack_part", "part_blocks", "unpack", "unpack_part"]

HEADER = struct.Struct("<BQI")
BLOCK = struct.Struct("<BIII")


class EncodedKeys(list[bytes]):
    """Keys of a part already UTF-8 (``surrogatepass``) encoded: every one was a str without a
    newline (see :meth:`microbatch._core.ring.Ring.split_encoded`)."""

    __slots__ = ()


TEXT, MSGPACK = 0, 1
_LITTLE = sys.byteorder == "little"

CONTROL = 2
FOLD = 3
GET = 4
COUNT = 5
DUMP = 6
LOAD = 7
BARRIER = 8
TAKE = 9
VALUE = 10
FAILED = 11

#: Socket buffer sizes asked for (the kernel may cap them): a batch's part goes in a few writes.
BUFFER = 1 << 20


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, unicode_errors="surrogatepass")
    return data


def unpack(data: bytes | bytearray | memoryview) -> Any:
    # arrays come back as tuples, so tuple keys stay tuples (hashable, equal to the original)
    return msgpack.unpackb(data, use_list=False, strict_map_key=False, unicode_errors="surrogatepass")


def unpack_json(data: bytes | bytearray | memoryview) -> Any:
    """Like ``unpack``, arrays as lists: for JSON documents (manifests and their entries)."""
    return msgpack.unpackb(data, strict_map_key=False, unicode_errors="surrogatepass")


def pack_part(part: Mapping[int, tuple[Collection[Any], Collection[int]]]) -> bytes:
    """An owner's part of a batch result, ``{shard: (keys, partials)}`` (two collections of equal
    length, such as a dict's keys and values), as part file bytes."""
    pieces: list[bytes] = []
    for shard, (keys, values) in part.items():
        block = _text_block(keys, values)
        if block is None:
            if type(keys) is EncodedKeys:
                keys = [key.decode("utf-8", "surrogatepass") for key in keys]
            data = pack(dict(zip(keys, values, strict=True)))
            pieces += (BLOCK.pack(MSGPACK, shard, len(keys), len(data)), data)
        else:
            text, packed = block
            pieces += (BLOCK.pack(TEXT, shard, len(keys), len(text)), text, packed)
    return b"".join(pieces)


def _text_block(keys: Collection[Any], values: Collection[int]) -> tuple[bytes, bytes] | None:
    """Kind 0 bytes (keys text, int64 values), or None when the keys or values do not fit it."""
    if type(keys) is EncodedKeys:
        text = b"\n".join(keys)
    else:
        if set(map(type, keys)) != {str}:
            return None
        joined = "\n".join(keys)
        if joined.count("\n") != len(keys) - 1:
            return None  # a key holds a newline
        text = joined.encode("utf-8", "surrogatepass")
    try:
        packed = array("q", values)
    except (OverflowError, TypeError):
        return None
    if not _LITTLE:  # pragma: no cover - big-endian machines
        packed.byteswap()
    return text, packed.tobytes()


#: One block of part bytes: kind, shard, keys, and where its keys' bytes start and its bytes end.
Block = tuple[int, int, int, int, int, int]


def part_blocks(data: bytes | bytearray | memoryview) -> Iterator[Block]:
    """The blocks of part bytes, ``(kind, shard, keys, start, length, stop)`` each, checked to fit.

    ``ValueError`` when the bytes are cut short or a block has an unknown kind.
    """
    pos, end, size = 0, len(data), BLOCK.size
    while pos < end:
        if end - pos < size:
            raise ValueError(f"part cut short at byte {pos}: {end - pos} bytes where a block header goes")
        kind, shard, count, length = BLOCK.unpack_from(data, pos)
        if kind not in (TEXT, MSGPACK):
            raise ValueError(f"part block at byte {pos} has an unknown kind {kind}")
        start = pos + size
        stop = start + length + (8 * count if kind == TEXT else 0)
        if stop > end:
            raise ValueError(f"part cut short: the block at byte {pos} needs {stop - end} more bytes")
        yield kind, shard, count, start, length, stop
        pos = stop


def block_items(data: bytes | bytearray | memoryview, block: Block) -> tuple[Any, Any]:
    """A block's keys and partials, two sequences of equal length (``ValueError`` when not)."""
    kind, _shard, count, start, length, stop = block
    view = memoryview(data)
    if kind == MSGPACK:
        items = unpack(view[start:stop])
        return items.keys(), items.values()
    keys = str(view[start : start + length], "utf-8", "surrogatepass").split("\n")
    values = array("q")
    values.frombytes(view[start + length : stop])
    if not _LITTLE:  # pragma: no cover - big-endian machines
        values.byteswap()
    if len(keys) != count:
        raise ValueError(f"part block of shard {_shard}: {len(keys)} keys where {count} were written")
    return keys, values


def unpack_part(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, Any, Any]]:
    """The blocks of part bytes decoded: ``(shard, keys, partials)``, two sequences of equal length.

    ``ValueError`` when the bytes are cut short or a block's lengths do not add up.
    """
    for block in part_blocks(data):
        yield (block[1], *block_items(data, block))


def frame(kind: int, ident: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, ident, len(payload)) + payload


def connect(path: str, *, wait: float, alive: Callable[[], bool] = lambda: True) -> socket.socket:
    """A blocking connection to the owner listening at ``path``, waiting up to ``wait`` seconds for
    it to listen (an owner starts while the workers do) while ``alive()``; the last ``OSError``
    after that."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline or not alive():
                raise
            time.sleep(0.005)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def send_frame(sock: socket.socket, kind: int, pieces: list[bytes]) -> None:
    """Send a frame whose payload is ``pieces`` joined, without joining them (a final state is
    large); each piece is dropped from the list once sent."""
    sock.sendall(HEADER.pack(kind, 0, sum(map(len, pieces))))
    pieces.reverse()
    while pieces:
        sock.sendall(pieces.pop())


def receive_frame(sock: socket.socket) -> tuple[int, int, bytearray]:
    """One frame from a blocking socket; ``ConnectionError`` at end of file."""
    kind, ident, size = HEADER.unpack(_exactly(sock, HEADER.size))
    return kind, ident, _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the shard owner closed its connection")
        got += n
    return buf


def part_id() -> int:
    return int.from_bytes(os.urandom(8), "little")


def part_path(folder: str, owner: int, ident: int) -> str:
    return os.path.join(folder, f"p{owner}-{ident:016x}")


def write_part(path: str, data: bytes) -> None:
    """Write a part file (mode 0600, never over another one), whole before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_part(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove_part(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
