"""A shard owner's process: holds some shards of keyed counts and folds batch parts as told.

Started by :class:`microbatch.executors.owners.Owners` as
``python .../microbatch/executors/ownerproc.py PARENT_PID SOCKET_PATH INDEX KEEP`` (the file, not
``-m``: the package's ``__init__`` files and anyio stay out of the owner). It listens on the Unix
socket ``SOCKET_PATH`` (in a folder of mode 0700, where workers write its part files too) and
serves the pipeline's control connection (frames in :mod:`microbatch._core.ownerwire`).
``KEEP`` 1: part files stay after they are folded (the pipeline removes them once a checkpoint
covers them); 0: each is removed once folded.

Like a worker it dies with the pipeline (``PR_SET_PDEATHSIG`` plus a thread watching the parent,
the worker's own code) and ignores SIGINT and SIGTERM (the pipeline decides when it stops). It
exits when its control connection closes.

The state is one dict of key -> int per shard it holds. A part (see
:func:`microbatch._core.ownerwire.unpack_part`) folds with C-level operations only:
``d.update(zip(keys, map(add, map(d.get, keys, repeat(0)), values)))``, or ``dict(zip(keys, values))``
for a shard still empty.
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

from microbatch._core import ownerwire as wire  # the core: no anyio, nor the executors' imports


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
    from .worker import _die_with_parent
except ImportError:  # run as a script: there is no package around this file
    _die_with_parent = _sibling("worker")._die_with_parent

__all__ = ["Owner", "ShardState", "main"]

_READ = 1 << 20


class _Connection:
    __slots__ = ("sock", "buf", "control")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.control = False


class ShardState:
    """An owner's shards of keyed ints: folds parts, writes and loads shard files, gives its state.

    The one state of both kinds of owner: an owner process (:class:`Owner`) and a Dask actor
    (:mod:`microbatch.executors.dask_owners`).
    """

    def __init__(self) -> None:
        self.shards: dict[int, dict[Any, int]] = {}
        # Checkpoints: per shard, the keys changed since the last barrier; shards to write whole
        # (every shard until a barrier or a load gave it files); the shard files' writer.
        self.changed: dict[int, set[Any]] = {}
        self.whole: set[int] | None = None  # None: every shard
        # Shards most of whose keys changed before the last barrier: written whole again once
        # folded into, without a set of their changed keys (its inserts would cost more than the
        # write); the keys folded into each since, and the shards that crossed half this time.
        self.hot: dict[int, int] = {}
        self.crossed: set[int] = set()
        self.files: Any = None

    def take_pieces(self) -> list[bytes]:
        """The whole state as part bytes (one piece per shard), each shard freed once packed."""
        shards = self.shards
        pieces = []
        for shard in sorted(shards):
            items = shards.pop(shard)
            pieces.append(wire.pack_part({shard: (items.keys(), items.values())}))
        return pieces

    def fold_part(self, payload: bytes) -> None:
        """Fold one part (:func:`microbatch._core.ownerwire.pack_part` bytes) into the shards."""
        for shard, keys, values in wire.unpack_part(payload):
            state = self.shards.get(shard)
            if not state:
                state = self.shards[shard] = dict(zip(keys, values, strict=True))  # adopted
            else:
                state.update(zip(keys, map(add, map(state.get, keys, repeat(0)), values), strict=True))
            whole = self.whole
            if whole is None:
                continue
            folded = self.hot.get(shard)
            if folded is not None:
                self.hot[shard] = folded + len(keys)
                whole.add(shard)
            if shard in whole:
                continue
            changed = self.changed.get(shard)
            if changed is None:
                changed = self.changed[shard] = set()
            changed.update(keys)
            if len(changed) > 64 and 2 * len(changed) > len(state):
                whole.add(shard)  # most of the shard changed: write it whole, forget the keys
                self.crossed.add(shard)
                del self.changed[shard]

    # --- checkpoints ----------------------------------------------------------------------------

    def _writer(self, folder: str) -> Any:
        if self.files is None:
            from microbatch.checkpoints.shards import ShardFiles

            self.files = ShardFiles(folder, binary=True)
        return self.files

    def write_barrier(self, seq: int, folder: str, own: list[int], shards: int) -> dict[int, Any]:
        """Write this owner's shards' changes at batch ``seq``; their manifest entries."""
        from microbatch._core.keys import key_to_json

        files = self._writer(folder)
        if files.needs_base():  # the folder or files of the last manifest are gone
            self.whole = None
        whole = self.whole
        documents = []
        for shard in own:
            items = self.shards.get(shard, {})
            if whole is None or shard in whole:
                kind, names = "base", items
            elif shard in self.changed:
                changed = self.changed[shard]
                kind, names = "delta", dict(zip(changed, map(items.__getitem__, changed), strict=True))
            else:
                continue
            keys = list(names)
            if tuple in set(map(type, keys)):  # tuple keys in their JSON form; others as they are
                keys = [key_to_json(key) if type(key) is tuple else key for key in keys]
            documents.append({
                "format": "microbatch.keyed/1", "shard": shard, "shards": shards, "kind": kind,
                "count": len(items), "keys": keys, "states": list(names.values()),
            })
        manifest = files.write(seq, documents, shards=shards)  # CheckpointWriteError: changes kept
        # Hot until a period folds fewer keys into the shard than half of it holds.
        hot = [s for s, folded in self.hot.items() if 2 * folded > len(self.shards.get(s, ()))]
        self.hot = dict.fromkeys([*self.crossed, *hot], 0)
        self.whole, self.changed, self.crossed = set(), {}, set()
        return {shard: manifest["entries"][shard] for shard in own}

    def load_shards(self, folder: str, manifest: Any, own: list[int], shards: int) -> int:
        """Load this owner's shards from the files ``manifest`` names; the keys loaded."""
        from microbatch._core.keys import key_from_json
        from microbatch._core.ring import ring

        files = self._writer(folder)
        mine = set(own)
        if manifest["shards"] == shards:
            # Only this owner's shards' files; it continues their deltas.
            entries = [
                entry if entry["shard"] in mine else {**entry, "count": 0, "base": None, "deltas": []}
                for entry in manifest["entries"]
            ]
            manifest = {**manifest, "entries": entries}
            for doc in files.read(manifest):
                self._load_document(doc, key_from_json, None)
            files.adopt(manifest)
            self.whole = {e["shard"] for e in entries if e["shard"] in mine and e["base"] is None}
        else:
            # Another shard count: every file, the keys placed again; every shard written whole.
            place = ring(shards)
            for doc in files.read(manifest):
                self._load_document(doc, key_from_json, (place, mine))
            files.adopt(None)
            self.whole = None
        self.changed, self.hot, self.crossed = {}, {}, set()
        return sum(map(len, self.shards.values()))

    def _load_document(self, doc: Any, key_from_json: Any, placing: Any) -> None:
        for key_data, state in zip(doc["keys"], doc["states"], strict=True):
            if type(state) is not int:
                raise ValueError(
                    f"shard {doc['shard']}: the state {state!r:.100} is not an int (shard owners hold "
                    f"int counts and sums; resume with ByKey(owners=0))"
                )
            key = key_from_json(key_data) if type(key_data) is list else key_data
            if placing is None:
                shard = doc["shard"]
            else:
                shard = placing[0].shard_of(key)
                if shard not in placing[1]:
                    continue
            target = self.shards.get(shard)
            if target is None:
                target = self.shards[shard] = {}
            target[key] = state


class Owner(ShardState):
    """The owner's loop: accept connections, keep parts, fold FOLDs in order, answer questions."""

    def __init__(self, listener: socket.socket, folder: str, index: int, keep: bool) -> None:
        super().__init__()
        self.listener = listener
        self.folder, self.index, self.keep = folder, index, keep
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.requests: collections.deque[tuple[int, bytes]] = collections.deque()
        self.control: socket.socket | None = None
        self.folded = 0
        self.taken = False  # TAKE answered: the state is gone, the owner exits

    def serve(self) -> None:
        """Serve until the control connection closes."""
        while not self.taken:
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
            return not conn.control
        buf = conn.buf
        buf += data
        size, start, end = wire.HEADER.size, 0, len(buf)
        while end - start >= size:
            kind, _, length = wire.HEADER.unpack_from(buf, start)
            if end - start - size < length:
                break
            payload = bytes(buf[start + size : start + size + length])
            start += size + length
            if kind == wire.CONTROL:
                conn.control = True
                self.control = conn.sock
            else:
                self.requests.append((kind, payload))
        del buf[:start]
        return True

    def _answer(self) -> None:
        """Do the requests in order, as far as the parts they name have arrived."""
        requests = self.requests
        while requests:
            kind, payload = requests[0]
            if kind == wire.FOLD:
                ids = array("Q")
                ids.frombytes(payload)
                for i in ids:
                    path = wire.part_path(self.folder, self.index, i)
                    self.fold_part(wire.read_part(path))  # an error ends the owner (see ownerwire)
                    if not self.keep:
                        os.unlink(path)
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
            elif kind == wire.TAKE:
                self._take()
                return
            elif kind in (wire.BARRIER, wire.LOAD):
                answer: Any
                try:
                    if kind == wire.BARRIER:
                        answer = self.write_barrier(*wire.unpack(payload))
                    else:
                        answer = self.load_shards(*wire.unpack_json(payload))
                except Exception as exc:
                    self._reply(wire.FAILED, f"{type(exc).__name__}: {exc}".encode())
                else:
                    self._reply(wire.VALUE, wire.pack(answer))
            requests.popleft()

    def _take(self) -> None:
        """Send the whole state as part bytes, shard by shard; then exit."""
        assert self.control is not None
        wire.send_frame(self.control, wire.VALUE, self.take_pieces())
        self.taken = True

    def _reply(self, kind: int, payload: bytes) -> None:
        assert self.control is not None
        self.control.sendall(wire.frame(kind, 0, payload))


def main(argv: list[str]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent, path, index, keep = int(argv[1]), argv[2], int(argv[3]), argv[4] == "1"
    _die_with_parent(parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(256)
    Owner(listener, os.path.dirname(path), index, keep).serve()


if __name__ == "__main__":
    main(sys.argv)
