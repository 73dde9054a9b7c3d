"""A run's checkpoints: restore at the start, save when due, at the end and when stopped early.

The store is opened and locked (one writer at a time), the newest valid checkpoint is checked
against the pipeline's fingerprint and handed back to the run; saves write the dead-letter file's
durable length together with the state, so a resumed run cuts it back to what was folded.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio

from .._core.checkpoint import Checkpoint, CheckpointStore, check_fingerprint, is_sqlite_target, open_store
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
    """The checkpoint store of one run (None: the run keeps no checkpoints)."""

    def __init__(self, target: Target | None, fingerprint: dict[str, str], dead: DeadLetterFile) -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.dead = dead
        self.store: CheckpointStore | None = None
        self.saved = 0

    async def open(self, *, fresh: bool) -> Checkpoint | None:
        """Open and lock the store; return the checkpoint to resume from (None: start afresh)."""
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
        cp = await anyio.to_thread.run_sync(store.load)
        if cp is None:
            return None
        check_fingerprint(cp.fingerprint, self.fingerprint, location=store.location)
        self.dead.truncate_to(cp.dead_letters)
        log.info(
            "resuming from %s: %d batches, %d records folded%s",
            store.location,
            cp.batches,
            cp.records,
            " (finished)" if cp.finished else "",
        )
        return cp

    async def save(self, *, batches: int, records: int, position: Any, state: Any, finished: bool) -> None:
        """Write one checkpoint (off the event loop); nothing without a store."""
        store = self.store
        if store is None:
            return
        cp = Checkpoint(
            batches=batches,
            records=records,
            position=position,
            state=state,
            dead_letters=self.dead.length,
            fingerprint=self.fingerprint,
            finished=finished,
        )

        def write() -> None:
            self.dead.sync()
            store.save(cp)

        await anyio.to_thread.run_sync(write)
        self.saved += 1
        log.debug("checkpoint %d written to %s at batch %d", self.saved, store.location, batches)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
