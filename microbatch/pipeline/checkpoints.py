"""A run's checkpoints: restore at the start, save when due, at the end and when stopped early.

The store is opened and locked (one writer at a time), the newest valid checkpoint is checked
against the pipeline's fingerprint and handed back to the run; saves write the dead-letter file's
durable length together with the state, so a resumed run cuts it back to what was folded.

Keyed state (``ByKey``, ``TopK``) in a folder or SQLite store is not written whole each time: each
save writes the shards' changes since the last one into shard files beside the store (``keyed/``
in a folder, ``NAME.keyed/`` beside a SQLite file), compacted into new bases as they grow, and
the checkpoint's state is the manifest naming them, so a checkpoint costs what changed.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio

from .._core.checkpoint import Checkpoint, PositionKind
from ..aggregate import Aggregator
from ..aggregate.bykey import KeyedAggregator
from ..keyed import MANIFEST_FORMAT, ShardFiles
from ..sources.identity import file_identity
from ..stores import CheckpointStore, is_sqlite_target, open_store
from ..stores.resume import Restored, restore
from .deadletter import DeadLetterFile

__all__ = ["Checkpoints", "dead_letter_path"]

log = logging.getLogger("microbatch")

Target = str | os.PathLike[str] | CheckpointStore


def dead_letter_path(dead_letter: str | os.PathLike[str] | None, target: Target | None) -> str:
    """Where dead letters go: the given path, the checkpoint folder, or the current directory."""
    if dead_letter is not None:
        return os.fspath(dead_letter)
    if isinstance(target, (str, os.PathLike)) and not is_sqlite_target(target):
        return os.path.join(target, "dead-letters.jsonl")
    return "dead-letters.jsonl"


#: Manifests whose shard files are kept: those of the checkpoints a store keeps to fall back on.
_KEEP_MANIFESTS = 3


class _KeyedChanges:
    """A keyed state's changes since the last save, to be written as shard files."""

    __slots__ = ("documents", "shards")

    def __init__(self, documents: list[Any], shards: int) -> None:
        self.documents = documents
        self.shards = shards


class Checkpoints:
    """The checkpoint store of one run (None: the run keeps no checkpoints).

    ``kind`` is the kind of position the source has (checked in every checkpoint resumed from);
    ``path`` the file whose identity each checkpoint records with the offset (None: not a file).
    The reader stamps each batch with that identity; ``by_path``: for batches it did not stamp
    (file splits, which workers read), it is taken from the file at ``path`` when saving (not for
    a followed file: the path may name a newer file by then).
    """

    def __init__(
        self,
        target: Target | None,
        fingerprint: dict[str, str],
        dead: DeadLetterFile,
        *,
        kind: PositionKind,
        path: str | None,
        by_path: bool = True,
    ) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.dead = dead
        self.kind: PositionKind = kind
        self.path = path
        self.by_path = by_path
        self.store: CheckpointStore | None = None
        self.saved = 0
        self._files: ShardFiles | None = None
        self._manifests: collections.deque[Any] = collections.deque(maxlen=_KEEP_MANIFESTS)

    def _shard_files(self) -> ShardFiles | None:
        """Where keyed state's shard files go: beside a folder or SQLite store; None for others."""
        if self._files is None and isinstance(self.target, (str, os.PathLike)):
            target = os.fspath(self.target)
            folder = target + ".keyed" if is_sqlite_target(target) else os.path.join(target, "keyed")
            self._files = ShardFiles(folder)
        return self._files

    def dump(self, agg: Aggregator[Any, Any, Any], state: Any) -> Any:
        """What a checkpoint of ``state`` holds, taken without awaiting (folding may go on after)."""
        if isinstance(agg, KeyedAggregator) and self._shard_files() is not None:
            return _KeyedChanges(agg.dump_changes(state), agg.shards)
        return agg.dump(state)

    def loader(self, agg: Aggregator[Any, Any, Any]) -> Callable[[Any], Any]:
        """How a resumed run turns a checkpoint's state back into the aggregator's state."""

        def load(data: Any) -> Any:
            files = self._shard_files()
            if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and files is not None:
                if not isinstance(agg, KeyedAggregator):
                    raise ValueError(f"keyed shard files cannot be loaded by {agg.describe()}")
                state = agg.load_documents(files.read(data))
                files.adopt(data)
                self._manifests.append(data)
                return state
            state = agg.load(data)
            if isinstance(agg, KeyedAggregator):
                agg.mark_all_changed(state)  # the first save writes every shard whole
            return state

        return load

    async def open(
        self, *, fresh: bool, accept_changes: bool, agg: Aggregator[Any, Any, Any]
    ) -> Restored | None:
        """Open and lock the store; return what to resume from (None: start afresh).

        Checkpoints with a field of the wrong type or range are skipped (the previous one is used);
        a changed pipeline or input is refused unless ``accept_changes`` (see ``stores.resume``).
        """
        if self.target is None:
            return None
        # Opening and locking a store is file I/O (the lock also removes stale temporary files).
        store = self.store = await anyio.to_thread.run_sync(open_store, self.target)
        lock = getattr(store, "lock", None)  # the built-in stores admit one writer at a time
        if lock is not None:
            await anyio.to_thread.run_sync(lock)
        # A run without a checkpoint appends to the dead-letter file as it finds it; checkpoints
        # record the file's absolute length, so a resumed run cuts back only what it wrote itself.
        if fresh:
            await anyio.to_thread.run_sync(store.clear)
            files = self._shard_files()
            if files is not None and files.path.is_dir():
                await anyio.to_thread.run_sync(files.collect, [])
            return None
        restored = await anyio.to_thread.run_sync(
            functools.partial(
                restore,
                store,
                fingerprint=self.fingerprint,
                kind=self.kind,
                load_state=self.loader(agg),
                path=self.path,
                accept_changes=accept_changes,
            )
        )
        if restored is None:
            return None
        cp = restored.checkpoint
        self.dead.truncate_to(cp.dead_letters)
        log.info(
            "resuming from %s: %d batches, %d records folded%s",
            store.location,
            cp.batches,
            cp.records,
            " (finished)" if cp.finished else "",
        )
        return restored

    async def save(
        self, *, batches: int, records: int, position: Any, identity: Any, state: Any, finished: bool
    ) -> None:
        """Write one checkpoint (off the event loop); nothing without a store.

        ``identity``: the identity of the file ``position`` is in, as the reader stamped it (None:
        not stamped).
        """
        store = self.store
        if store is None:
            return
        files = self._files

        def write() -> None:
            data = state
            if isinstance(state, _KeyedChanges):
                assert files is not None
                data = files.write(batches, state.documents, shards=state.shards)
            cp = Checkpoint(
                batches=batches,
                records=records,
                position=position,
                state=data,
                dead_letters=self.dead.length,
                fingerprint=self.fingerprint,
                finished=finished,
                identity=identity if identity is not None else self._identity(position),
            )
            self.dead.sync()
            store.save(cp)
            if files is not None and isinstance(state, _KeyedChanges):
                self._manifests.append(data)
                files.collect(self._manifests)  # shard files no kept checkpoint names

        # A save once begun is finished, also when the run is cancelled meanwhile: the changes it
        # took from a keyed state are in no other save, and the final checkpoint follows it.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(write)
        self.saved += 1
        log.debug("checkpoint %d written to %s at batch %d", self.saved, store.location, batches)

    def _identity(self, position: Any) -> Any:
        """Which file the offset belongs to, so a resume can tell a grown file from another one."""
        if self.path is None or not self.by_path or not isinstance(position, int):
            return None
        try:
            return file_identity(self.path, position).to_json()
        except (OSError, ValueError) as exc:
            # The file was replaced under the run: the path names another file now.
            log.warning("no identity recorded for %s at offset %d: %s", self.path, position, exc)
            return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
