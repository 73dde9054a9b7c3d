"""``SqliteStore``: checkpoints as rows of a SQLite file, one transaction per save."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path

from .._exceptions import CheckpointCorrupt, CheckpointWriteError
from .atomic import make_folder
from .format import Checkpoint, encode
from .lock import WriterLock
from .store import Validate, accept, check_keep, none_valid, report_skipped


class SqliteStore:
    """Checkpoints as rows of a SQLite file (standard ``sqlite3``), one transaction per save.

    The database runs in WAL journal mode with ``synchronous=FULL``, so a committed checkpoint
    survives a power cut and a crash mid-save leaves the previous one. Each row holds the same
    checksummed JSON as a checkpoint file, verified on load. Like :class:`DirectoryStore` it keeps
    the newest ``keep`` checkpoints (default 3) and reports invalid rows in ``skipped``.

    The file (and its folder) is created when the store opens, with mode 0600 (it holds the
    aggregator's state; SQLite gives its ``-wal`` and ``-shm`` files the same mode). Raises
    ``CheckpointCorrupt`` when the file is not a SQLite database, ``CheckpointWriteError`` when a
    save fails (a full disk, ``SQLITE_FULL``, a read-only file, the file deleted under the run); the
    transaction is rolled back and the previous checkpoint stays. Calls are serialized by a lock,
    so any thread may use the store.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.path = Path(path)
        self.keep = check_keep(keep)
        self.location = str(self.path)
        self.skipped: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._writer = WriterLock(self.path.with_name(self.path.name + ".lock"), self.location)
        try:
            make_folder(self.path.parent)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CheckpointWriteError(f"cannot open the checkpoint database {self.location}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS microbatch_checkpoints ("
                "batches INTEGER PRIMARY KEY, body BLOB NOT NULL)"
            )
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise CheckpointCorrupt(
                f"{self.location} is not a usable SQLite checkpoint database: {exc}. Move it aside or "
                f"point checkpoint= at another file"
            ) from exc

    def __repr__(self) -> str:
        return f"SqliteStore({self.location!r}, keep={self.keep})"

    def load(self, validate: Validate | None = None) -> Checkpoint | None:
        """Return the newest valid checkpoint, or ``None`` when the table is empty.

        Invalid rows (see ``DirectoryStore.load``, also for ``validate``) are reported (``logging``
        warning, ``skipped``) and passed over; when rows exist but none is valid, raises
        ``CheckpointCorrupt`` naming the file.
        """
        with self._lock:
            self.skipped = []
            try:
                rows = self._conn.execute(
                    "SELECT batches, body FROM microbatch_checkpoints ORDER BY batches DESC"
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise CheckpointCorrupt(f"cannot read checkpoints from {self.location}: {exc}") from exc
            for number, body in rows:
                where = f"{self.location} (row batches={number})"
                data = bytes(body) if not isinstance(body, str) else body.encode("utf-8")
                try:
                    return accept(data, number, validate)
                except ValueError as exc:
                    report_skipped(self.location, self.skipped, where, str(exc))
            if rows:
                raise none_valid(self.location, self.skipped)
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Store ``checkpoint`` in one transaction with the pruning; ``CheckpointWriteError`` on failure."""
        data = encode(checkpoint)
        with self._lock:
            self._writer.verify()
            self._check_file()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(
                        "DELETE FROM microbatch_checkpoints WHERE batches >= ?", (checkpoint.batches,)
                    )
                    self._conn.execute(
                        "INSERT INTO microbatch_checkpoints (batches, body) VALUES (?, ?)",
                        (checkpoint.batches, data),
                    )
                    self._conn.execute(
                        "DELETE FROM microbatch_checkpoints WHERE batches NOT IN "
                        "(SELECT batches FROM microbatch_checkpoints ORDER BY batches DESC LIMIT ?)",
                        (self.keep,),
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise CheckpointWriteError(
                    f"cannot write a checkpoint in {self.location}: {exc} ({type(exc).__name__}); "
                    f"the previous checkpoint is intact. Free space or fix the file's permissions, "
                    f"then run again to resume"
                ) from exc

    def _check_file(self) -> None:
        # A database file deleted or replaced under an open connection would take the checkpoints
        # to a file nobody can open again: stop instead.
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise CheckpointWriteError(
                f"the checkpoint database {self.location} was deleted or replaced while this run "
                f"wrote to it; no checkpoint can be saved there. Run again to start over (or resume "
                f"from a restored copy)"
            )

    def clear(self) -> None:
        """Remove every checkpoint row (the file stays)."""
        with self._lock:
            try:
                self._conn.execute("DELETE FROM microbatch_checkpoints")
            except sqlite3.Error as exc:
                raise CheckpointWriteError(f"cannot clear the checkpoints in {self.location}: {exc}") from exc
            self.skipped = []

    def lock(self) -> None:
        """Become the one writer of this database (a ``.lock`` file beside it); see DirectoryStore."""
        self._writer.acquire()

    def close(self) -> None:
        """Close the database connection and release the writer lock, if held."""
        with self._lock:
            self._conn.close()
        self._writer.release()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

