"""Shard owners on a Dask cluster: Dask actors that hold a keyed count's state, fed by tasks directly.

With ``ByKey(Count())`` (or ``ByKey(Sum())`` given ``owners=``) on a ``DaskExecutor``, a run starts
one actor per shard owner (``client.submit(OwnerActor, ..., actor=True)``), by default one per
worker of the cluster, placed round-robin on the workers. Each holds the ring shards
:func:`microbatch._core.owners.owner_of_shards` gives it, in a
:class:`microbatch.executors.ownerproc.ShardState`: the owner processes' own state and fold. Then:

1. a task runs ``fn`` on its batch, checks and cuts the result exactly as an owner process's worker
   does (:class:`microbatch.executors.owners.OwnerRoute`), and hands each owner its part (part bytes,
   :func:`microbatch._core.ownerwire.pack_part`) straight to the actor's worker, from inside
   the task (:class:`ActorRef`): the part is in the actor before the task returns; the task
   returns only a receipt (``OwnedParts``: part ids);
2. the pipeline's fold stage sends every owner, in batch order, a ticket numbered ``n`` naming that
   batch's part ids for it (:meth:`DaskOwners.fold`); an actor folds ticket ``n`` only after
   ticket ``n - 1`` (tickets travel over separate connections and may arrive out of order), so each
   part is folded once, in order, or never. The part of a task attempt whose result never reached
   the pipeline (a task Dask ran twice, an attempt retried, a bundle re-run) is never named: it is
   dropped once ``keep`` (``KEEP_TICKETS``) tickets were folded after it arrived, so such parts
   never pile up. A ticket naming a part the actor does not hold fails the run naming the part;
3. at a checkpoint (:class:`DaskBarrier`), once every actor folded the tickets sent before it,
   each writes its shards' changes as shard files into the checkpoint's folder (which its worker
   must reach, at the same path: a ``LocalCluster``, or a shared filesystem) and answers with their
   manifest entries; a resumed run's actors load their own shards;
4. when the run ends, each actor sends its whole state as part bytes: the run's value reads them
   (``PackedValues``), a shard at a time.

Limits: an actor lives on one worker: its keyed state is lost with that worker. The owners look at
the cluster's workers every ``WATCH_INTERVAL`` seconds and the run then fails with ``WorkerCrashed``
(the last checkpoint resumes exact); an actor Dask started again, empty, is told apart by the
identity (``life``) it draws when created. Tasks lost with other workers are re-run as usual. The
value is readable once the run ended, not while it runs.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._core import ownerwire as wire
from .._core.owners import OwnedParts, OwnerRoute, owner_of_shards
from .._core.ring import ring
from .._exceptions import CheckpointCorrupt, CheckpointWriteError, WorkerCrashed
from .dask import DaskExecutor, close_client
from .ownerproc import ShardState
from .owners import manifest_of

__all__ = ["KEEP_TICKETS", "ActorRef", "DaskBarrier", "DaskOwnerRoute", "DaskOwners", "OwnerActor"]

#: Tickets an actor folds after a part arrived before it drops the part as never to be named.
KEEP_TICKETS = 4096

#: Seconds a task waits for its parts to be taken, before it fails (and the pipeline runs the batch
#: again; parts already handed over are never named, and dropped): an owner whose worker is gone
#: would otherwise hold the task, and its worker thread, for Dask's connect timeout (30 s).
PUT_TIMEOUT = 10.0

#: Seconds between two looks at the cluster's workers: a worker holding an owner that left fails
#: the run at once (the tasks that would hand it parts wait on it, and no batch would fold).
WATCH_INTERVAL = 0.5


class OwnerActor:
    """One shard owner as a Dask actor; Dask runs its methods one at a time (the actor's thread)."""

    def __init__(self, index: int, keep: int) -> None:
        self.index = index
        self.keep = keep
        self.state = ShardState()
        self.parts: dict[int, tuple[int, bytes]] = {}  # part id -> (tickets received then, bytes)
        self.tickets: dict[int, list[int]] = {}  # received ahead of their turn
        self.next = 0  # the next ticket to fold
        self.received = 0  # one past the highest ticket received
        self.dropped = 0  # parts dropped as never to be named
        # This actor's own: one Dask started again (on a worker of the same address) differs.
        self.life = int.from_bytes(os.urandom(8), "little")

    def put(self, ident: int, data: bytes) -> None:
        """Keep a task's part until a ticket names it (or ``keep`` tickets pass)."""
        self.parts[ident] = (self.received, data)

    def identity(self) -> int:
        return self.life

    def check(self, life: int, tickets: int) -> None:
        """``LookupError`` unless this is the actor ``life`` names and it folded ``tickets`` tickets."""
        if life != self.life or self.next != tickets:
            raise LookupError(
                f"shard owner {self.index} is not the one the run started (Dask started it again) or "
                f"folded {self.next} tickets where {tickets} were sent: its keyed state is not the run's"
            )

    def fold(self, ticket: int, ids: list[int]) -> tuple[int, int]:
        """Fold ticket ``ticket``'s parts, once every ticket before it was folded; the next ticket
        due, and this actor's ``life``.

        ``LookupError`` naming a part it names that this actor does not hold."""
        self.tickets[ticket] = ids
        self.received = max(self.received, ticket + 1)
        while self.next in self.tickets:
            for ident in self.tickets.pop(self.next):
                found = self.parts.pop(ident, None)
                if found is None:
                    raise LookupError(
                        f"shard owner {self.index}: part {ident:016x} named by ticket {self.next} is not "
                        f"here (it never arrived, or waited past {self.keep} tickets and was dropped)"
                    )
                self.state.fold_part(found[1])
            self.next += 1
        limit = self.next - self.keep
        if self.parts and limit > 0:
            stale = [ident for ident, (stamp, _) in self.parts.items() if stamp < limit]
            for ident in stale:
                del self.parts[ident]
            self.dropped += len(stale)
        return self.next, self.life

    def write_barrier(
        self, life: int, tickets: int, seq: int, folder: str, own: list[int], shards: int
    ) -> dict[int, Any]:
        """Write this owner's shards' changes as shard files in ``folder``; their manifest entries."""
        self.check(life, tickets)
        return self.state.write_barrier(seq, folder, own, shards)

    def load_shards(self, folder: str, manifest: Any, own: list[int], shards: int) -> int:
        """Load this owner's shards from the files ``manifest`` names; the keys loaded."""
        return self.state.load_shards(folder, manifest, own, shards)

    def stats(self) -> dict[str, int]:
        """Keys held, parts waiting for a ticket, parts dropped, tickets folded."""
        keys = sum(map(len, self.state.shards.values()))
        return {"keys": keys, "waiting": len(self.parts), "dropped": self.dropped, "folded": self.next}

    def take(self, life: int, tickets: int) -> bytes:
        """The whole state as part bytes (the state is gone after)."""
        self.check(life, tickets)
        return b"".join(self.state.take_pieces())


class ActorRef:
    """An owner actor's worker address and key: what a task needs to call it.

    Calls go straight to the actor's worker (``actor_execute``, as a ``distributed.Actor`` handle
    sends them) and fail when the actor is gone: a handle's call would then wait forever (its
    worker answers a released actor's key with an error the handle does not catch), holding the
    task's thread, and with it a worker slot, for good.
    """

    __slots__ = ("address", "key")

    def __init__(self, address: str, key: str) -> None:
        self.address = address
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorRef, (self.address, self.key))

    async def call(self, rpc: Any, method: str, *args: Any) -> Any:
        """``method(*args)`` of the actor through ``rpc`` (a worker's or a client's connection
        to the actor's worker); its value, or its exception raised."""
        from distributed.protocol.serialize import to_serialize

        wrap: Any = to_serialize  # sent as is (bytes stay bytes), as a handle's arguments
        answer = await rpc.actor_execute(
            function=method, actor=self.key, args=[wrap(arg) for arg in args], kwargs={}
        )
        if answer["status"] != "OK":
            raise answer["exception"]
        return answer["result"]


def _client_rpc(client: Any, address: str) -> Any:
    """A client's connection to a worker, straight or through the scheduler (as Dask's actors)."""
    if client.direct_to_workers:
        return client.rpc(address)
    from distributed import actor

    proxy: Any = actor.ProxyRPC
    return proxy(client.scheduler, address)


class DaskOwnerRoute(OwnerRoute):
    """Runs in a Dask task: ``fn``, then each owner's part handed to its actor."""

    def __init__(
        self, fn: Callable[[list[Any]], Any], shards: int, actors: list[ActorRef], *, counts: bool
    ) -> None:
        super().__init__(fn, shards, "", len(actors), counts=counts)
        self.actors = actors

    def send(self, parts: list[dict[int, tuple[list[Any], list[Any]]]]) -> tuple[tuple[int, int], ...]:
        from distributed import get_worker
        from distributed.utils import sync

        worker = get_worker()
        sent, puts = [], []
        for owner, actor in enumerate(self.actors):
            part, parts[owner] = parts[owner], {}
            if part:
                ident = wire.part_id()
                puts.append((actor, ident, wire.pack_part(part)))
                sent.append((owner, ident))

        async def put() -> None:
            await asyncio.gather(*(ref.call(worker.rpc(ref.address), "put", i, d) for ref, i, d in puts))

        sync(worker.loop, put, callback_timeout=PUT_TIMEOUT)  # every part in its actor before the receipt
        return tuple(sent)


class DaskBarrier:
    """A checkpoint asked of every owner actor after the first ``tickets`` tickets, at batch ``seq``."""

    def __init__(self, owners: DaskOwners, seq: int, folder: str) -> None:
        self.owners = owners
        self.seq = seq
        self.folder = folder
        self.tickets = owners.batches

    def write_shards(self, seq: int) -> Any:
        """The manifest naming every owner's shard files (blocking: the checkpoint thread's call),
        once every owner folded the tickets sent before the checkpoint was taken.

        ``CheckpointWriteError`` when an owner could not write, or failed (the previous
        checkpoint stands)."""
        owners = self.owners
        with owners.progress:
            owners.progress.wait_for(lambda: owners.error is not None or min(owners.folded) >= self.tickets)
        if owners.error is not None:
            raise CheckpointWriteError(f"keyed state at batch {self.seq} not written: {owners.error}")
        answers = [
            anyio.from_thread.run(owners.answer, owner, "write_barrier", owners.lives[owner], self.tickets,
                                  self.seq, self.folder, owners.own(owner), owners.shards)
            for owner in range(owners.count)
        ]
        errors = [f"shard owner {o}: {a}" for o, a in enumerate(answers) if isinstance(a, str)]
        if errors:
            raise CheckpointWriteError(f"keyed state at batch {self.seq} not written: {'; '.join(errors)}")
        return manifest_of(answers, self.seq, owners.shards)


def _not_while_running() -> RuntimeError:
    return RuntimeError("keyed values held by shard owners on Dask are readable once the run ended")


class DaskOwners:
    """The owner actors of one run (an async context manager) and the pipeline's side of them.

    ``wanted``: owners asked for (None: one per worker of the cluster, at most ``shards``). Leaving
    the block normally waits for every ticket's fold and takes the actors' whole state
    (:attr:`final`); the actors are then released.
    """

    def __init__(
        self, executor: DaskExecutor, wanted: int | None, shards: int, *, keep: int | None = None
    ) -> None:
        self.executor = executor
        self.wanted = wanted
        self.shards = shards
        self.keep = KEEP_TICKETS if keep is None else keep
        self.count = 0
        self.owner_of: list[int] = []
        self.addresses: list[str] = []  # the worker of each owner
        self.actors: list[ActorRef] = []
        self.final: list[bytes] | None = None
        self.batches = 0  # tickets sent (fold() calls)
        self.error: WorkerCrashed | None = None
        #: Per owner, the tickets it folded (as far as known here); ``progress`` is notified when
        #: that grows or an owner failed (a checkpoint waits for it in the checkpoint thread).
        self.folded: list[int] = []
        self.lives: list[int] = []  # each actor's ``life``
        self.progress = threading.Condition()
        self._client: Any = None
        self._owns_client = False
        self._futures: list[Any] = []
        self._tickets: MemoryObjectSendStream[tuple[int, Any]] | None = None
        self._stack = AsyncExitStack()  # the task group of the ticket watcher
        self._watcher: anyio.CancelScope | None = None
        self._workers_scope = anyio.CancelScope()  # the look at the workers, cancelled on leaving

    async def __aenter__(self) -> DaskOwners:
        self._client, self._owns_client = await self.executor.open_client()
        try:
            await self._start()
        except BaseException:
            await self._close()
            raise
        return self

    async def _start(self) -> None:
        client = self._client
        await client.wait_for_workers(1, timeout=self.executor.worker_timeout)
        workers = sorted(await client.nthreads())
        self.count = min(self.wanted or len(workers), self.shards)
        self.owner_of = owner_of_shards(self.shards, self.count)
        self.folded = [0] * self.count
        run = uuid.uuid4().hex[:12]
        for owner in range(self.count):
            address = workers[owner % len(workers)]
            self.addresses.append(address)
            self._futures.append(client.submit(
                OwnerActor, owner, self.keep, actor=True, workers=[address], allow_other_workers=False,
                key=f"microbatch-owner-{owner}-{run}",
            ))
        for future in self._futures:
            await future  # the actor is created
        pairs = zip(self.addresses, self._futures, strict=True)
        self.actors = [ActorRef(address, future.key) for address, future in pairs]
        send, receive = anyio.create_memory_object_stream[tuple[int, Any]](math.inf)
        self._tickets = send
        self.lives = [await self._call(owner, "identity") for owner in range(self.count)]
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._watcher = tg.cancel_scope
        tg.start_soon(self._watch, receive)
        tg.start_soon(self._watch_workers)

    async def _watch_workers(self) -> None:
        """Fail the run (``WorkerCrashed``, raised in the block) once a worker holding an owner left."""
        with self._workers_scope:
            while True:
                await anyio.sleep(WATCH_INTERVAL)
                present = await self._client.nthreads()
                gone = [owner for owner, address in enumerate(self.addresses) if address not in present]
                if gone:
                    error = self._lost(gone[0], ConnectionError("its worker left the cluster"))
                    with self.progress:
                        self.error = self.error or error
                        self.progress.notify_all()
                    raise error

    async def _watch(self, receive: MemoryObjectReceiveStream[tuple[int, Any]]) -> None:
        """Wait for each ticket's fold in turn; the first failure is kept for ``fold`` to raise."""
        async with receive:
            async for owner, call in receive:
                try:
                    folded, life = await call
                    if life != self.lives[owner]:
                        raise self._lost(owner, LookupError("Dask started it again, empty"))
                except WorkerCrashed as exc:
                    with self.progress:
                        if self.error is None:
                            self.error = exc
                        self.progress.notify_all()
                else:
                    with self.progress:
                        self.folded[owner] = max(self.folded[owner], folded)
                        self.progress.notify_all()

    def _lost(self, owner: int, exc: BaseException) -> WorkerCrashed:
        return WorkerCrashed(
            f"shard owner {owner} (a Dask actor on {self.addresses[owner]}) failed: {type(exc).__name__}: "
            f"{exc}; keyed state held by an actor is lost with its worker"
        )

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.drain(failed=exc_info[1] is not None)
            if exc_info[1] is None:
                if self.error is not None:
                    raise self.error
                lives, tickets = self.lives, self.batches
                self.final = [await self._call(o, "take", lives[o], tickets) for o in range(self.count)]
        finally:
            await self._close()

    async def drain(self, *, failed: bool) -> None:
        """Stop sending tickets and watching the workers; unless ``failed``, wait until every
        ticket's fold was answered."""
        self._workers_scope.cancel()
        if self._tickets is not None:
            self._tickets.close()
        if failed and self._watcher is not None:
            self._watcher.cancel()  # the run failed: no need to wait for the folds
        await self._stack.aclose()

    async def _call(self, owner: int, method: str, *args: Any) -> Any:
        """``method(*args)`` of an owner's actor; ``WorkerCrashed`` when it fails or is gone."""
        try:
            rpc = _client_rpc(self._client, self.addresses[owner])
            return await self.actors[owner].call(rpc, method, *args)
        except Exception as exc:
            raise self._lost(owner, exc) from exc

    async def answer(self, owner: int, method: str, *args: Any) -> Any:
        """Like ``_call``, but an error comes back as its message (a str)."""
        try:
            return await self._call(owner, method, *args)
        except WorkerCrashed as exc:
            return str(exc)

    async def stats(self) -> list[dict[str, int]]:
        """Each actor's :meth:`OwnerActor.stats`."""
        return [await self._call(owner, "stats") for owner in range(self.count)]

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._watcher is not None:
                self._watcher.cancel()
            await self._stack.aclose()
            futures, self._futures = self._futures, []
            client = self._client
            if client is None:
                return
            if futures and not self._owns_client:
                await client.cancel(futures)
            if self._owns_client:
                await close_client(client)

    def own(self, owner: int) -> list[int]:
        return [shard for shard, o in enumerate(self.owner_of) if o == owner]

    def fold(self, receipt: OwnedParts) -> None:
        """Send every owner this batch's ticket (in batch order: call in order)."""
        if self.error is not None:
            raise self.error
        assert self._tickets is not None
        by_owner: list[list[int]] = [[] for _ in range(self.count)]
        for owner, ident in receipt.parts:
            by_owner[owner].append(ident)
        for owner, ids in enumerate(by_owner):
            # Sent now (the watcher awaits the answers in order): tickets travel while folds go on.
            call = asyncio.ensure_future(self._call(owner, "fold", self.batches, ids))
            self._tickets.send_nowait((owner, call))
        self.batches += 1

    # --- reads while running: not on Dask -------------------------------------------------------

    def owner_of_key(self, key: object) -> int:
        return self.owner_of[ring(self.shards).shard_of(key)]

    def ask(self, owner: int, kind: int, payload: bytes = b"", *, lists: bool = False) -> Any:
        raise _not_while_running()

    def take_state(self) -> dict[int, dict[Any, int]]:
        raise _not_while_running()

    # --- checkpoints ----------------------------------------------------------------------------

    def barrier(self, seq: int, folder: str) -> DaskBarrier:
        """A checkpoint of the owners' state after the tickets sent so far, at batch ``seq``: each
        actor writes its shard files into ``folder``, which must be reachable from its worker."""
        return DaskBarrier(self, seq, folder)

    async def load(self, manifest: Any, folder: str) -> int:
        """Each actor loads its shards from the files ``manifest`` names in ``folder`` (reachable from
        its worker); the keys loaded. ``CheckpointCorrupt`` naming the file an owner cannot load."""
        loaded = 0
        for owner in range(self.count):
            answer = await self.answer(owner, "load_shards", folder, manifest, self.own(owner), self.shards)
            if isinstance(answer, str):
                raise CheckpointCorrupt(f"cannot load the shards of the checkpoint in {folder}: {answer}")
            loaded += answer
        return loaded
