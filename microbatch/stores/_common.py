"""What both checkpoint stores share: the writer lock, the ``keep`` check, reporting skipped checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._exceptions import CheckpointCorrupt, CheckpointError, CheckpointWriteError

logger = logging.getLogger("microbatch.checkpoint")

def check_keep(keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__qualname__}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (checkpoints kept), got {keep}")
    return keep


def report_skipped(location: str, skipped: list[tuple[str, str]], where: str, why: str) -> None:
    skipped.append((where, why))
    logger.warning("microbatch: skipping invalid checkpoint %s: %s", where, why)


def none_valid(location: str, skipped: list[tuple[str, str]]) -> CheckpointCorrupt:
    reasons = "; ".join(f"{where}: {why}" for where, why in skipped)
    return CheckpointCorrupt(
        f"no valid checkpoint in {location} ({len(skipped)} invalid: {reasons}). Move the store aside "
        f"to keep it for inspection, or pass fresh=True to Pipeline.run (--fresh on the command line) "
        f"to discard it and start over"
    )


class WriterLock:
    """An exclusive ``flock`` on a lock file, so that one run at a time writes a store.

    The operating system releases it when the file is closed or the process dies (also by
    ``kill -9``), so a crashed run never leaves a stale lock. Where ``fcntl`` is missing (Windows)
    there is no lock.
    """

    def __init__(self, path: Path, location: str) -> None:
        self.path = path
        self.location = location
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

