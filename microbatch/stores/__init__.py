"""Checkpoint stores: where a pipeline keeps its checkpoints (a folder, a SQLite file, your own).

The format of one checkpoint (fields, checksum, validation) lives in ``microbatch._core.checkpoint``;
this package does the file I/O. Both stores are synchronous and thread-safe enough to be called
through ``anyio.to_thread.run_sync`` one call at a time. They keep the newest ``keep`` checkpoints
(default 3), so that a corrupt newest checkpoint falls back to the previous one, which ``load``
reports (``logging`` warning and the ``skipped`` attribute) rather than silently resetting.

Checkpoints are ordered by ``batches``: the newest is the one with the most batches folded. Saving a
checkpoint replaces one with the same number and removes those numbered above it (they were skipped
as invalid by ``load``, or belong to a run that was abandoned).
"""

from __future__ import annotations

import inspect
import os
from typing import Protocol, runtime_checkable

from .._core.checkpoint import Checkpoint, encode
from .._exceptions import CheckpointCorrupt
from ._common import Validate, accept
from .directory import DirectoryStore
from .sqlite import SqliteStore

__all__ = [
    "CheckpointStore",
    "DirectoryStore",
    "SqliteStore",
    "Validate",
    "is_sqlite_target",
    "load_valid",
    "open_store",
]


@runtime_checkable
class CheckpointStore(Protocol):
    """Where a pipeline keeps its checkpoints. All methods block; call them from a worker thread.

    ``location`` names the store in messages; ``skipped`` lists ``(where, why)`` for every invalid
    checkpoint the last ``load`` passed over.
    """

    location: str
    skipped: list[tuple[str, str]]

    def load(self) -> Checkpoint | None:
        """Return the newest valid checkpoint, ``None`` when there is none; ``CheckpointCorrupt``
        when checkpoints exist but none is valid.

        The built-in stores also take ``validate`` (see :func:`load_valid`): a store that does
        falls back past checkpoints the pipeline refuses."""
        ...

    def save(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint atomically; ``CheckpointWriteError`` leaves the previous one intact."""
        ...

    def clear(self) -> None:
        """Remove every checkpoint (a deliberate fresh start)."""
        ...

    def close(self) -> None:
        """Release the store's resources; the store cannot be used after."""
        ...


def load_valid(store: CheckpointStore, validate: Validate) -> Checkpoint | None:
    """``store.load(validate=validate)``: the newest checkpoint that decodes and passes ``validate``.

    ``validate(checkpoint)`` raises to refuse a checkpoint (``InvalidCheckpoint`` naming the field,
    or any ``Exception``); the store then reports it and falls back to the previous one. For a
    store whose ``load`` takes no ``validate`` (one written for an older microbatch), the newest
    checkpoint is validated here, and a refusal raises ``CheckpointCorrupt`` naming the store, as
    there is nothing to fall back to.
    """
    if "validate" in inspect.signature(store.load).parameters:
        loaded: Checkpoint | None = store.load(validate=validate)  # type: ignore[call-arg]
        return loaded
    checkpoint = store.load()
    if checkpoint is not None:
        try:
            accept(encode(checkpoint), checkpoint.batches, validate)
        except ValueError as exc:
            raise CheckpointCorrupt(f"the newest checkpoint in {store.location} cannot be resumed: {exc}") \
                from exc
    return checkpoint


_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def is_sqlite_target(target: object) -> bool:
    """Whether ``checkpoint=target`` names a SQLite store (a path ending in .sqlite, .sqlite3, .db)."""
    if not isinstance(target, (str, os.PathLike)):
        return False
    path = os.fspath(target)
    return isinstance(path, str) and path.lower().endswith(_SQLITE_SUFFIXES)


def open_store(target: str | os.PathLike[str] | CheckpointStore, *, keep: int = 3) -> CheckpointStore:
    """Return the store for ``checkpoint=``: a store as is; a path ending in ``.sqlite``,
    ``.sqlite3`` or ``.db`` as a :class:`SqliteStore`; any other path as a :class:`DirectoryStore`.

    ``keep`` (default 3) applies to the stores this function opens. Raises ``TypeError`` for
    anything else.
    """
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        if isinstance(path, bytes):
            raise TypeError("checkpoint= must be a str path, a path-like object or a checkpoint store")
        if is_sqlite_target(path):
            return SqliteStore(path, keep=keep)
        return DirectoryStore(path, keep=keep)
    if isinstance(target, CheckpointStore):
        return target
    raise TypeError(
        f"checkpoint= must be a folder path, a .sqlite/.sqlite3/.db file path or a checkpoint store, "
        f"got {type(target).__qualname__}"
    )

