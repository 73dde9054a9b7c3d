"""The dead-letter file: records that failed every attempt, one JSON object a line.

Each line holds the record, the error's type and message, the worker's traceback, the batch number and
the record's source position (a byte offset for files, a record index otherwise). The pipeline writes
dead letters in batch order as it folds, so the file's length at a checkpoint covers exactly the
batches folded; a resumed run cuts the file back to that length and writes no dead letter twice.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._exceptions import BatchTimeout, RemoteError, RemoteTraceback, WorkerCrashed
from .atomic import make_folder

__all__ = ["DeadLetter", "DeadLetterFile", "describe_error"]

logger = logging.getLogger("microbatch")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record that failed, with where it came from and why."""

    record: Any
    batch: int
    position: int | None
    error_type: str
    message: str
    traceback: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        record = self.record
        if isinstance(record, bytes):
            out["record_base64"] = base64.b64encode(record).decode("ascii")
        else:
            try:
                json.dumps(record)
            except (TypeError, ValueError):
                out["record_repr"] = repr(record)
            else:
                out["record"] = record
        out.update(
            error=self.error_type,
            message=self.message,
            traceback=self.traceback,
            batch=self.batch,
            position=self.position,
        )
        return out


def describe_error(exc: BaseException) -> tuple[str, str, str]:
    """The type name, message and traceback text of an error, the worker's traceback if any.

    A crashed or timed-out worker has no traceback to give: its error says which worker died and
    how (pid, exit code or signal, the time limit), and the parent's stack would say nothing about
    the record, so the dead letter keeps that one line.
    """
    if isinstance(exc, RemoteError):
        type_name, message = exc.type_name, exc.message
    else:
        type_name, message = type(exc).__qualname__, str(exc)
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb
    elif isinstance(exc, (WorkerCrashed, BatchTimeout)):
        tb = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type_name, message, tb


class DeadLetterFile:
    """An append-only JSON-lines file opened lazily on the first dead letter, created with mode 0600.

    ``truncate_to(length)`` cuts the file back to a checkpoint's length before a resumed run writes
    anything; ``length`` is the byte length of what has been written and flushed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[bytes] | None = None
        self.count = 0

    @property
    def length(self) -> int:
        if self._file is not None:
            return self._file.tell()
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def truncate_to(self, length: int) -> None:
        """Cut the file back to ``length`` bytes (a checkpoint's view of it).

        A file that is missing although the checkpoint recorded dead letters is created again
        (empty, mode 0600) with a WARNING on the ``microbatch`` logger that the earlier dead letters
        are gone: the resume goes on, as the folded state does not depend on them. A file shorter
        than ``length`` was changed outside microbatch: ``ValueError`` naming the file.
        """
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            if length:
                logger.warning(
                    "dead-letter file %s is missing but the checkpoint recorded %d bytes of dead "
                    "letters: those earlier dead letters are gone; a new file is started for this run",
                    self.path, length,
                )
                self._open().close()
            return
        if size < length:
            raise ValueError(
                f"dead-letter file {self.path} holds {size} bytes, fewer than the {length} bytes "
                f"the checkpoint recorded; it was changed outside microbatch"
            )
        if size > length:
            with open(self.path, "r+b") as f:
                f.truncate(length)

    def _open(self) -> IO[bytes]:
        """Open the file to append, creating it with mode 0600 (its folder 0700): it holds raw records."""
        directory = os.path.dirname(self.path)
        if directory:
            make_folder(Path(directory))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # Unbuffered: a failed write leaves nothing behind that closing the file would retry.
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, letters: list[DeadLetter]) -> None:
        """Append ``letters``, handing them to the operating system before returning.

        A failed write (a full disk, a quota, an I/O error) raises ``OSError`` with its ``errno``,
        naming the file and the batch; the run stops, and its last checkpoint, which records the
        file's length, has a resumed run cut off whatever part of a line was written.
        """
        if not letters:
            return
        payload = b"".join(
            json.dumps(letter.to_json(), ensure_ascii=False).encode("utf-8") + b"\n"
            for letter in letters
        )
        try:
            if self._file is None:
                self._file = self._open()
            view = memoryview(payload)
            while view:
                view = view[self._file.write(view) or 0 :]
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"dead-letter file {self.path}: cannot write the dead letters of batch "
                f"{letters[0].batch} ({exc.strerror or exc}); free space there or choose another "
                "file (dead_letter=, --dead-letter), then run again to resume",
            ) from exc
        self.count += len(letters)

    def sync(self) -> None:
        """Make what was written durable (called before a checkpoint records the length)."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
