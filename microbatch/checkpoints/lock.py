"""The writer lock of a checkpoint store: one run at a time writes a store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._exceptions import CheckpointError, CheckpointWriteError
from .atomic import make_folder

__all__ = ["WriterLock"]

logger = logging.getLogger("microbatch.checkpoint")


class WriterLock:
    """An exclusive ``flock`` on a lock file (mode 0600), so that one run at a time writes a store.

    The operating system releases it when the file is closed or the process dies (also by
    ``kill -9``), so a crashed run never leaves a stale lock. Where ``fcntl`` is missing (Windows)
    there is no lock.

    A lock on a file that was deleted protects nothing: a second run would create a new lock file
    and take it. ``verify()``, called before every save, notices that the lock file is gone or
    replaced; it takes a lock on a new file when nobody else holds one (logging a warning) and raises
    ``CheckpointWriteError`` when another run already does, so there are never two writers.
    """

    def __init__(self, path: Path, location: str) -> None:
        self.path = path
        self.location = location
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._lost: str | None = None  # why this store may no longer write, once it lost the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            make_folder(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot create the lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.location} is in use by another run (pid {holder}): two runs writing one "
                f"checkpoint store would overwrite each other's checkpoints. Wait for it to end, or "
                f"give this run its own checkpoint location"
            ) from None
        os.fchmod(fd, 0o600)  # also a lock file that was created with another mode
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def verify(self) -> None:
        """Check that the held lock file is still the one at ``path``; take it again if it vanished.

        Does nothing when the lock is not held (a store used without ``lock()``). Raises
        ``CheckpointWriteError`` naming the store when another run took the lock meanwhile.
        """
        if self._lost is not None:
            raise CheckpointWriteError(self._lost)
        if self._fd is None:
            return
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._identity:
            return
        os.close(self._fd)
        self._fd = self._identity = None
        try:
            self.acquire()
        except CheckpointError as exc:
            self._lost = (
                f"the lock file {self.path} was deleted or replaced while this run held it, and "
                f"another run now holds the new one; this run stops writing checkpoints to "
                f"{self.location} so that two runs never write one store ({exc})"
            )
            raise CheckpointWriteError(self._lost) from None
        logger.warning(
            "the lock file %s was deleted or replaced while this run held it (was the "
            "checkpoint location deleted?); it was recreated, and checkpoints written before are gone",
            self.path,
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._identity = None
