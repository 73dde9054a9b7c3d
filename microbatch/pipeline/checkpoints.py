"""A run's checkpoints: restore at the start, save when due, at the end and when stopped early.

The store is opened and locked (one writer at a time), the newest valid checkpoint is checked
against the pipeline's fingerprint and handed back to the run; saves write the dead-letter file's
durable length together with the state, so a resumed run cuts it back to what was folded.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import anyio

from .._core.checkpoint import Checkpoint, PositionKind
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


class Checkpoints:
    """The checkpoint store of one run (None: the run keeps no checkpoints).

    ``kind`` is the kind of position the source has (checked in every checkpoint resumed from);
    ``path`` the file whose identity each checkpoint records with the offset (None: not a file).
    """

    def __init__(
        self,
        target: Target | None,
        fingerprint: dict[str, str],
        dead: DeadLetterFile,
        *,
        kind: PositionKind,
        path: str | None,
    ) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.dead = dead
        self.kind: PositionKind = kind
        self.path = path
        self.store: CheckpointStore | None = None
        self.saved = 0

    async def open(
        self, *, fresh: bool, accept_changes: bool, load_state: Callable[[Any], Any]
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
            return None
        restored = await anyio.to_thread.run_sync(
            functools.partial(
                restore,
                store,
                fingerprint=self.fingerprint,
                kind=self.kind,
                load_state=load_state,
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

    async def save(self, *, batches: int, records: int, position: Any, state: Any, finished: bool) -> None:
        """Write one checkpoint (off the event loop); nothing without a store."""
        store = self.store
        if store is None:
            return
        def write() -> None:
            cp = Checkpoint(
                batches=batches,
                records=records,
                position=position,
                state=state,
                dead_letters=self.dead.length,
                fingerprint=self.fingerprint,
                finished=finished,
                identity=self._identity(position),
            )
            self.dead.sync()
            store.save(cp)

        await anyio.to_thread.run_sync(write)
        self.saved += 1
        log.debug("checkpoint %d written to %s at batch %d", self.saved, store.location, batches)

    def _identity(self, position: Any) -> Any:
        """Which file the offset belongs to, so a resume can tell a grown file from another one."""
        if self.path is None or not isinstance(position, int):
            return None
        try:
            return file_identity(self.path, position).to_json()
        except (OSError, ValueError) as exc:
            # A followed file rotated under the run: the path names a newer file now.
            log.warning("no identity recorded for %s at offset %d: %s", self.path, position, exc)
            return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
