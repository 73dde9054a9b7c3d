"""What a worker runs for one split: read its lines from the file, cut batches, call ``fn`` on each.

The pipeline sends a :class:`~microbatch._core.splits.FileSplit` (a path and a byte range); the
worker opens the file, reads the lines the split owns (:func:`read_split`, the rule of
:mod:`microbatch._core.splits`), cuts them into batches of ``max_size`` lines, decodes each and
calls ``fn``. It returns one ``(count, start, end, result)`` per batch, in order, so the pipeline
folds and reports each batch on its own and can name every record's byte offset. A batch whose
``fn`` (or decoding) raised an ``Exception`` has a :class:`BatchError` as its result, and the
others still run: the pipeline then retries and bisects that one batch as it would without splits.

The pipeline process reads a split's bytes itself only when the split failed in a worker: it then
runs that split's batches one by one, as for any other source (retries, bisection, dead letters).

Standard library only: worker processes import this module.
"""

from __future__ import annotations

import pickle
import traceback
from typing import IO, Any, Generic, TypeVar

from .._exceptions import LineTooLong
from .lines import LineBlock, _nth_newline, decode_lines, find_long_line
from .splits import FileSplit, SourceSplit
from .task import BatchTask

__all__ = [
    "BatchError",
    "SplitTask",
    "Undecodable",
    "batch_bounds",
    "read_owned",
    "read_split",
    "split_blocks",
]

R = TypeVar("R")

#: Bytes read at a time while looking for the end of a line outside the split's range.
_SCAN_BLOCK = 1 << 16

#: One batch of a split as the worker reports it: lines, first byte, byte after, fn's result.
BatchOutcome = tuple[int, int, int, Any]


def _find_newline(f: IO[bytes], pos: int, limit: int | None) -> tuple[bytes, int | None]:
    """Read from ``pos`` until a newline: the bytes read and the newline's index in them.

    Stops without a newline (index None) at the end of the file, or once more than ``limit`` bytes
    were read without one (``limit`` None: no bound; the bytes are then not kept).
    """
    f.seek(pos)
    pieces: list[bytes] = []
    held = 0
    while True:
        block = f.read(_SCAN_BLOCK)
        if not block:
            return b"".join(pieces), None
        nl = block.find(b"\n")
        if nl != -1:
            if limit is None:
                return b"", held + nl
            pieces.append(block)
            return b"".join(pieces), held + nl
        held += len(block)
        if limit is None:
            continue
        pieces.append(block)
        if held > limit:
            return b"".join(pieces), None


def read_owned(f: IO[bytes], split: FileSplit, where: str) -> tuple[bytes, int, int]:
    """``(buffer, stop, first)``: the lines ``split`` owns are ``buffer[:stop]``, from byte ``first``.

    Reads the split's range and a little more in one read (the end of the last owned line is
    usually in it, so nothing is copied), the partial line before the range only to find where it
    ends (in blocks, never held whole), and further past ``end`` only to finish a long last line.
    Checks only that last line against ``split.max_line_length`` (:class:`LineTooLong`, naming
    ``where`` and the offset where the line starts); :func:`read_split` checks them all.
    """
    start, end, limit = split.start, split.end, split.max_line_length
    first = start
    if start > 0:
        _, nl = _find_newline(f, start - 1, None)
        if nl is None:
            return b"", 0, start  # the rest of the file ends a line owned by an earlier split
        first = start - 1 + nl + 1
    if first >= end:
        return b"", 0, first
    f.seek(first)
    want = end - first
    data = f.read(want + _SCAN_BLOCK)
    nl = data.find(b"\n", want - 1)
    if nl != -1:
        return data, nl + 1, first
    if len(data) < want + _SCAN_BLOCK:
        return data, len(data), first  # the file ends in the last owned line
    # The last owned line goes on far past ``end``: read until its newline (or the end of the file).
    line_start = data.rfind(b"\n", 0, want) + 1
    tail, nl = _find_newline(f, first + len(data), limit - (len(data) - line_start))
    if nl is None and len(tail) + len(data) - line_start > limit:
        raise LineTooLong(where, first + line_start, limit)
    data += tail if nl is None else tail[: nl + 1]
    return data, len(data), first


def read_split(f: IO[bytes], split: FileSplit, where: str) -> tuple[bytes, int]:
    """The bytes of the lines ``split`` owns in the open file ``f``, and the offset of the first.

    Reads as :func:`read_owned` does. A line longer than ``split.max_line_length`` bytes (without
    its newline) raises :class:`LineTooLong` naming ``where`` and the offset where the line starts;
    only the split that owns a line checks it.
    """
    buffer, stop, first = read_owned(f, split, where)
    data = buffer if stop == len(buffer) else buffer[:stop]
    bad = find_long_line(data, split.max_line_length)
    if bad is not None:
        raise LineTooLong(where, first + bad, split.max_line_length)
    return data, first


def batch_bounds(data: bytes, max_size: int, stop: int | None = None) -> list[tuple[int, int, int]]:
    """``(lo, hi, count)`` of each batch of ``max_size`` lines of ``data[:stop]`` (complete lines).

    Finds the cuts with ``bytes.count`` passes (C speed), not a step per line, and copies nothing.
    """
    size = len(data) if stop is None else stop
    if not size:
        return []
    newlines = data.count(b"\n", 0, size)
    count = newlines + (data[size - 1] != 10)
    bounds: list[tuple[int, int, int]] = []
    lo = 0
    for k in range(1, -(-count // max_size) + 1):
        lines = k * max_size
        if lines >= count:
            bounds.append((lo, size, count - (k - 1) * max_size))
            break
        hi = _nth_newline(data, lines, lo, size, lines - max_size, newlines) + 1
        bounds.append((lo, hi, max_size))
        lo = hi
    return bounds


def split_blocks(data: bytes, first: int, max_size: int) -> list[LineBlock]:
    """The owned lines of a split (``data`` from byte ``first``) cut into blocks of ``max_size`` lines."""
    return [LineBlock(data[lo:hi], n, first + lo, first + hi) for lo, hi, n in batch_bounds(data, max_size)]


class BatchError:
    """The result of a batch of a split whose ``fn`` raised, and the worker's traceback.

    ``error`` is the exception when it survives a round trip through pickle; otherwise None, and
    ``type_name`` and ``message`` describe it (as ``RemoteError`` does for a whole call).
    """

    __slots__ = ("error", "type_name", "message", "traceback")

    def __init__(self, error: Exception | None, type_name: str, message: str, traceback: str) -> None:
        self.error = error
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    @classmethod
    def of(cls, exc: Exception) -> BatchError:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            message = str(exc)
        except Exception as str_exc:  # a broken __str__ must not take the split down
            message = f"<str() failed: {type(str_exc).__name__}>"
        try:
            pickle.loads(pickle.dumps(exc, protocol=5))  # many exceptions pickle but cannot be rebuilt
        except Exception:
            return cls(None, name, message, text)
        return cls(exc, name, message, text)

    def __reduce__(self) -> tuple[type[BatchError], tuple[Exception | None, str, str, str]]:
        return (BatchError, (self.error, self.type_name, self.message, self.traceback))

    def __repr__(self) -> str:
        return f"BatchError({self.type_name}: {self.message})"


class Undecodable:
    """The outcome of a batch of a split with records that did not decode: ``fn``'s result on the
    others (``called`` False: there were none, ``fn`` was not called) and, for each record left
    out, ``(position, raw bytes, reason)``. The pipeline writes those to the dead letters, as it
    does for a line that does not decode."""

    __slots__ = ("result", "called", "records")

    def __init__(self, result: Any, called: bool, records: list[tuple[int, bytes, str]]) -> None:
        self.result = result
        self.called = called
        self.records = records

    def __reduce__(self) -> tuple[type[Undecodable], tuple[Any, bool, list[tuple[int, bytes, str]]]]:
        return (Undecodable, (self.result, self.called, self.records))

    def __repr__(self) -> str:
        return f"Undecodable({len(self.records)} records)"


class SplitTask(Generic[R]):
    """Runs a batch task's ``fn`` on each batch of a split's lines, read from the file by the worker.

    The decoding settings (``encoding``, ``errors``, ``where``) are the batch task's: a split's
    batches decode exactly as the same batches sent one by one.
    """

    __slots__ = ("task",)

    def __init__(self, task: BatchTask[R]) -> None:
        self.task = task

    def __repr__(self) -> str:
        return f"SplitTask({self.task!r})"

    def __call__(self, split: FileSplit | SourceSplit) -> list[BatchOutcome]:
        if isinstance(split, SourceSplit):
            return split.read(self.task)
        with open(split.path, "rb") as f:
            data, stop, first = read_owned(f, split, self.task.where)
        outcomes: list[BatchOutcome] = []
        task = self.task
        fn, encoding, errors, where = task.fn, task.encoding, task.errors, task.where
        limit = split.max_line_length
        # One batch's bytes and records at a time besides the split's bytes.
        for lo, hi, count in batch_bounds(data, split.max_size, stop):
            lines = data[lo:hi]
            bad = find_long_line(lines, limit)
            if bad is not None:
                raise LineTooLong(where, first + lo + bad, limit)
            try:
                result: Any = fn(
                    decode_lines(lines, encoding=encoding, errors=errors, where=where, start=first + lo)
                )
            except Exception as exc:
                result = BatchError.of(exc)
            outcomes.append((count, first + lo, first + hi, result))
        return outcomes
