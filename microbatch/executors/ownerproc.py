"""A shard owner's process: holds some shards of keyed counts and folds batch parts as told.

Started by :class:`microbatch.executors.owners.Owners` as
``python .../microbatch/executors/ownerproc.py PARENT_PID SOCKET_PATH`` (the file, not ``-m``: the
package's ``__init__`` files and anyio stay out of the owner). It listens on the Unix socket
``SOCKET_PATH`` (in a folder of mode 0700) and serves workers' parts and the pipeline's control
connection (frames in :mod:`microbatch.executors.ownerwire`) with one thread and a selector.

Like a worker it dies with the pipeline (``PR_SET_PDEATHSIG`` plus a thread watching the parent,
the worker's own code) and ignores SIGINT and SIGTERM (the pipeline decides when it stops). It
exits when its control connection closes.

The state is one dict of key -> int per shard it holds. A part folds with C-level operations
only: ``d.update(zip(keys, map(add, map(d.get, keys, repeat(0)), values)))``.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
from array import array
from itertools import repeat
from operator import add
from typing import Any


def _sibling(name: str) -> Any:
    """``NAME.py`` beside this file, loaded outside the package (an owner started as a script need
    not import the package's ``__init__`` files and anyio): as ``_microbatch_NAME``, so that its own
    relative imports fail and it takes its script fallback."""
    import importlib.util

    full = f"_microbatch_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


try:
    from . import ownerwire as wire
    from .worker import _die_with_parent
except ImportError:  # run as a script: there is no package around this file
    wire = _sibling("ownerwire")
    _die_with_parent = _sibling("worker")._die_with_parent

__all__ = ["Owner", "main"]

_READ = 1 << 20


class _Connection:
    __slots__ = ("sock", "buf", "control")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.control = False


class Owner:
    """The owner's loop: accept connections, keep parts, fold FOLDs in order, answer questions."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.parts: dict[int, bytes] = {}
        self.requests: collections.deque[tuple[int, bytes]] = collections.deque()
        self.shards: dict[int, dict[Any, int]] = {}
        self.control: socket.socket | None = None
        self.folded = 0

    def serve(self) -> None:
        """Serve until the control connection closes."""
        while True:
            for key, _ in self.selector.select():
                if key.data is None:
                    sock, _addr = self.listener.accept()
                    self.selector.register(sock, selectors.EVENT_READ, _Connection(sock))
                elif not self._read(key.data):
                    return
            self._answer()

    def _read(self, conn: _Connection) -> bool:
        """Take what ``conn`` sent; False once the control connection is gone."""
        try:
            data = conn.sock.recv(_READ)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(conn.sock)
            conn.sock.close()
            # A worker's connection may end inside a frame (the worker was killed): that part is
            # never named by a FOLD, so it is simply dropped with the buffer.
            return not conn.control
        buf = conn.buf
        buf += data
        size, start, end = wire.HEADER.size, 0, len(buf)
        while end - start >= size:
            kind, ident, length = wire.HEADER.unpack_from(buf, start)
            if end - start - size < length:
                break
            payload = bytes(buf[start + size : start + size + length])
            start += size + length
            if kind == wire.PART:
                self.parts[ident] = payload
            elif kind == wire.CONTROL:
                conn.control = True
                self.control = conn.sock
            else:
                self.requests.append((kind, payload))
        del buf[:start]
        return True

    def _answer(self) -> None:
        """Do the requests in order, as far as the parts they name have arrived."""
        requests, parts = self.requests, self.parts
        while requests:
            kind, payload = requests[0]
            if kind == wire.FOLD:
                ids = array("Q")
                ids.frombytes(payload)
                if not all(i in parts for i in ids):
                    return  # a part still on its way: wait for more data
                try:
                    for i in ids:
                        self._fold(parts.pop(i))
                except Exception as exc:  # pragma: no cover - workers check partials first
                    self._reply(wire.FAILED, f"{type(exc).__name__}: {exc}".encode())
                    raise
                self.folded += 1
            elif kind == wire.GET:
                key = wire.unpack(payload)
                for shard in self.shards.values():
                    if key in shard:
                        self._reply(wire.VALUE, wire.pack((True, shard[key])))
                        break
                else:
                    self._reply(wire.VALUE, wire.pack((False, None)))
            elif kind == wire.COUNT:
                self._reply(wire.VALUE, wire.pack(sum(map(len, self.shards.values()))))
            elif kind == wire.DUMP:
                self._reply(wire.VALUE, wire.pack(self.shards))
            requests.popleft()

    def _fold(self, payload: bytes) -> None:
        for shard, items in wire.unpack(payload).items():
            state = self.shards.get(shard)
            if state is None:
                state = self.shards[shard] = {}
            keys = items.keys()
            state.update(zip(keys, map(add, map(state.get, keys, repeat(0)), items.values()), strict=False))

    def _reply(self, kind: int, payload: bytes) -> None:
        assert self.control is not None
        self.control.sendall(wire.frame(kind, 0, payload))


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent, path = int(argv[1]), argv[2]
    _die_with_parent(parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wire.BUFFER)
    listener.bind(path)
    listener.listen(256)
    Owner(listener).serve()


if __name__ == "__main__":
    main(sys.argv)
