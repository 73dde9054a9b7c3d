"""Shard owners: processes that hold a keyed count's state, fed by workers directly.

With ``ByKey(Count())`` (or ``ByKey(Sum())`` given ``owners=``) on worker processes, a run starts
``owners`` owner processes (:mod:`microbatch.executors.ownerproc`), each holding the ring shards
:func:`microbatch._core.owners.owner_of_shards` gives it. Then:

1. a worker runs ``fn`` on its batch, checks the result (a mapping of key -> int), cuts it by owner
   and shard (each key hashed once) and sends each owner its part, msgpack bytes, over the owner's
   Unix socket (:class:`OwnerRoute`); it returns only a receipt (:class:`OwnedParts`: part ids);
2. the pipeline's fold stage, in batch order, sends each owner a FOLD naming that batch's part ids
   (``Owners.fold``, called by the fold stage): no key crosses the pipeline process, and each
   part is folded once, in order, or never (the part of an attempt whose result never came back);
3. reads ask the owners (``microbatch.pipeline.owned``); when the run ends, the owners' state is
   taken into the pipeline process once, so the value outlives the owners.

Limits: partials must be ints (and >= 0 for ``Count``); another value raises ``TypeError`` in the
worker, naming the key, like any error of ``fn``. Runs with a checkpoint fold keyed state in the
pipeline process (shard owners do not write checkpoints yet). A query (``len``, a key lookup) from
the event loop's thread waits for the owner's answer there; the final value is a plain mapping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from .._core.owners import cut, owner_of_shards
from .._core.ring import ring
from .._exceptions import CheckpointCorrupt, CheckpointWriteError, ExecutorUnavailable, WorkerCrashed
from ..checkpoints.shards import MANIFEST_FORMAT
from . import ownerwire as wire
from .spawn import exit_description

__all__ = ["OwnedParts", "OwnerRoute", "Owners"]

_SCRIPT = os.path.join(os.path.dirname(__file__), "ownerproc.py")
#: Seconds an owner process has to start listening.
START_TIMEOUT = 60.0


class OwnedParts:
    """A worker's receipt for one batch result: ``(owner, part id)`` of each part it sent.

    ``lost`` says why a part could not be sent (an owner is gone): the fold stage raises it when
    the batch's turn comes, rather than the batch failing (and being retried or dead-lettered).
    """

    __slots__ = ("parts", "keys", "lost")

    def __init__(self, parts: tuple[tuple[int, int], ...], keys: int, lost: str | None = None) -> None:
        self.parts = parts
        self.keys = keys
        self.lost = lost

    def __reduce__(self) -> tuple[Any, ...]:
        return (OwnedParts, (self.parts, self.keys, self.lost))

    def __repr__(self) -> str:
        return f"OwnedParts({len(self.parts)} parts, {self.keys} keys)"


_connections: dict[str, socket.socket] = {}


def _connection(path: str) -> socket.socket:
    """This process's connection to the owner at ``path`` (made once, kept)."""
    sock = _connections.get(path)
    if sock is None:
        sock = _connections[path] = wire.connect(path, wait=START_TIMEOUT)
    return sock


class OwnerRoute:
    """Runs in a worker: ``fn``, then each owner's part of the result sent to that owner."""

    def __init__(
        self, fn: Callable[[list[Any]], Any], shards: int, paths: list[str], *, counts: bool
    ) -> None:
        self.fn = fn
        self.shards = shards
        self.paths = paths
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
        owners = len(self.paths)
        parts = cut(result, ring(self.shards), owner_of_shards(self.shards, owners), owners)
        sent = []
        for owner, part in enumerate(parts):
            if part:
                ident = wire.part_id()
                path = self.paths[owner]
                try:
                    _connection(path).sendall(wire.frame(wire.PART, ident, wire.pack(part)))
                except OSError as exc:
                    # Not an error of this batch: the fold stage reports the lost owner, in order.
                    dropped = _connections.pop(path, None)
                    if dropped is not None:
                        dropped.close()
                    return OwnedParts((), len(result), lost=f"shard owner {owner} cannot be reached: {exc}")
                sent.append((owner, ident))
        return OwnedParts(tuple(sent), len(result))


class OwnerFailed(Exception):
    """An owner answered a request with an error (a checkpoint it could not write or load)."""


class Barrier:
    """A checkpoint asked of every owner at batch ``seq``; ``write_shards`` waits for it."""

    def __init__(self, owners: Owners, seq: int) -> None:
        self.owners = owners
        self.seq = seq

    def write_shards(self, seq: int) -> Any:
        """The manifest naming every owner's shard files (blocking: the checkpoint thread's call).

        ``CheckpointWriteError`` when an owner could not write (the previous checkpoint is intact,
        and that owner keeps its changes for the next one).
        """
        owners = self.owners
        entries: list[Any] = [None] * owners.shards
        try:
            answers = owners._every_answer(lists=True)
        finally:
            owners._answers.release()
        errors = [f"shard owner {o}: {a}" for o, a in enumerate(answers) if isinstance(a, OwnerFailed)]
        for answer in answers:
            if not isinstance(answer, OwnerFailed):
                for shard, entry in answer.items():
                    entries[shard] = entry
        if errors:
            raise CheckpointWriteError(f"keyed state at batch {self.seq} not written: {'; '.join(errors)}")
        return {"format": MANIFEST_FORMAT, "seq": self.seq, "shards": owners.shards, "entries": entries}


class Owners:
    """The owner processes of one run (an async context manager) and the pipeline's side of them.

    Leaving the block normally first takes the owners' whole state (:attr:`final`); then the
    control connections close, on which the owners exit; an owner still running after that is
    killed. The socket folder is removed.
    """

    def __init__(self, count: int, shards: int) -> None:
        self.count = count
        self.shards = shards
        self.owner_of = owner_of_shards(shards, count)
        self.folder = ""
        self.paths: list[str] = []
        self.processes: list[anyio.abc.Process] = []
        self.controls: list[socket.socket] = []
        #: Every owner's state, ``{shard: {key: int}}``, taken as the block was left normally.
        self.final: dict[int, dict[Any, int]] | None = None
        self.batches = 0
        # Held from a question's sending to its answer's reading: a barrier's answers are read in
        # the checkpoint thread, and no other reader may take them meanwhile.
        self._answers = threading.Lock()

    async def __aenter__(self) -> Owners:
        """Start the owner processes (without waiting for them: workers and the fold stage connect
        once they listen, within ``START_TIMEOUT`` seconds)."""
        self.folder = tempfile.mkdtemp(prefix="microbatch-owners-")
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            for i in range(self.count):
                path = os.path.join(self.folder, f"owner-{i}.sock")
                self.paths.append(path)
                self.processes.append(await anyio.open_process(
                    [sys.executable, _SCRIPT, str(os.getpid()), path],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, env=env,
                ))
        except BaseException:
            await self._close()
            raise
        return self

    def _control(self, owner: int) -> socket.socket:
        """The control connection to ``owner``, made at its first use."""
        if len(self.controls) <= owner:
            for i in range(len(self.controls), owner + 1):
                process = self.processes[i]
                try:
                    control = wire.connect(self.paths[i], wait=START_TIMEOUT)
                except OSError as exc:
                    raise ExecutorUnavailable(
                        f"shard owner {i} (process {process.pid}) did not listen within {START_TIMEOUT} s "
                        f"({exit_description(process.returncode)}: {exc}); its stderr says why"
                    ) from None
                self.controls.append(control)
                control.sendall(wire.frame(wire.CONTROL, 0))
        return self.controls[owner]

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if exc_info[1] is None:
                self.final = await anyio.to_thread.run_sync(self.take_state)
        finally:
            await self._close()

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            for control in self.controls:
                control.close()
            for process in self.processes:
                with anyio.move_on_after(2.0):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            shutil.rmtree(self.folder, ignore_errors=True)

    # --- the pipeline's side --------------------------------------------------------------------

    def fold(self, receipt: OwnedParts) -> None:
        """Tell each owner with a part of this batch to fold it (in batch order: call in order)."""
        if receipt.lost is not None:
            raise WorkerCrashed(f"{receipt.lost}; its keyed state is lost")
        by_owner: dict[int, array[int]] = {}
        for owner, ident in receipt.parts:
            by_owner.setdefault(owner, array("Q")).append(ident)
        for owner, ids in by_owner.items():
            self._send(owner, wire.frame(wire.FOLD, 0, ids.tobytes()))
        self.batches += 1

    def _send(self, owner: int, data: bytes) -> None:
        try:
            self._control(owner).sendall(data)
        except OSError as exc:
            raise self._lost(owner, exc) from None

    def ask(self, owner: int, kind: int, payload: bytes = b"") -> Any:
        """Ask one owner a question and wait for its answer (after its pending folds)."""
        with self._answers:
            self._send(owner, wire.frame(kind, 0, payload))
            return self._answer(owner)

    def _every_answer(self, *, lists: bool = False) -> list[Any]:
        """Every owner's answer, in owner order; an ``OwnerFailed`` for an owner that failed (its
        answer is read all the same, so the next question gets the next answer)."""
        return [self._answer_or_failure(owner, lists) for owner in range(self.count)]

    def _answer_or_failure(self, owner: int, lists: bool) -> Any:
        try:
            return self._answer(owner, lists=lists)
        except OwnerFailed as exc:
            return exc

    def _answer(self, owner: int, *, lists: bool = False) -> Any:
        try:
            answer, _, data = wire.receive_frame(self.controls[owner])
        except OSError as exc:
            raise self._lost(owner, exc) from None
        if answer == wire.FAILED:
            raise OwnerFailed(data.decode(errors="replace"))
        return wire.unpack_json(data) if lists else wire.unpack(data)

    def _lost(self, owner: int, exc: BaseException) -> WorkerCrashed:
        process = self.processes[owner]
        return WorkerCrashed(
            f"shard owner {owner} (process {process.pid}) is gone ({exit_description(process.returncode)}, "
            f"{type(exc).__name__}: {exc}); its keyed state is lost"
        )

    def own(self, owner: int) -> list[int]:
        """The shards ``owner`` holds."""
        return [shard for shard, o in enumerate(self.owner_of) if o == owner]

    def barrier(self, seq: int, folder: str) -> Barrier:
        """Ask every owner to write its shard files as of now (after the FOLDs sent so far).

        Call it in batch order, as ``fold``; ``Barrier.write_shards`` (in another thread) waits for
        the answers and returns the manifest.
        """
        self._answers.acquire()
        try:
            for owner in range(self.count):
                payload = wire.pack((seq, folder, self.own(owner), self.shards))
                self._send(owner, wire.frame(wire.BARRIER, 0, payload))
        except BaseException:
            self._answers.release()
            raise
        return Barrier(self, seq)

    def load(self, manifest: Any, folder: str) -> int:
        """Each owner loads its shards from the files ``manifest`` names (blocking); keys loaded.

        ``CheckpointCorrupt`` naming the file when an owner finds one damaged or missing.
        """
        loaded = 0
        with self._answers:
            for owner in range(self.count):
                payload = wire.pack((folder, manifest, self.own(owner), self.shards))
                self._send(owner, wire.frame(wire.LOAD, 0, payload))
            answers = self._every_answer()
        for owner, answer in enumerate(answers):
            if isinstance(answer, OwnerFailed):
                raise CheckpointCorrupt(f"shard owner {owner} cannot load its shards: {answer}")
            loaded += answer
        return loaded

    def owner_of_key(self, key: object) -> int:
        return self.owner_of[ring(self.shards).shard_of(key)]

    def take_state(self) -> dict[int, dict[Any, int]]:
        """Every owner's shards (after their pending folds), ``{shard: {key: int}}``."""
        shards: dict[int, dict[Any, int]] = {}
        for owner in range(self.count):
            shards.update(self.ask(owner, wire.DUMP))
        return shards
