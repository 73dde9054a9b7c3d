"""Shard owners: processes that hold a keyed count's state, fed by workers directly.

With ``ByKey(Count())`` (or ``ByKey(Sum())`` given ``owners=``) on worker processes, a run starts
``owners`` owner processes (:mod:`microbatch.executors.ownerproc`), each holding the ring shards
:func:`microbatch._core.owners.owner_of_shards` gives it. Then:

1. a worker runs ``fn`` on its batch, checks the result (a mapping of key -> int), cuts it by owner
   and shard (each key hashed once) and writes each owner's part, msgpack bytes, as a file in the
   run's private folder (in shared memory, ``/dev/shm``, where there is one) (:class:`OwnerRoute`);
   it returns only a receipt (:class:`OwnedParts`: part ids);
2. the pipeline's fold stage, in batch order, sends each owner a FOLD naming that batch's part ids
   (``Owners.fold``): no key crosses the pipeline process, and each part is folded once, in order,
   or never (the part of an attempt whose result never came back);
3. reads ask the owners (``microbatch.pipeline.owned``); when the run ends, each owner in turn
   sends its whole state as part bytes and exits, so the value outlives the owners (decoded
   shard by shard as it is read, never held twice over).

A run with a checkpoint keeps each part file until a checkpoint covers it. An owner that dies is
then started again: it loads its shards from the last checkpoint's files, the FOLDs sent since are
sent again (their part files are still there), and the run goes on exact. Without a checkpoint a
part file is removed once folded, and a lost owner fails the run (``WorkerCrashed``).

Limits: partials must be ints (and >= 0 for ``Count``); another value raises ``TypeError`` in the
worker, naming the key, like any error of ``fn``. A query (``len``, a key lookup) from the event
loop's thread waits for the owner's answer there; the final value is a plain mapping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from array import array
from typing import Any

import anyio

from .._core import ownerwire as wire
from .._core.owners import OwnedParts, owner_of_shards
from .._core.ring import ring
from .._exceptions import CheckpointCorrupt, CheckpointWriteError, WorkerCrashed
from ..checkpoints.shards import MANIFEST_FORMAT
from .ownerprocess import OwnerFailed, OwnerProcess

__all__ = ["Barrier", "Owners", "manifest_of"]

log = logging.getLogger("microbatch")

#: Times one owner is started again after it died, in one run, before the run fails.
MAX_RESTARTS = 5


_PREFIX = "microbatch-owners-"


def remove_stale_folders(parent: str) -> list[str]:
    """Remove the owners' folders in ``parent`` whose pipeline process is gone (killed with
    SIGKILL, it could not remove its own, which in /dev/shm would hold memory); their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            pid = name[len(_PREFIX) :].split("-", 1)[0]
            if not name.startswith(_PREFIX) or not pid.isdigit() or _alive(int(pid)):
                continue
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def manifest_of(answers: list[Any], seq: int, shards: int) -> Any:
    """The manifest of a checkpoint at batch ``seq`` from every owner's ``{shard: entry}``."""
    entries: list[Any] = [None] * shards
    for answer in answers:
        for shard, entry in answer.items():
            entries[shard] = entry
    return {"format": MANIFEST_FORMAT, "seq": seq, "shards": shards, "entries": entries}


class Barrier:
    """A checkpoint asked of every owner at batch ``seq``; ``write_shards`` waits for it."""

    def __init__(self, owners: Owners, seq: int, folder: str) -> None:
        self.owners = owners
        self.seq = seq
        self.folder = folder
        self.folds = owners.batches  # fold() calls when the checkpoint was taken

    def write_shards(self, seq: int) -> Any:
        """The manifest naming every owner's shard files (blocking: the checkpoint thread's call).

        An owner that died meanwhile is started again and asked again. ``CheckpointWriteError``
        when an owner could not write (the previous checkpoint is intact, and every owner keeps
        its changes and its part files for the next one).
        """
        owners = self.owners
        with owners.lock:
            if owners.batches != self.folds:
                # The owners' state is no longer the one at batch ``seq``: a caller folded between
                # taking the checkpoint and writing it, which the fold stage never does.
                raise CheckpointWriteError(
                    f"keyed state at batch {self.seq} not written: {owners.batches - self.folds} results "
                    f"were folded after the checkpoint was taken"
                )
            for owner in range(owners.count):
                owners.deliver(owner, self.frame(owner))
            answers = [owners.barrier_answer(owner, self) for owner in range(owners.count)]
        errors = [f"shard owner {o}: {a}" for o, a in enumerate(answers) if isinstance(a, OwnerFailed)]
        if errors:
            raise CheckpointWriteError(f"keyed state at batch {self.seq} not written: {'; '.join(errors)}")
        manifest = manifest_of(answers, self.seq, owners.shards)
        owners.covered(manifest, self.folder)
        return manifest

    def frame(self, owner: int) -> bytes:
        payload = wire.pack((self.seq, self.folder, self.owners.own(owner), self.owners.shards))
        return wire.frame(wire.BARRIER, 0, payload)


class Owners:
    """The owner processes of one run (an async context manager) and the pipeline's side of them.

    ``keep_parts``: the run writes checkpoints; part files are kept until one covers them, and a
    dead owner is started again. Leaving the block normally first takes the owners' whole state
    (:attr:`final`); then the control connections close, on which the owners exit; an owner still
    running after that is killed. The folder of sockets and parts is removed.
    """

    def __init__(self, count: int, shards: int, *, keep_parts: bool) -> None:
        self.count = count
        self.shards = shards
        self.keep_parts = keep_parts
        self.owner_of = owner_of_shards(shards, count)
        self.folder = ""
        self.processes: list[OwnerProcess] = []
        self._dead: list[OwnerProcess] = []
        self.restarts = [0] * count
        #: Every owner's state as part bytes (``ownerwire.pack_part``), one per owner, taken as the
        #: block was left normally.
        self.final: list[bytearray] | None = None
        self.batches = 0  # fold() calls (a batch split apart to isolate failures makes several)
        # The last manifest written (or loaded) and its folder; per owner, the part ids of the
        # FOLDs sent since: what a restarted owner loads and is sent again.
        self.manifest: Any = None
        self.manifest_folder = ""
        self.since: list[list[array[int]]] = [[] for _ in range(count)]
        #: Held from a question's sending to its answer's reading: a barrier's answers are read in
        #: the checkpoint thread, and no other reader may take them meanwhile.
        self.lock = threading.Lock()

    async def __aenter__(self) -> Owners:
        """Start the owner processes (without waiting: the fold stage connects once they listen)."""
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        remove_stale_folders(shm or tempfile.gettempdir())
        self.folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=shm)
        try:
            self.processes = [self._start(i) for i in range(self.count)]
        except BaseException:
            await self._close()
            raise
        return self

    def _start(self, owner: int) -> OwnerProcess:
        return OwnerProcess(owner, self.folder, keep_parts=self.keep_parts)

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if exc_info[1] is None:
                self.final = await anyio.to_thread.run_sync(self.take_final)
        finally:
            await self._close()

    async def _close(self) -> None:
        def close() -> None:
            for process in [*self.processes, *self._dead]:
                process.stop()
            shutil.rmtree(self.folder, ignore_errors=True)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close)

    def own(self, owner: int) -> list[int]:
        """The shards ``owner`` holds."""
        return [shard for shard, o in enumerate(self.owner_of) if o == owner]

    def owner_of_key(self, key: object) -> int:
        return self.owner_of[ring(self.shards).shard_of(key)]

    # --- requests, and an owner started again ---------------------------------------------------

    def fold(self, receipt: OwnedParts) -> None:
        """Tell each owner with a part of this batch to fold it (in batch order: call in order)."""
        by_owner: dict[int, array[int]] = {}
        for owner, ident in receipt.parts:
            by_owner.setdefault(owner, array("Q")).append(ident)
        for owner, ids in by_owner.items():
            self.deliver(owner, wire.frame(wire.FOLD, 0, ids.tobytes()))
            if self.keep_parts:
                self.since[owner].append(ids)
        self.batches += 1

    def deliver(self, owner: int, data: bytes) -> None:
        """Send ``data`` to ``owner``, starting it again first if it died."""
        try:
            self.processes[owner].send(data)
        except OSError as exc:
            self._restart(owner, exc)
            self.processes[owner].send(data)

    def ask(self, owner: int, kind: int, payload: bytes = b"", *, lists: bool = False) -> Any:
        """Ask one owner a question and wait for its answer (after its pending folds)."""
        with self.lock:
            return self.request(owner, wire.frame(kind, 0, payload), lists=lists)

    def request(self, owner: int, data: bytes, *, lists: bool = False, raw: bool = False) -> Any:
        """Send a question and read its answer, asking a restarted owner again; hold ``lock``."""
        try:
            self.processes[owner].send(data)
            return self.processes[owner].answer(lists=lists, raw=raw)
        except (OSError, EOFError) as exc:
            self._restart(owner, exc)
            self.processes[owner].send(data)
            return self.processes[owner].answer(lists=lists, raw=raw)

    def _restart(self, owner: int, cause: BaseException) -> None:
        """Start ``owner`` again from the last checkpoint's files and the FOLDs sent since."""
        old = self.processes[owner]
        status = old.exit()
        old.kill()
        self._dead.append(old)
        lost = f"shard owner {owner} (process {old.pid}) is gone ({status}, {type(cause).__name__}: {cause})"
        if not self.keep_parts:
            raise WorkerCrashed(f"{lost}; its keyed state is lost (a run with a checkpoint starts it again)")
        self.restarts[owner] += 1
        if self.restarts[owner] > MAX_RESTARTS:
            raise WorkerCrashed(f"{lost}, for the {self.restarts[owner]}th time in this run: giving up")
        log.warning("%s: starting it again from the last checkpoint and %d batches since", lost,
                    len(self.since[owner]))
        new = self.processes[owner] = self._start(owner)
        if self.manifest is not None:
            payload = wire.pack((self.manifest_folder, self.manifest, self.own(owner), self.shards))
            new.send(wire.frame(wire.LOAD, 0, payload))
            answer = new.answer()
            if isinstance(answer, OwnerFailed):
                raise CheckpointCorrupt(f"{lost}; started again, it cannot load its shards: {answer}")
        for ids in self.since[owner]:
            new.send(wire.frame(wire.FOLD, 0, ids.tobytes()))

    # --- checkpoints ----------------------------------------------------------------------------

    def barrier(self, seq: int, folder: str) -> Barrier:
        """A checkpoint of the owners' state as of now (after the FOLDs sent so far), at batch ``seq``.

        ``Barrier.write_shards`` (in the checkpoint thread) asks every owner to write its shard
        files and returns the manifest; no FOLD may be sent in between (the fold stage waits for
        its checkpoint), which it checks.
        """
        return Barrier(self, seq, folder)

    def barrier_answer(self, owner: int, barrier: Barrier) -> Any:
        """``owner``'s answer to ``barrier``: its manifest entries, or ``OwnerFailed``."""
        try:
            return self.processes[owner].answer(lists=True)
        except (OSError, EOFError) as exc:
            self._restart(owner, exc)  # the FOLDs before the barrier are sent again
            return self.request(owner, barrier.frame(owner), lists=True)

    def covered(self, manifest: Any, folder: str) -> None:
        """Every owner wrote its shards into ``manifest``: the parts folded before are not needed."""
        self.manifest, self.manifest_folder = manifest, folder
        for owner in range(self.count):
            for ids in self.since[owner]:
                for ident in ids:
                    wire.remove_part(wire.part_path(self.folder, owner, ident))
            self.since[owner] = []

    def load(self, manifest: Any, folder: str) -> int:
        """Each owner loads its shards from the files ``manifest`` names (blocking); keys loaded.

        ``CheckpointCorrupt`` naming the file when an owner finds one damaged or missing.
        """
        loaded = 0
        with self.lock:
            for owner in range(self.count):
                payload = wire.pack((folder, manifest, self.own(owner), self.shards))
                answer = self.request(owner, wire.frame(wire.LOAD, 0, payload))
                if isinstance(answer, OwnerFailed):
                    raise CheckpointCorrupt(f"shard owner {owner} cannot load its shards: {answer}")
                loaded += answer
        self.manifest, self.manifest_folder = manifest, folder
        return loaded

    def take_final(self) -> list[bytearray]:
        """Every owner's whole state as part bytes, one owner after the other, each owner exiting
        once it sent its state: the state is never held twice over in memory."""
        taken = []
        for owner in range(self.count):
            with self.lock:
                answer = self.request(owner, wire.frame(wire.TAKE, 0), raw=True)
            if isinstance(answer, OwnerFailed):  # pragma: no cover - TAKE does not fail
                raise WorkerCrashed(f"shard owner {owner}: {answer}")
            taken.append(answer)
            self.processes[owner].stop()
        return taken

    def take_state(self) -> dict[int, dict[Any, int]]:
        """Every owner's shards (after their pending folds), ``{shard: {key: int}}``."""
        shards: dict[int, dict[Any, int]] = {}
        for owner in range(self.count):
            answer = self.ask(owner, wire.DUMP)
            if isinstance(answer, OwnerFailed):  # pragma: no cover - DUMP does not fail
                raise WorkerCrashed(f"shard owner {owner}: {answer}")
            shards.update(answer)
        return shards
