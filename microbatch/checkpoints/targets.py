"""Which store a pipeline's ``checkpoint=`` names: a store as is, a SQLite file, or a folder."""

from __future__ import annotations

import os

from .directory import DirectoryStore
from .sqlite import SqliteStore
from .store import CheckpointStore

__all__ = ["is_sqlite_target", "open_store"]


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

