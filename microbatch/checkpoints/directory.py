"""``DirectoryStore``: checkpoints as files in a folder, each written atomically."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .._exceptions import CheckpointWriteError
from .atomic import TEMP_SUFFIX, fsync_dir, write_atomic
from .format import Checkpoint, encode
from .lock import WriterLock
from .store import Validate, accept, check_keep, logger, none_valid, report_skipped

_NAME = re.compile(r"^checkpoint-(\d{12,})\.json$")
_TEMP_PREFIX = ".checkpoint-"


class DirectoryStore:
    """Checkpoints as files in a folder, written atomically: ``checkpoint-000000000042.json``.

    Each ``save`` writes a temporary file made with ``tempfile.mkstemp`` in the folder, flushes and
    ``fsync``s it, ``os.replace``s it onto its final name (named after ``batches``, zero-padded so
    that names sort by number), ``fsync``s the folder so that the rename is durable, then removes
    all but the newest ``keep`` checkpoints. A crash at any step leaves either the previous
    checkpoint or the new one in place, never a torn one; temporary files a crash left behind are
    removed when a store is opened on the folder. The folder is created by the first ``save``.

    Any ``OSError`` while saving (a full disk, a failed ``fsync``, a read-only folder) raises
    ``CheckpointWriteError`` naming the folder and the cause; the temporary file is removed and the
    previous checkpoint stays as it was.

    One writer per folder at a time: a run calls ``lock()`` first, and a second run on the same
    folder gets a ``CheckpointError`` instead of overwriting the first one's checkpoints.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.path = Path(path)
        self.keep = check_keep(keep)
        self.location = str(self.path)
        self.skipped: list[tuple[str, str]] = []
        #: Temporary files left by an earlier crash and removed by ``lock()``.
        self.removed_temporaries: list[str] = []
        self._writer = WriterLock(self.path / ".lock", self.location)

    def lock(self) -> None:
        """Become the one writer of this folder; then remove temporary files a crash left behind.

        Raises ``CheckpointError`` naming the folder while another run holds it. Reading
        (``load``, ``microbatch inspect``) needs no lock. ``close()`` releases it.
        """
        self._writer.acquire()
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                        self.removed_temporaries.append(entry.name)

    def __repr__(self) -> str:
        return f"DirectoryStore({self.location!r}, keep={self.keep})"

    def _numbered(self) -> list[tuple[int, Path]]:
        """The checkpoint files, newest (highest number) first."""
        try:
            entries = list(self.path.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        found.sort(reverse=True)
        return found

    def load(self, validate: Validate | None = None) -> Checkpoint | None:
        """Return the newest valid checkpoint, or ``None`` when the folder holds none (or is missing).

        Invalid newer files (not JSON, truncated, wrong checksum, a newer format, a field of the
        wrong type or range, nesting deeper than ``MAX_DEPTH``, or refused by ``validate``) are each
        reported with a ``logging`` warning and listed in ``skipped``; the newest valid one is
        returned. ``validate(checkpoint)`` is the pipeline's own check (the position's kind, the
        aggregator's ``load``): it raises to refuse a checkpoint, and the last call that returned
        was for the checkpoint returned. Raises ``CheckpointCorrupt`` naming the folder when
        checkpoint files exist but none is valid.
        """
        self.skipped = []
        numbered = self._numbered()
        for number, file in numbered:
            try:
                data = file.read_bytes()
            except OSError as exc:
                report_skipped(self.location, self.skipped, str(file), f"cannot be read: {exc}")
                continue
            try:
                return accept(data, number, validate)
            except ValueError as exc:
                report_skipped(self.location, self.skipped, str(file), str(exc))
        if numbered:
            raise none_valid(self.location, self.skipped)
        return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint`` atomically as the newest; prune to the newest ``keep``.

        Raises ``CheckpointWriteError`` (the previous checkpoint intact) on any ``OSError``, and
        ``TypeError`` when the checkpoint holds data that JSON cannot. When this store holds the
        writer lock and its lock file vanished (the folder was deleted under the run), the lock is
        taken again on a new file with a warning, or ``CheckpointWriteError`` is raised when another
        run holds it by then: never two writers.
        """
        data = encode(checkpoint)
        self._writer.verify()
        try:
            write_atomic(self.path, f"checkpoint-{checkpoint.batches:012d}.json", data, prefix=_TEMP_PREFIX)
            fsync_dir(self.path)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot write a checkpoint in {self.location}: {exc.strerror or exc} "
                f"({type(exc).__name__}, errno {exc.errno}); the previous checkpoint is intact. "
                f"Free space or fix the folder's permissions, then run again to resume"
            ) from exc
        self._prune(checkpoint.batches)

    def _prune(self, saved: int) -> None:
        # Best effort: a checkpoint left over is harmless, so a failure here is only logged.
        older = 0
        for number, file in self._numbered():
            if number == saved:
                continue
            if number < saved:
                older += 1
                if older < self.keep:
                    continue
            try:
                file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot remove old checkpoint %s: %s", file, exc)

    def clear(self) -> None:
        """Remove every checkpoint and temporary file of the folder (the folder itself stays)."""
        for _, file in self._numbered():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
        self.skipped = []

    def close(self) -> None:
        """Release the writer lock, if held; every other call opens and closes its own files."""
        self._writer.release()

    def __enter__(self) -> DirectoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

