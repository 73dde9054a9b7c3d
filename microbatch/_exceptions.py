"""Every error microbatch raises, in one place.

The hierarchy::

    MicrobatchError                     base of everything below
    ├── SourceError                     a source cannot deliver its records
    │   ├── LineTooLong                 a line passed max_line_length (names path/peer and byte offset)
    │   └── SourceDecodeError           bytes that do not decode (names path and byte offset)
    ├── ExecutorError                   one call on an executor failed for a reason other than fn
    │   ├── WorkerCrashed               the worker process died while it ran the call
    │   │   └── ExecutorUnavailable     nothing can run: workers do not start, a scheduler is lost
    │   │       └── PathNotVisible      a file to split is not visible to some Dask workers
    │   ├── BatchTimeout                the call ran past its timeout; its worker was killed
    │   ├── ResultTooLarge              fn's result, pickled, is over the executor's max_result_bytes
    │   └── RemoteError                 fn raised an exception that could not be sent back as itself
    ├── UnpicklableFunction             fn cannot be sent to worker processes (raised before any batch)
    ├── BatchResultMismatch             a Batcher's fn returned more or fewer results than items
    ├── BackendNotSupported             a feature needs another async backend (Dask needs asyncio)
    ├── BatchFailed                     on_error="raise": a batch failed after its retries
    │   └── TooManyDeadLetters          many records in a row failed and none succeeded in between
    ├── CheckpointError                 a checkpoint store cannot be used
    │   ├── CheckpointCorrupt           no valid checkpoint in a store that holds some
    │   │   └── InvalidCheckpoint       one checkpoint has a field of the wrong type or range (names it)
    │   ├── CheckpointMismatch          the checkpoint belongs to another pipeline
    │   ├── CheckpointFinished          a finished run's checkpoint, given with a stream source
    │   └── CheckpointWriteError        writing a checkpoint failed; the previous one is intact
    └── BatcherError                    a Batcher refused an item
        ├── BatcherFull                 submit_nowait while max_pending items wait
        └── BatcherClosed               submit after the batcher was closed

``RemoteTraceback`` is not raised on its own: executors attach it as ``__cause__`` of an exception
raised by ``fn`` in another process, so that the worker's traceback is shown with it.

Invalid arguments raise the built-in ``ValueError`` or ``TypeError`` naming the parameter.
"""

from __future__ import annotations

__all__ = [
    "MicrobatchError",
    "SourceError",
    "LineTooLong",
    "SourceDecodeError",
    "ExecutorError",
    "WorkerCrashed",
    "ExecutorUnavailable",
    "PathNotVisible",
    "BatchTimeout",
    "ResultTooLarge",
    "RemoteError",
    "RemoteTraceback",
    "UnpicklableFunction",
    "BackendNotSupported",
    "BatchResultMismatch",
    "BatchFailed",
    "TooManyDeadLetters",
    "CheckpointError",
    "CheckpointCorrupt",
    "InvalidCheckpoint",
    "CheckpointMismatch",
    "CheckpointFinished",
    "CheckpointWriteError",
    "BatcherError",
    "BatcherFull",
    "BatcherClosed",
]


class MicrobatchError(Exception):
    """Base class of every error raised by microbatch."""


class SourceError(MicrobatchError):
    """Raised by a source that cannot deliver its records."""


class LineTooLong(SourceError, ValueError):
    """Raised by a line source when a line is longer than ``max_line_length`` bytes.

    ``where`` is the file path or the peer address, ``offset`` the byte offset where the line starts.
    """

    def __init__(self, where: str, offset: int, limit: int) -> None:
        super().__init__(
            f"{where}: line starting at byte offset {offset} is longer than "
            f"max_line_length={limit} bytes"
        )
        self.where = where
        self.offset = offset
        self.limit = limit


class SourceDecodeError(SourceError, ValueError):
    """Raised by a line source when bytes do not decode; ``errors="replace"`` chooses replacement.

    ``offset`` is the byte offset of the first undecodable byte.
    """

    def __init__(self, where: str, offset: int, encoding: str, reason: str) -> None:
        super().__init__(
            f"{where}: cannot decode byte offset {offset} as {encoding}: {reason} "
            f"(pass errors='replace' to substitute undecodable bytes)"
        )
        self.where = where
        self.offset = offset
        self.encoding = encoding
        self.reason = reason


class ExecutorError(MicrobatchError):
    """Raised by an executor when one call failed for a reason other than an exception of ``fn``."""


class WorkerCrashed(ExecutorError):
    """Raised when the worker process running a call died (a signal, ``os._exit``, out of memory)."""


class ExecutorUnavailable(WorkerCrashed):
    """Raised when an executor cannot run calls at all: a worker process cannot be started, or
    the connection to a cluster's scheduler is lost.

    The failure says nothing about the batch, so a pipeline retries it (the cause may pass) but
    never bisects it or sends its records to the dead-letter file: after the retries the run stops
    with :class:`BatchFailed` (this error as its cause), and a checkpointed run resumes from there.
    """


class PathNotVisible(ExecutorUnavailable):
    """Raised by ``DaskExecutor`` when a file to be read in splits is not there for some workers
    (it must be on a shared or network filesystem); the message names the path and the workers."""


class BatchTimeout(ExecutorError, TimeoutError):
    """Raised when a call ran longer than its timeout; the worker running it was killed."""


class ResultTooLarge(ExecutorError):
    """Raised by ``ProcessExecutor`` when ``fn``'s result, pickled, is larger than its
    ``max_result_bytes``: the worker refused to send it (and stays), or sent a frame that large
    (it was killed, unread).

    ``size`` is the pickled size in bytes, ``limit`` the setting. A pipeline never retries it (the
    result would be as large again): with ``on_error="raise"`` it stops at once with
    ``BatchFailed`` naming the batch; with ``on_error="dead_letter"`` it bisects the batch, each
    part run once, and a single record whose result is still too large is a dead letter.
    """

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class RemoteError(ExecutorError):
    """Raised when ``fn`` failed in a worker with an exception that could not be pickled back.

    ``type_name`` and ``message`` describe the original exception.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of a remote exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.tb}\"\"\""


class UnpicklableFunction(MicrobatchError, TypeError):
    """Raised before any batch runs when ``fn`` cannot be sent to worker processes."""


class BatchResultMismatch(MicrobatchError, ValueError):
    """Raised by a ``Batcher`` to every caller of a batch for which fn returned a number of results
    other than the number of items.

    ``batch`` is the batch number (from 1), ``size`` the number of items, ``results`` the number of
    results, ``fn`` the function's name. It is a ``ValueError`` too, as this failure always was.
    """

    def __init__(self, where: str, fn: str, batch: int, size: int, results: int) -> None:
        super().__init__(
            f"{where}: fn {fn} returned {results} results for {size} items; it must return exactly "
            f"one result per item, in order (return an exception instance in an item's place to "
            f"fail that item alone)"
        )
        self.fn = fn
        self.batch = batch
        self.size = size
        self.results = results


class BackendNotSupported(MicrobatchError, RuntimeError):
    """Raised when a feature needs another async backend (the Dask executor needs asyncio)."""


class BatchFailed(MicrobatchError):
    """Raised by a pipeline with ``on_error="raise"`` when batch ``seq`` failed after its retries,
    and by any pipeline when its executor became unavailable (:class:`ExecutorUnavailable`).

    The original error is ``__cause__`` and ``cause``.
    """

    def __init__(self, seq: int, cause: BaseException, attempts: int) -> None:
        super().__init__(
            f"batch {seq} failed after {attempts} attempt(s): {type(cause).__name__}: {cause}"
        )
        self.seq = seq
        self.cause = cause
        self.attempts = attempts


class TooManyDeadLetters(BatchFailed):
    """Raised by a pipeline when ``max_dead_letters_in_a_row`` records failed every attempt with no
    record succeeding in between: ``fn`` most likely fails on every record (a bug, a wrong input).

    ``cause`` (also ``__cause__``) is the first of those failures, with the worker's traceback.
    """

    def __init__(self, seq: int, cause: BaseException, count: int) -> None:
        MicrobatchError.__init__(
            self,
            f"{count} records in a row failed every attempt and none succeeded in between (batch "
            f"{seq}); the first failure was {type(cause).__name__}: {cause}. Fix fn or the input, "
            f"or raise the Pipeline's max_dead_letters_in_a_row (None: never stop for this)",
        )
        self.seq = seq
        self.cause = cause
        self.attempts = count


class CheckpointError(MicrobatchError):
    """Raised when a checkpoint store cannot be used."""


class CheckpointCorrupt(CheckpointError):
    """Raised when a checkpoint store holds checkpoints but none of them is valid."""


class InvalidCheckpoint(CheckpointCorrupt, ValueError):
    """One checkpoint is invalid: ``field`` names the field at fault (``None`` for the whole record).

    Raised by ``decode``, ``check_position`` and ``checked``; a store's ``load`` reports it and falls
    back to the previous checkpoint. It is a ``ValueError`` too, as ``decode`` always raised.
    """

    def __init__(self, field: str | None, why: str) -> None:
        super().__init__(f"field {field!r} {why}" if field is not None else why)
        self.field = field


class CheckpointMismatch(CheckpointError):
    """Raised when a checkpoint was written by another pipeline (another fn, aggregator or source)."""


class CheckpointFinished(CheckpointError):
    """Raised by a pipeline given a finished run's checkpoint and a stream source (standard input,
    a pipe, a TCP server): what that run read cannot be read again to tell whether this input is
    the same one, grown, or another. ``fresh=True`` (``--fresh``) discards the checkpoint first.

    ``location`` names the checkpoint store, ``source`` the source.
    """

    def __init__(self, location: str, source: str) -> None:
        super().__init__(
            f"the checkpoint in {location} is of a finished run, and {source} is a stream that cannot "
            f"be read again to compare with what that run read: pass fresh=True to start over on "
            f"this input (--fresh on the command line), or give another checkpoint"
        )
        self.location = location
        self.source = source


class CheckpointWriteError(CheckpointError):
    """Raised when a checkpoint could not be written (full disk, failed fsync); the previous one stays."""


class BatcherError(MicrobatchError):
    """Raised when a ``Batcher`` refuses an item."""


class BatcherFull(BatcherError):
    """Raised by ``Batcher.submit_nowait`` while ``max_pending`` items are waiting."""


class BatcherClosed(BatcherError):
    """Raised by ``Batcher.submit`` after the batcher was closed."""
